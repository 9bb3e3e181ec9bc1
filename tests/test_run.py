"""The runner's stage bookkeeping on stand-in policies: inputs (previous, named, none), pass-through stages,
cheap loaders, resumption and start_at."""
import json
import os

import pytest

from r1jax import run
from r1jax.metrics import MetricsLogger


class _Stop:
    def stop_everywhere(self):
        return False


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    """A context whose policies are strings: saving writes the string, loading reads it back."""
    def save(policy, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "policy.txt"), "w") as f:
            f.write(policy)

    def load(path, ctx, tokenizer_path=""):
        with open(os.path.join(path, "policy.txt")) as f:
            return f.read()

    monkeypatch.setattr(run, "save_policy", save)
    monkeypatch.setattr(run, "load_policy", load)
    return run.Context(run_dir=str(tmp_path), mesh=None, seed=0, logger=MetricsLogger(str(tmp_path)),
                       stop=_Stop(), model_overrides={})


def _pipeline(calls: list, fail_at: str | None = None):
    def stage(name, returns=True):
        def fn(ctx, policy):
            calls.append((name, policy))
            if name == fail_at:
                raise run.Preempted("stop")
            os.makedirs(ctx.stage_dir(name), exist_ok=True)
            return f"{policy}>{name}" if returns else None
        return fn

    return [run.Stage("load", lambda ctx, _: (calls.append(("load", None)), "base")[1], start_from=None, keep=False),
            run.Stage("sft", stage("sft")),
            run.Stage("rl", stage("rl")),
            ("ablation", stage("ablation")),  # a plain (name, fn) pair starts from the previous stage
            run.Stage("data", stage("data", returns=False), start_from="rl"),
            run.Stage("sft2", stage("sft2"), start_from="load"),
            run.Stage("rl2", stage("rl2"))]


def test_each_stage_gets_its_input_and_a_rerun_skips_finished_stages(ctx):
    calls = []
    assert run.run_stages(ctx, _pipeline(calls)) == "base>sft2>rl2"
    assert calls == [("load", None), ("sft", "base"), ("rl", "base>sft"), ("ablation", "base>sft>rl"),
                     # rl's output was handed to ablation, which trained it: data gets it again from disk;
                     # data passes it through; sft2 re-runs the loader.
                     ("data", "base>sft>rl"), ("load", None), ("sft2", "base"), ("rl2", "base>sft2")]
    record = json.load(open(os.path.join(ctx.run_dir, run.STAGES_FILE)))
    assert record["done"] == ["sft", "rl", "ablation", "data", "sft2", "rl2"]
    assert record["outputs"]["data"] == "input" and record["outputs"]["rl"] == "final"
    assert not os.path.exists(ctx.final_dir("data")) and not os.path.exists(ctx.final_dir("load"))
    calls.clear()
    run.run_stages(ctx, _pipeline(calls))
    assert calls == []


def test_a_stopped_run_resumes_at_the_stage_it_stopped_in(ctx):
    calls = []
    with pytest.raises(run.Preempted):
        run.run_stages(ctx, _pipeline(calls, fail_at="sft2"))
    calls.clear()
    run.run_stages(ctx, _pipeline(calls))
    assert calls == [("load", None), ("sft2", "base"), ("rl2", "base>sft2")]


def test_start_at_reruns_from_a_stage_once(ctx):
    run.run_stages(ctx, _pipeline([]))
    ctx.logger.log_eval({"step": 0, "stage": "sft2", "eval_accuracy": 0.5, "eval_format_rate": 1.0,
                         "eval_completion_len_mean": 3.0})
    ctx.logger.log_eval({"step": 0, "stage": "rl", "eval_accuracy": 0.5, "eval_format_rate": 1.0,
                         "eval_completion_len_mean": 3.0})
    calls = []
    run.run_stages(ctx, _pipeline(calls), start_at="data")
    assert calls == [("data", "base>sft>rl"), ("load", None), ("sft2", "base"), ("rl2", "base>sft2")]
    for name in ("data", "sft2", "rl2"):  # the replaced stages' folders are kept aside, not deleted
        assert os.path.isdir(ctx.stage_dir(name) + ".replaced-1")
    stages = [json.loads(line)["stage"] for line in open(os.path.join(ctx.run_dir, "metrics.jsonl"))]
    assert stages == ["rl"]  # the replaced stages' metrics are purged
    calls.clear()
    run.run_stages(ctx, _pipeline(calls), start_at="data")  # the same command again: nothing to redo
    assert calls == []


def test_bad_stage_lists_and_start_at_are_refused(ctx):
    with pytest.raises(ValueError, match="not an earlier stage"):
        run.run_stages(ctx, [run.Stage("a", lambda c, p: "x", start_from="b"), run.Stage("b", lambda c, p: "y")])
    with pytest.raises(ValueError, match="unique"):
        run.run_stages(ctx, [("a", lambda c, p: "x"), ("a", lambda c, p: "y")])
    with pytest.raises(ValueError, match="the stages are"):
        run.run_stages(ctx, _pipeline([]), start_at="nope")
    with pytest.raises(ValueError, match="have not finished"):
        run.run_stages(ctx, _pipeline([]), start_at="rl2")
