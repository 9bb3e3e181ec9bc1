"""The distill recipe at a tiny size: every mode has a pulse (two steps of each stage) and prints its table; the
teacher's traces written by two processes equal those written by one (gloo; slow)."""
import json
import os

import pytest
from conftest import finish, start_training

from r1jax import distill as distill_lib
from r1jax import run, sft, sharding, toy
from r1jax.checkpoint import graceful_sigterm
from r1jax.metrics import read_metrics
from r1jax.model import ModelConfig, create_model
from r1jax.run import Policy, save_policy
from r1jax.tokenizer import r1_zero_prompt, train_sentencepiece
from r1jax.train import OptimConfig
from recipes import distill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL = ["steps=2", "prompts_per_step=4", "group_size=4", "max_new_tokens=40", "checkpoint_every=1"]
TINY = [
    "student_base.corpus_size=300", "student_base.pretrain.steps=2", "student_base.pretrain.batch_size=8",
    "student_base.pretrain.max_len=96",
    "traces.prompts=16", "traces.generation.samples=2", "traces.generation.batch_prompts=8",
    "traces.generation.max_new_tokens=40", "traces.filter.require_correct=false",
    "traces.filter.require_format=false", "traces.filter.max_tokens=40",
    "student_sft.epochs=0", "student_sft.steps=2", "student_sft.batch_size=8", "student_sft.max_len=96",
    "logit_kd.epochs=0", "logit_kd.steps=2", "logit_kd.batch_size=8", "logit_kd.max_len=96", "kd.top_k=16",
    *(f"on_policy.{s}" for s in RL), *(f"ablation_rl.{s}" for s in RL),
    "eval.num_prompts=8", "eval.samples=2", "eval.max_new_tokens=40", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny teacher that writes worked sums in the template and stops (60 SFT steps on worked examples only)."""
    tmp = tmp_path_factory.mktemp("teacher")
    task = toy.ToyTask(mix=(1.0, 0.0, 0.0))
    corpus = toy.base_corpus(task, toy.problems(task, 3000, seed=3), seed=4)
    # The embedded base's tokenizer settings: the template becomes a few long pieces.
    tok = train_sentencepiece([p + c for p, c in corpus], None, 512, max_piece_length=128,
                              split_by_whitespace=False, split_by_unicode_script=False)
    mcfg = ModelConfig.toy().replace(vocab_size=tok.vocab_size, n_layers=2, d_model=32, d_ff=64, head_dim=16,
                                     n_heads=2, n_kv_heads=1, scan_layers=False)
    with graceful_sigterm() as stop:
        ctx = run.make_context(str(tmp / "run"), sharding.MeshConfig(), 0, {}, stop, log=False)
        policy = Policy(mcfg, create_model(mcfg, mesh=ctx.mesh, seed=0), tok)
        policy = sft.sft_stage(ctx, policy, corpus, sft.SFTConfig(
            steps=60, batch_size=16, max_len=128, log_every=60, optim=OptimConfig(lr=1e-2, warmup_steps=5)),
            name="teacher", seed=0)
    save_policy(policy, str(tmp / "teacher"))
    return str(tmp / "teacher")


def _cfg(tmp_path, teacher, name, extra=()):
    return run.config(distill, None, TINY + [f"teacher={teacher}", f"run_dir={tmp_path / name}",
                                             f"student_base.cache_dir={tmp_path / 'cache'}", *extra])


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def on_policy_run(tmp_path_factory, teacher):
    tmp = tmp_path_factory.mktemp("distill")
    cfg = _cfg(tmp, teacher, "on_policy")
    assert run.train(distill, cfg) == 0
    return tmp, cfg


def test_on_policy_mode_and_the_rl_ablation_have_a_pulse(on_policy_run):
    _, cfg = on_policy_run
    with open(os.path.join(cfg.run_dir, "stages.json")) as f:
        record = json.load(f)
    assert record["done"] == ["teacher", "student_base", "teacher_traces", "student_sft", "on_policy", "ablation_rl"]
    assert set(record["seconds"]) == set(record["done"]) and all(s > 0 for s in record["seconds"].values())
    metrics = read_metrics(os.path.join(cfg.run_dir, "metrics.jsonl"))
    evals = {(r["stage"], r["step"]) for r in metrics if r["kind"] == "eval"}
    assert evals == {("teacher", 0), ("student_sft", 0), ("student_sft", 2), ("on_policy", 2), ("ablation_rl", 2)}
    train = [r for r in metrics if r["kind"] == "train"]
    on_policy = [r for r in train if r["stage"] == "on_policy"]
    assert [r["step"] for r in on_policy] == [1, 2]
    assert all(r["distill_kl"] > 0 and "clip_low_frac" not in r and r["kl"] == 0.0 for r in on_policy)
    assert [r["step"] for r in train if r["stage"] == "ablation_rl"] == [1, 2]
    traces = _lines(os.path.join(cfg.run_dir, "teacher_traces", "traces.jsonl"))
    assert traces and all(t["teacher"] == cfg.teacher and t["settings"]["temperature"] == 0.6 for t in traces)
    assert all(t["prompt"] == r1_zero_prompt(t["question"]) for t in traces)
    sft_steps = read_metrics(os.path.join(cfg.run_dir, "student_sft", "metrics.jsonl"))
    assert [r["step"] for r in sft_steps] == [2]
    # The table (run.train prints it): every row this mode has, with its steps and wall time.
    seconds = run.stage_seconds(cfg.run_dir)
    table = distill.table(cfg, [r for r in metrics if r["kind"] == "eval"], seconds).splitlines()
    assert [line.split("  ")[0] for line in table[1:]] == [
        "student base", "student, RL alone", "student, trace SFT", "student, on-policy distillation", "teacher"]
    assert all(line.rstrip().endswith("min") for line in table[1:-1])


def test_logit_mode_has_a_pulse(on_policy_run, teacher):
    tmp, _ = on_policy_run
    cfg = _cfg(tmp, teacher, "logit", ["mode=logit", "ablation=false"])
    assert run.train(distill, cfg) == 0  # the student base comes from the cache the first run filled
    with open(os.path.join(cfg.run_dir, "stages.json")) as f:
        assert json.load(f)["done"] == ["teacher", "student_base", "teacher_traces", "student_sft", "logit_kd"]
    steps = read_metrics(os.path.join(cfg.run_dir, "logit_kd", "metrics.jsonl"))
    assert [r["step"] for r in steps] == [2] and steps[0]["distill_kl"] > 0 and steps[0]["ce"] > 0
    evals = [r for r in read_metrics(os.path.join(cfg.run_dir, "metrics.jsonl")) if r["kind"] == "eval"]
    assert ("logit_kd", 2) in {(r["stage"], r["step"]) for r in evals}


def test_sft_mode_stops_after_trace_sft_and_a_vocabulary_mismatch_is_refused(on_policy_run, teacher):
    tmp, _ = on_policy_run
    stages = [s.name for s in distill.stages(_cfg(tmp, teacher, "sft", ["mode=sft", "ablation=false"]))]
    assert stages == ["teacher", "student_base", "teacher_traces", "student_sft"]
    # A student of another vocabulary: logit and on-policy distillation refuse it by name.
    other = Policy(ModelConfig.toy().replace(vocab_size=200), None, None)
    teacher_policy = Policy(ModelConfig.toy().replace(vocab_size=512), None, None)
    with pytest.raises(ValueError, match="share a tokenizer"):
        distill_lib.check_same_vocab(other, teacher_policy)


def _start(args, n_proc, devices_each):
    finish(start_training(["--recipe", "distill", *args], n_proc, devices_each, cwd=ROOT))


@pytest.mark.slow  # two process launches: make test-slow
def test_two_processes_write_the_traces_one_does(on_policy_run, teacher):
    tmp, _ = on_policy_run
    common = [*TINY, f"teacher={teacher}", f"student_base.cache_dir={tmp / 'cache'}", "mode=sft", "ablation=false",
              "eval.every=0", "student_sft.steps=1"]
    _start([*common, f"run_dir={tmp / 'one'}"], 1, 8)
    _start([*common, f"run_dir={tmp / 'two'}"], 2, 4)
    one = _lines(tmp / "one" / "teacher_traces" / "traces.jsonl")
    two = _lines(tmp / "two" / "teacher_traces" / "traces.jsonl")
    assert one and one == two
    assert sorted(os.listdir(tmp / "two" / "teacher_traces")) == [
        "generation.json", "samples-0-of-2.jsonl", "samples-1-of-2.jsonl", "stats.json", "traces.jsonl"]


def test_eval_any_hf_folder_on_gsm8k(teacher, tmp_path, capsys):
    """`python -m r1jax eval --model <HF folder> data.eval=<GSM8K>`: pass@1, maj@k, format, length; JSON and table."""
    from conftest import GSM8K_DIR
    from r1jax.cli import main as cli_main

    out = tmp_path / "results.json"
    assert cli_main(["eval", "--recipe", "distill", "--model", teacher, "--out", str(out),
                     f"data.eval={os.path.join(GSM8K_DIR, 'test.jsonl')}", f"run_dir={tmp_path / 'run'}",
                     "eval.num_prompts=4", "eval.samples=2", "eval.max_new_tokens=8",
                     "traces.generation.max_prompt_len=448"]) == 0
    with open(out) as f:
        result = json.load(f)
    assert result["model"] == os.path.abspath(teacher) and result["eval_prompts"] == 4
    assert result["settings"]["temperature"] == 0.6 and result["settings"]["top_p"] == 0.95
    for key in ("eval_accuracy", "eval_maj2_accuracy", "eval_format_rate", "eval_completion_len_mean"):
        assert 0 <= result[key] <= (8 if key == "eval_completion_len_mean" else 1), key
    printed = capsys.readouterr().out
    assert "accuracy (pass@1)" in printed and "maj@2" in printed and str(out) in printed
