"""The R1 recipe end to end at a tiny size: every stage has a pulse (two steps each), the whole recipe
stopped inside rejection sampling resumes to the uninterrupted run, and start_at re-runs the tail."""
import json
import os

import numpy as np
import pytest

from r1jax import run
from r1jax.metrics import read_metrics
from r1jax.rewards.language import LANGUAGES
from recipes import r1

TIMING = ("time_step_s", "time_sample_s", "time_reward_s", "time_reference_s",
          "time_update_s", "time_idle_s", "tokens_per_s")
RL = ["steps=2", "prompts_per_step=4", "group_size=4", "minibatches=2", "max_new_tokens=40", "checkpoint_every=1"]
TINY = [
    "base.corpus_size=300", "base.general_size=40", "base.general_eval_size=4", "base.pretrain.steps=4",
    "base.pretrain.batch_size=8", "base.pretrain.max_len=96", "base.cold_start_size=32", "base.pairs=32",
    "cold_start.steps=2", "cold_start.batch_size=8", "cold_start.max_len=96",
    *(f"reasoning_rl.{s}" for s in RL), *(f"all_scenario_rl.{s}" for s in RL), "reward_models.last_steps=1",
    "reward_models.general_share=0.75",
    "rejection.prompts=8", "rejection.generation.samples=2", "rejection.generation.batch_prompts=4",
    "rejection.generation.max_new_tokens=40", "rejection.filter.max_tokens=40",
    "sft_from_base.epochs=0", "sft_from_base.steps=2", "sft_from_base.batch_size=8", "sft_from_base.max_len=96",
    "reward_models.train.steps=2", "reward_models.train.batch_size=8", "reward_models.train.eval_pairs=8",
    "reward_models.max_len=64", "eval.num_prompts=8", "eval.samples=2", "eval.max_new_tokens=40",
    "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
]
STAGES = ["cold_start", "reasoning_rl", "ablation_r1_zero", "rejection_sampling", "reward_model", "sft_from_base",
          "all_scenario_rl"]


def _cfg(tmp_path, name, extra=()):
    return run.config(r1, None, TINY + [f"run_dir={tmp_path / name}", f"base.cache_dir={tmp_path / 'cache'}", *extra])


def _records(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


class StopInside:
    """Stands in for SIGTERM: set once the file `path` holds `lines` lines (the generation stage creates its
    shard before the first batch and appends a batch's lines at a time)."""

    def __init__(self, run_dir, path, lines):
        self.path, self.lines = os.path.join(run_dir, path), lines

    def stop_everywhere(self):
        return os.path.exists(self.path) and len(_read(self.path).splitlines()) >= self.lines


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("r1"), "full")
    assert run.train(r1, cfg) == 0
    return cfg


@pytest.mark.slow  # ~3-4 min on 2 cores (eight stages compile their programs): make test-slow
def test_every_stage_has_a_pulse(full):
    records = _records(full.run_dir)
    evals = {r["stage"]: r for r in records if r["kind"] == "eval"}  # the last evaluation of each stage
    assert set(evals) == {"cold_start", "reasoning_rl", "ablation_r1_zero", "sft_from_base", "all_scenario_rl"}
    for r in evals.values():
        assert {"eval_accuracy", "eval_format_rate", "eval_language_consistency"} <= set(r)
    assert "eval_rm_score" in evals["sft_from_base"] and "eval_rm_score" in evals["all_scenario_rl"]
    assert "eval_rm_score" not in evals["reasoning_rl"]
    for stage in ("reasoning_rl", "ablation_r1_zero", "all_scenario_rl"):
        assert [r["step"] for r in records if r["kind"] == "train" and r["stage"] == stage] == [1, 2]
    train = {r["stage"]: r for r in records if r["kind"] == "train"}
    assert "reward/language/mean" in train["reasoning_rl"] and "reward/language/mean" not in train["ablation_r1_zero"]
    # The reward models are off for all_scenario_rl's first step and on for its last (last_steps=1).
    first, last = [r for r in records if r["kind"] == "train" and r["stage"] == "all_scenario_rl"]
    assert (first["reward/helpful/weight"], last["reward/helpful/weight"]) == (0.0, 1.0)
    assert first["reward/helpful/count"] == 0 and last["reward/helpful/count"] > 0
    assert last["reward/accuracy/count"] + last["reward/helpful/count"] == 16  # routed by task, every row once
    for stage in ("cold_start", "reasoning_rl", "ablation_r1_zero", "sft_from_base", "all_scenario_rl"):
        assert os.path.exists(os.path.join(full.run_dir, stage, "final", "config.json")), stage
    for name in ("helpful", "harmless"):
        assert os.path.exists(os.path.join(full.run_dir, "reward_model", name, "final", "config.json"))
    stats = json.load(open(os.path.join(full.run_dir, "rejection_sampling", "stats.json")))
    assert stats["total"]["samples"] == 16 and stats["dataset"]["general"] == 40
    lines = [json.loads(line) for line in open(os.path.join(full.run_dir, "rejection_sampling", "sft.jsonl"))]
    assert len(lines) == stats["total"]["kept"] + 40
    assert all(m["messages"][-1]["role"] == "assistant" for m in lines)
    record = json.load(open(os.path.join(full.run_dir, run.STAGES_FILE)))
    assert record["done"] == ["toy_base", *STAGES]


@pytest.mark.slow
def test_stopped_inside_rejection_sampling_resumes_to_the_uninterrupted_run(full, tmp_path):
    cfg = _cfg(tmp_path, "resumed")
    first_batch = os.path.join("rejection_sampling", "samples-0-of-1.jsonl")
    assert run.train(r1, cfg, stop=StopInside(cfg.run_dir, first_batch, lines=8)) == 0
    done = json.load(open(os.path.join(cfg.run_dir, run.STAGES_FILE)))["done"]
    assert done == ["toy_base", "cold_start", "reasoning_rl", "ablation_r1_zero"]
    assert len(_read(os.path.join(cfg.run_dir, first_batch)).splitlines()) == 8  # one batch of 4 prompts x 2
    assert run.train(r1, cfg) == 0
    assert _records(cfg.run_dir) == _records(full.run_dir)
    for path in ("rejection_sampling/sft.jsonl", "rejection_sampling/stats.json", first_batch):
        assert _read(os.path.join(cfg.run_dir, path)) == _read(os.path.join(full.run_dir, path)), path
    final = os.path.join("all_scenario_rl", "final", "model.safetensors")
    assert _read(os.path.join(cfg.run_dir, final)) == _read(os.path.join(full.run_dir, final))


@pytest.mark.slow
def test_start_at_reruns_the_tail_from_the_kept_outputs(full, tmp_path):
    import shutil

    run_dir = tmp_path / "again"
    shutil.copytree(full.run_dir, run_dir)
    cfg = _cfg(tmp_path, "again", ["start_at=sft_from_base"])
    assert run.train(r1, cfg) == 0
    assert os.path.isdir(os.path.join(run_dir, "sft_from_base.replaced-1"))
    assert _records(run_dir) == _records(full.run_dir)  # the same two stages again, from the same inputs


def test_presets_load_and_check_their_settings():
    paper = run.config(r1, "paper", ["model=/x", "data.cold_start=/a", "data.reasoning=/b"])
    assert paper.all_scenario_rl.temperature == 0.7 and paper.reward_models.last_steps == 400
    assert paper.languages == LANGUAGES and paper.reasoning_rl.clip_high == 10.0
    assert [s.name for s in r1.stages(paper)] == ["load", "cold_start", "reasoning_rl", "rejection_sampling",
                                                  "sft_from_base", "all_scenario_rl"]
    cpu = run.config(r1, None, [])
    assert [s.name for s in r1.stages(cpu)] == ["toy_base", *STAGES]
    with pytest.raises(SystemExit, match="data.cold_start"):
        r1.stages(run.config(r1, "paper", ["model=/x"]))
    with pytest.raises(ValueError, match="group_sise"):
        run.config(r1, None, ["reasoning_rl.group_sise=4"])
    assert np.isclose(r1._mix([{}] * 30, [{"t": 1}] * 7, 0.25).count({"t": 1}) / 40, 0.25)
