"""The R1-Zero recipe end to end on tiny settings: pulse, exact resume, CLI round trip,
a Hugging Face folder with the GSM8K files."""
import json
import os

import pytest

from conftest import GSM8K_DIR
from r1jax import config as config_lib
from r1jax import run
from r1jax.cli import main as cli_main
from r1jax.metrics import read_metrics
from recipes import r1_zero

TINY = [
    "base.corpus_size=400", "base.pretrain.steps=3", "base.pretrain.batch_size=8", "base.pretrain.max_len=96",
    "rl.steps=4", "rl.prompts_per_step=4", "rl.group_size=4", "rl.minibatches=2", "rl.max_new_tokens=24",
    "rl.checkpoint_every=2", "eval.every=2", "eval.num_prompts=8", "eval.samples=2",
    "eval.max_new_tokens=24", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
]
TIMING = ("time_step_s", "time_sample_s", "time_reward_s", "time_reference_s",
          "time_update_s", "time_idle_s", "tokens_per_s")


def _cfg(tmp_path, name, extra=()):
    return run.config(r1_zero, None, TINY + [f"run_dir={tmp_path / name}", f"base.cache_dir={tmp_path / 'cache'}",
                                        *extra])


def _records(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


class StopAfter:
    """Stands in for SIGTERM: the signal arrives once `steps` GRPO steps are logged, on the `poll`-th poll
    from then on (1: the poll right after that step; more: inside the evaluation or generation after it)."""

    def __init__(self, run_dir, steps, poll=1):
        self.path, self.steps, self.poll = os.path.join(run_dir, "metrics.jsonl"), steps, poll
        self.polls = 0

    def stop_everywhere(self):
        if os.path.exists(self.path) and sum(r["kind"] == "train" for r in read_metrics(self.path)) >= self.steps:
            self.polls += 1
        return self.polls >= self.poll


def test_config_round_trips_through_the_cli(tmp_path, capsys):
    cfg = run.config(r1_zero, "paper", ["rl.group_size=8", "rl.clip_high=0.28", "eval.samples=2", "model=/x",
                                   "mesh.tensor=4", "base.task.mix=(0.5,0.25,0.25)"])
    assert cfg.rl.group_size == 8 and cfg.rl.clip_low == 10.0 and cfg.mesh.tensor == 4
    back = config_lib.from_dict(r1_zero.R1ZeroConfig, json.loads(config_lib.to_json(cfg)))
    assert back == cfg
    assert cli_main(["train", "--recipe", "r1_zero", "--help"]) == 0
    out = capsys.readouterr().out
    for key in config_lib.flatten(cfg):
        assert key in out
    with pytest.raises(ValueError, match="unknown setting"):
        run.config(r1_zero, None, ["rl.group_sise=8"])
    with pytest.raises(ValueError, match="choose from"):
        run.config(r1_zero, None, ["rl.kl_kind=k4"])


def test_paper_preset_is_the_published_recipe():
    cfg = r1_zero.paper()
    rl = cfg.rl
    assert (rl.optim.lr, rl.kl_coef, rl.clip_low, rl.clip_high, rl.group_size, rl.prompts_per_step,
            rl.temperature, rl.ref_reset_every) == (3e-6, 0.001, 10.0, 10.0, 16, 32, 1.0, 400)
    assert rl.max_prompt_len + rl.max_new_tokens == 32768
    assert (cfg.eval.temperature, cfg.eval.top_p) == (0.6, 0.95)


def _tiny_hf_folder(path):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = [json.loads(line)["question"] for line in open(os.path.join(GSM8K_DIR, "train.jsonl"))][:300]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>", unk_token="<unk>")
    fast.save_pretrained(path)
    cfg = transformers.Qwen2Config(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                   tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)


def test_hf_folder_with_gsm8k_runs_two_steps(tmp_path):
    folder = str(tmp_path / "tiny-qwen2")
    _tiny_hf_folder(folder)
    cfg = run.config(r1_zero, None, [
        f"model={folder}", f"data.train={GSM8K_DIR}/train.jsonl",
        f"run_dir={tmp_path / 'run'}", "rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=2",
        "rl.max_prompt_len=1024", "rl.max_new_tokens=8", "rl.kl_coef=0.001", "eval.num_prompts=2",
        "eval.samples=2", "eval.max_new_tokens=8", "rl.minibatches=1", "mesh.data=2", "mesh.tensor=4"])
    assert run.train(r1_zero, cfg) == 0
    records = _records(cfg.run_dir)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    # The reference is the initial policy, and step 1's only minibatch sees policy == reference.
    assert train[0]["kl"] < 1e-6
    # No data.eval: evaluation is off (it used to crash at step 0), and eval.every=0 means none anyway.
    assert not [r for r in records if r["kind"] == "eval"]


def test_an_explicit_eval_file_wins_over_the_toy_split():
    """`python -m r1jax eval --recipe r1_zero --model <folder> data.eval=<GSM8K>` leaves model= at toy: the eval
    file must still be what is measured (it used to be the toy task's held-out sums)."""
    cfg = run.config(r1_zero, None, [f"data.eval={GSM8K_DIR}/test.jsonl", "eval.num_prompts=3"])
    first = json.loads(next(open(os.path.join(GSM8K_DIR, "test.jsonl"))))["question"]
    records = r1_zero.evaluation(cfg).records
    assert len(records) == 3 and records[0]["prompt"] == first
    assert r1_zero.evaluation(run.config(r1_zero, None, [])).records[0]["prompt"].startswith("Compute")
