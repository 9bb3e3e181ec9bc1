"""The GRPO loop's timing and its one-step-off mode (rl.one_step_off): each step trains on the batch the previous
policy sampled, with that policy's log-probs as the ratio's old ones; stops resume to the uninterrupted run; the
device timeline that splits each step."""
import os

import pytest

from r1jax import run, sampler
from r1jax.metrics import read_metrics
from r1jax.timing import DeviceTimeline
from recipes import r1_zero
from test_faults import _length_rewards
from test_r1_zero import StopAfter, _cfg, _records

OFF = ["rl.one_step_off=true", "rl.recompute_old_logp=true"]


@pytest.fixture(scope="module", autouse=True)
def learning():
    """Rewards the tiny base earns (by length), so advantages are not all 0 and the policy moves."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(r1_zero, "_rewards", _length_rewards)
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted one-step-off run the interrupted ones must equal, and the base-model cache they share."""
    tmp = tmp_path_factory.mktemp("one_step_off")
    cfg = _cfg(tmp, "full", OFF)
    assert run.train(r1_zero, cfg) == 0
    return [r for r in _records(cfg.run_dir)], f"base.cache_dir={tmp / 'cache'}", cfg.run_dir


def test_each_step_trains_on_what_the_policy_before_its_last_update_sampled(reference):
    records, _, run_dir = reference
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["staleness"] for r in train] == [0, 1, 1, 1]
    # The old log-probs are the sampling policy's: recomputed from its sampling weights they are the sampler's
    # own (fp32) ...
    assert max(r["sampler_logp_gap_max"] for r in train) <= 1e-4
    # ... and once a batch lags an update, the policy being trained has moved off them (the gap is read on the
    # first minibatch, before this step's own updates).
    assert train[0]["logp_gap_max"] <= 1e-4
    assert all(r["logp_gap_max"] > 1e-3 for r in train[1:])
    timed = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]
    for r in timed:  # the step's split: device time in sampling, the forwards and the update, and the idle rest
        assert 0 <= r["time_idle_s"] <= r["time_step_s"] and r["time_update_s"] > 0
    # Each step but the last samples the next step's batch; its old log-probs are recomputed (this recipe has no
    # reference model) whenever the device gets to them.
    assert all(r["time_sample_s"] > 0 for r in timed[:-1]) and timed[-1]["time_sample_s"] == 0
    assert sum(r["time_reference_s"] for r in timed) > 0
    assert os.path.exists(os.path.join(run_dir, "grpo", "final", "config.json"))


def test_a_stop_at_a_checkpoint_resumes_to_the_uninterrupted_run(tmp_path, reference):
    """The step-2 checkpoint holds the sampling weights of the batch in flight; the resume draws it again."""
    records, cache, _ = reference
    cfg = _cfg(tmp_path, "run", OFF + [cache])
    assert run.train(r1_zero, cfg, stop=StopAfter(cfg.run_dir, 2)) == 0
    assert [r["step"] for r in _records(cfg.run_dir) if r["kind"] == "train"] == [1, 2]
    assert run.train(r1_zero, cfg) == 0
    assert _records(cfg.run_dir) == records


def test_a_stop_inside_the_next_batchs_generation_resumes_to_the_uninterrupted_run(tmp_path, reference,
                                                                                    monkeypatch):
    """After step 1 the next batch is being sampled when the signal lands (before step 2's update): the
    checkpoint holds step 1, with the weights that sampled step 2's batch."""
    records, cache, _ = reference
    monkeypatch.setattr(sampler, "POLL_EVERY", 4)
    cfg = _cfg(tmp_path, "run", OFF + [cache])
    assert run.train(r1_zero, cfg, stop=StopAfter(cfg.run_dir, 1, poll=2)) == 0
    assert [r["step"] for r in _records(cfg.run_dir) if r["kind"] == "train"] == [1]
    assert sorted(os.listdir(os.path.join(cfg.run_dir, "grpo", "checkpoints"))) == ["1"]
    assert run.train(r1_zero, cfg) == 0
    assert _records(cfg.run_dir) == records


def test_the_timeline_splits_a_window_into_device_work_and_idle():
    timeline = DeviceTimeline()
    timeline.ran("sample", 1.0, 3.0)
    timeline.ran("reference", 2.5, 4.0)  # queued while sampling ran: the device takes it at 3.0
    timeline.ran("update", 5.0, 6.5)
    busy = timeline.window(0.0, 6.0)
    assert busy == pytest.approx({"sample": 2.0, "reference": 1.0, "update": 1.0, "idle": 2.0})
    # The next window starts where this one ended; work that ended before it is forgotten.
    assert timeline.window(6.0, 8.0) == pytest.approx({"update": 0.5, "idle": 1.5})
