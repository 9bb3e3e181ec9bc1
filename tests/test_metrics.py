"""MetricsLogger files and validation, read_metrics, Progress lines, reward.png and the before/after table."""
import glob
import io
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event, SessionLog

from r1jax.metrics import (EVAL_KEYS, TRAIN_KEYS, MetricsLogger, Progress, before_after_table, evaluated_steps,
                           plot_run, read_metrics, run_figure)


def _train(step, stage="rl", **extra):
    frac = step / 10
    return {"step": step, "stage": stage, "reward_mean": np.float32(0.2 + frac),
            "accuracy": jnp.asarray(0.1 + frac / 2), "format_rate": min(1.0, 0.5 + frac),
            "completion_len_mean": np.float64(40 + 3 * step), "kl": 1e-3 * step, **extra}


def _eval(step, acc, **extra):
    return {"step": step, "stage": "rl", "eval_accuracy": acc, "eval_format_rate": 0.6 + acc / 3,
            "eval_completion_len_mean": 40.0 + step, **extra}


def _tb_events(run_dir):
    """(tag, step, value or None) from the TFRecord event files; the tensorboard package is no dependency."""
    out = []
    for path in sorted(glob.glob(os.path.join(run_dir, "tb", "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])  # u64 length, u32 crc, data, u32 crc
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                # What TensorBoard does on a restart marker: forget earlier events from this step on.
                out = [e for e in out if e[1] < event.step]
            for v in event.summary.value:
                out.append((v.tag, event.step, v.simple_value if v.HasField("simple_value") else None))
    return out


def _tb_steps(run_dir, tag):
    return [step for t, step, _ in _tb_events(run_dir) if t == tag]


def test_records_round_trip_with_kind_and_plain_types(tmp_path):
    run = str(tmp_path / "run")
    with MetricsLogger(run) as log:
        log.log_eval(_eval(0, 0.3))
        for step in (1, 2, 3):
            log.log_step(_train(step, grad_norm=jnp.float32(1.5), n_groups_zero_spread=np.int64(2),
                                entropy=float("nan")))
        log.log_eval(_eval(3, 0.9, eval_maj_accuracy=0.95))
    lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 5 and all(json.loads(line) for line in lines)
    assert "NaN" not in "".join(lines)  # strict JSON: non-finite floats are written as null
    records = read_metrics(run)
    assert [r["kind"] for r in records] == ["eval", "train", "train", "train", "eval"]
    first = records[1]
    assert set(TRAIN_KEYS) <= set(first) and first["step"] == 1 and first["stage"] == "rl"
    assert isinstance(first["accuracy"], float) and isinstance(first["n_groups_zero_spread"], int)
    assert first["reward_mean"] == pytest.approx(0.3) and first["grad_norm"] == 1.5 and first["entropy"] is None
    assert set(EVAL_KEYS) <= set(records[0]) and records[-1]["eval_maj_accuracy"] == 0.95
    assert [r["step"] for r in read_metrics(os.path.join(run, "metrics.jsonl"), kind="eval")] == [0, 3]


def test_required_keys_are_validated(tmp_path):
    log = MetricsLogger(str(tmp_path))
    record = _train(1)
    del record["kl"], record["format_rate"]
    with pytest.raises(ValueError, match=r"\['format_rate', 'kl'\]"):
        log.log_step(record)
    with pytest.raises(ValueError, match="eval_format_rate"):
        log.log_eval({"step": 0, "stage": "rl", "eval_accuracy": 0.1, "eval_completion_len_mean": 3.0})
    with pytest.raises(TypeError, match="shape"):
        log.log_step(_train(1, per_token=np.zeros(3)))
    log.close()
    assert read_metrics(str(tmp_path)) == []
    with MetricsLogger(str(tmp_path), validate=False, tensorboard=False) as loose:
        loose.log_step({"step": 4, "stage": "sft", "loss": 2.0})
    assert read_metrics(str(tmp_path)) == [{"step": 4, "stage": "sft", "kind": "train", "loss": 2.0}]


def test_tensorboard_events_under_stage_tags(tmp_path):
    run = str(tmp_path)
    with MetricsLogger(run) as log:
        log.log_eval(_eval(0, 0.25))
        log.log_step(_train(1))
        log.log_step(_train(2))
        sample = {"prompt": "2+2?", "completion": "<think>2+2=4</think><answer>4</answer>", "reward": 1.0}
        log.log_samples(2, "rl", [sample])
    assert glob.glob(os.path.join(run, "tb", "events.out.tfevents.*"))
    events = _tb_events(run)
    tags = {t for t, _, _ in events}
    assert {"rl/reward_mean", "rl/kl", "rl/eval/accuracy", "rl/eval/format_rate"} <= tags
    assert _tb_steps(run, "rl/accuracy") == [1, 2]
    assert [v for t, _, v in events if t == "rl/eval/accuracy"] == [pytest.approx(0.25)]
    assert any("samples" in t for t in tags)


def test_samples_file(tmp_path):
    samples = [{"prompt": "What is 12*3?", "completion": "<think>12*3=36</think>\n<answer>36</answer>",
                "answer": "36", "reward": np.float32(2.0)},
               {"prompt": "What is 7+8?", "completion": "15", "answer": "15", "reward": 0.0}]
    with MetricsLogger(str(tmp_path), tensorboard=False) as log:
        log.log_samples(10, "rl", samples)
        log.log_samples(20, "rl", samples[:1])
    rows = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert [(r["step"], r["answer"]) for r in rows] == [(10, "36"), (10, "15"), (20, "36")]
    assert rows[0]["completion"] == samples[0]["completion"] and rows[0]["reward"] == 2.0


def test_disabled_logger_writes_nothing_but_still_validates(tmp_path):
    run = tmp_path / "run"
    log = MetricsLogger(str(run), enabled=False)
    log.log_step(_train(1))
    log.log_eval(_eval(0, 0.1))
    log.log_samples(1, "rl", [{"completion": "x"}])
    with pytest.raises(ValueError, match="kl"):
        log.log_step({k: v for k, v in _train(2).items() if k != "kl"})
    log.close()
    assert not run.exists()


def test_resume_purges_steps_logged_after_the_checkpoint(tmp_path):
    run = str(tmp_path)
    with MetricsLogger(run) as log:
        log.log_eval(_eval(0, 0.2))
        for step in range(1, 6):  # killed after step 5; the checkpoint holds step 3
            log.log_step(_train(step))
        log.log_samples(4, "rl", [{"completion": "old"}])
    with MetricsLogger(run, purge_step=4) as log:
        for step in range(4, 7):
            log.log_step(_train(step, attempt=2))
    records = read_metrics(run, dedupe=False)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6]
    assert all(r.get("attempt") == 2 for r in records[4:])
    assert not open(os.path.join(run, "samples.jsonl")).read().strip()
    assert _tb_steps(run, "rl/kl") == [1, 2, 3, 4, 5, 6]


def test_read_metrics_dedupes_and_tolerates_a_cut_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "stage": "rl", "kind": "train", "a": 1}, {"step": 2, "stage": "rl", "kind": "train", "a": 1},
            {"step": 2, "stage": "rl", "kind": "eval", "a": 1}, {"step": 2, "stage": "rl", "kind": "train", "a": 2},
            {"step": 3, "stage": "rl", "kind": "train", "a": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "sta')
    got = read_metrics(str(path))
    assert [(r["step"], r["kind"], r["a"]) for r in got] == [(1, "train", 1), (2, "eval", 1), (2, "train", 2),
                                                             (3, "train", 2)]
    assert len(read_metrics(str(path), dedupe=False)) == 5


def test_progress_prints_compact_lines_off_a_terminal():
    out = io.StringIO()
    bar = Progress(30, every=10, desc="rl", file=out)
    for step in range(1, 31):
        bar.update(step, _train(step))
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["1/30", "10/30", "20/30", "30/30"]
    assert "reward" in lines[1] and "acc" in lines[1] and "len" in lines[1] and "ETA" in lines[1]
    quiet = io.StringIO()
    Progress(5, file=quiet, enabled=False).update(5, _train(5))
    assert quiet.getvalue() == ""


def test_plot_run_writes_png(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False) as log:
        log.log_eval(_eval(0, 0.3))
        for step in range(1, 11):
            log.log_step(_train(step))
            if step % 5 == 0:
                log.log_eval(_eval(step, 0.3 + step / 20, eval_maj_accuracy=0.4 + step / 20))
    out = tmp_path / "plots" / "reward.png"
    plot_run(str(tmp_path / "metrics.jsonl"), str(out))
    data = out.read_bytes()
    assert len(data) > 10_000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_before_after_table():
    evals = [_eval(0, 0.32, eval_maj_accuracy=0.4), _eval(100, 0.7), _eval(200, 0.915, eval_maj_accuracy=0.97)]
    table = before_after_table(evals)
    lines = table.splitlines()
    assert len(lines) == 3
    assert "accuracy" in lines[0] and "maj@k" in lines[0] and "format" in lines[0] and "length" in lines[0]
    assert lines[1].startswith("base (step 0)") and "32.0%" in lines[1] and "40.0%" in lines[1]
    assert lines[2].startswith("after RL (step 200)") and "91.5%" in lines[2] and "97.0%" in lines[2]
    assert "240.0" in lines[2]  # mean completion length, not a percentage
    no_maj = before_after_table([_eval(0, 0.1), _train(5), _eval(9, 0.9)])  # train records are skipped
    assert "maj@k" not in no_maj and "after RL (step 9)" in no_maj
    with pytest.raises(ValueError):
        before_after_table([_train(1)])


def test_reward_png_draws_maj_at_k_as_evaluation_logs_it():
    records = [{"kind": "train", **_train(1)},
               *({"kind": "eval", **_eval(s, 0.5, eval_maj4_accuracy=0.6)} for s in (0, 5))]
    accuracy_panel = run_figure(records).axes[1]
    labels = [line.get_label() for line in accuracy_panel.get_lines()]
    assert "eval maj@k" in labels and "eval pass@1" in labels
    maj = next(line for line in accuracy_panel.get_lines() if line.get_label() == "eval maj@k")
    assert list(maj.get_ydata()) == [0.6, 0.6]


def test_purge_drops_one_stage_after_its_checkpoint_step(tmp_path):
    log = MetricsLogger(str(tmp_path), tensorboard=False)
    for step in (1, 2, 3):
        log.log_step(_train(step, stage="first"))
    log.log_eval(_eval(0, 0.1) | {"stage": "second"})
    for step in (1, 2, 3):
        log.log_step(_train(step, stage="second"))
        log.log_samples(step, "second", [{"completion": "x"}])
    log.log_eval(_eval(2, 0.2) | {"stage": "second"})
    log.purge("second", 1)  # the second stage resumes from its step-1 checkpoint
    log.log_step(_train(2, stage="second"))
    log.close()
    raw = read_metrics(str(tmp_path), dedupe=False)
    assert [(r["stage"], r["kind"], r["step"]) for r in raw] == [
        ("first", "train", 1), ("first", "train", 2), ("first", "train", 3),
        ("second", "eval", 0), ("second", "train", 1), ("second", "train", 2)]
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert [s["step"] for s in samples] == [1]
    assert evaluated_steps(str(tmp_path), "second") == {0} and evaluated_steps(str(tmp_path), "first") == set()
