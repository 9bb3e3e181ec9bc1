"""RewardSet composition (never crashes a run) and the model-based reward adaptors."""
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from r1jax.rewards import (
    Reward,
    RewardSet,
    combine,
    format_reward,
    harmlessness_reward,
    helpfulness_reward,
    make_model_reward,
    stats,
)

GOOD = "<think>reasoning</think><answer>4</answer>"
EXAMPLES = [{"prompt": f"q{i}", "answer": "4"} for i in range(4)]


def ones(completions, examples):
    return np.ones(len(completions), dtype=np.float32)


def raising(completions, examples):
    raise RuntimeError("boom")


def raises_on_bad(completions, examples):
    if any("bad" in c for c in completions):
        raise ValueError("cannot judge")
    return np.full(len(completions), 0.5, dtype=np.float32)


def test_weighted_sum_and_separate_reports():
    rs = combine({"format": (format_reward, 0.5), "one": ones})
    out = rs([GOOD, "junk", GOOD, GOOD], EXAMPLES)
    assert out.scores["format"].tolist() == [1, 0, 1, 1]
    assert out.total_B.dtype == np.float32
    np.testing.assert_allclose(out.total_B, [1.5, 1.0, 1.5, 1.5])
    assert out.metrics["format/mean"] == 0.75 and out.metrics["total/mean"] == 1.375
    assert out.metrics["format/errors"] == 0 and out.metrics["format/timeouts"] == 0


def test_raising_reward_scores_zero_and_is_counted():
    out = combine({"boom": raising, "one": ones})([GOOD] * 4, EXAMPLES)
    assert out.scores["boom"].tolist() == [0] * 4 and out.metrics["boom/errors"] == 4
    assert out.total_B.tolist() == [1.0] * 4
    # Retried item by item, a reward that fails on one completion costs only that one.
    out = combine({"picky": raises_on_bad})([GOOD, "bad", GOOD, GOOD], EXAMPLES)
    assert out.scores["picky"].tolist() == [0.5, 0.0, 0.5, 0.5]
    assert out.metrics["picky/errors"] == 1


def test_bad_outputs_count_as_errors():
    def nan(c, e):
        return np.array([1.0, np.nan, np.inf, 0.0])

    def wrong_length(c, e):
        return np.ones(len(c) + 1)

    out = combine({"nan": nan, "len": wrong_length})([GOOD] * 4, EXAMPLES)
    assert out.scores["nan"].tolist() == [1, 0, 0, 0] and out.metrics["nan/errors"] == 2
    assert out.scores["len"].tolist() == [0] * 4 and out.metrics["len/errors"] == 4


def test_hanging_reward_times_out_without_blocking_the_others():
    release = threading.Event()

    def hang(c, e):
        release.wait(30)
        return np.ones(len(c))

    rs = RewardSet([Reward("hang", hang, 1.0, timeout_s=0.5), Reward("one", ones, 2.0)])
    t = time.perf_counter()
    out = rs([GOOD] * 4, EXAMPLES)
    assert time.perf_counter() - t < 2.0
    release.set()
    assert out.scores["hang"].tolist() == [0] * 4 and out.metrics["hang/timeouts"] == 4
    assert out.total_B.tolist() == [2.0] * 4


def test_counts_reported_by_rewards_reach_the_metrics():
    def flaky(c, e):
        stats.count("timeouts", 2)
        stats.count("cache_misses")
        return np.zeros(len(c))

    out = combine({"flaky": flaky})([GOOD] * 4, EXAMPLES)
    assert out.metrics["flaky/timeouts"] == 2 and out.metrics["flaky/cache_misses"] == 1


def test_invalid_sets_are_rejected():
    with pytest.raises(ValueError):
        RewardSet([Reward("a", ones), Reward("a", ones)])
    with pytest.raises(ValueError):
        Reward("a/b", ones)
    with pytest.raises(ValueError):
        Reward("a", ones, float("nan"))
    with pytest.raises(ValueError):
        combine({"one": ones})([GOOD], EXAMPLES)


class FakeScorer:
    """Scores by answer length; records what it was shown."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, texts):
        self.calls.append((list(prompts), list(texts)))
        return np.array([len(t) for t in texts], dtype=np.float32)


def test_helpfulness_sees_only_the_final_answer():
    scorer = FakeScorer()
    reward = helpfulness_reward(scorer, batch_size=2)
    completions = ["<think>long secret reasoning</think><answer>Paris</answer>",
                   "<think>more reasoning</think>\nThe capital is Paris.",
                   "No tags at all.", "<think>unfinished"]
    out = reward(completions, EXAMPLES)
    prompts = [p for call in scorer.calls for p in call[0]]
    texts = [t for call in scorer.calls for t in call[1]]
    assert len(scorer.calls) == 2 and prompts == ["q0", "q1", "q2", "q3"]
    assert texts == ["Paris", "The capital is Paris.", "No tags at all.", "<think>unfinished"]
    assert not any("reasoning" in t for t in texts)
    assert out.tolist() == [len(t) for t in texts] and out.dtype == np.float32


def test_harmlessness_sees_the_whole_response_by_default():
    scorer = FakeScorer()
    completions = ["<think>reasoning</think><answer>A</answer>"]
    harmlessness_reward(scorer)(completions, EXAMPLES[:1])
    assert scorer.calls[-1][1] == completions
    harmlessness_reward(scorer, view="answer")(completions, EXAMPLES[:1])
    assert scorer.calls[-1][1] == ["A"]


def test_model_reward_transform_and_errors_inside_a_set():
    reward = make_model_reward(FakeScorer(), transform=lambda s: s / 10)
    assert reward(["<answer>abcde</answer>"], EXAMPLES[:1]).tolist() == [0.5]
    broken = make_model_reward(lambda p, t: np.zeros(len(t) + 1))  # one score too many
    out = combine({"rm": broken})([GOOD] * 4, EXAMPLES)
    assert out.scores["rm"].tolist() == [0] * 4 and out.metrics["rm/errors"] == 4
    with pytest.raises(ValueError):
        make_model_reward(FakeScorer(), view="reasoning")


def test_rewards_package_imports_no_jax():
    code = ("import sys, r1jax.rewards; "
            "bad = [m for m in ('jax', 'flax', 'sympy', 'lingua') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
