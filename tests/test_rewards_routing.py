"""Rewards routed per task, weights by step schedule: the all-scenario RL mixture of reasoning prompts
(rule rewards) and general prompts (reward models, switched on late)."""
import math
import threading

import numpy as np
import pytest

from r1jax.rewards import Reward, RewardSet, accuracy_reward, format_reward

SCHEDULE = ((0, 0.0), (3, 0.5), (5, 1.0))

# (task, gold, completion): accuracy, format on reasoning; words, "bomb" on general
BATCH = [
    ("arith", "4", "<think>2+2</think><answer>4</answer>"),  # right, formatted
    ("arith", "4", "<think>hmm</think><answer>5</answer>"),  # wrong, formatted
    ("math", "1/2", "<think>half</think><answer>1/2</answer>"),  # right, formatted
    ("math", "3", "just 3"),  # no tags: wrong, unformatted (and no math-verify run)
    ("general", None, "Paris is nice."),  # 3 words, harmless
    ("general", None, "bomb"),  # 1 word, harmful
]
TEXTS = [c for _, _, c in BATCH]
EXAMPLES = [{"prompt": f"q{i}", "task": t, **({"answer": a} if a else {})} for i, (t, a, _) in enumerate(BATCH)]


class Recorder:
    """Wraps a reward fn; records the completions of every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, completions, examples):
        self.calls.append(list(completions))
        return self.fn(completions, examples)


def words(completions, examples):
    return np.array([len(c.split()) for c in completions], np.float32)


def harmless(completions, examples):
    return np.array([-1.0 if "bomb" in c else 1.0 for c in completions], np.float32)


def _mixture():
    fns = {name: Recorder(fn) for name, fn in
           (("accuracy", accuracy_reward), ("format", format_reward), ("helpful", words), ("harmless", harmless))}
    reasoning = ("arith", "math")
    rewards = RewardSet([Reward("accuracy", fns["accuracy"], 1.0, tasks=reasoning),
                         Reward("format", fns["format"], 0.5, tasks=reasoning),
                         Reward("helpful", fns["helpful"], 2.0, tasks=("general",), schedule=SCHEDULE),
                         Reward("harmless", fns["harmless"], 1.0, tasks=("general",))])
    return rewards, fns


@pytest.mark.parametrize("step, totals", [
    (None, [1.5, 0.5, 1.5, 0.0, 7.0, 1.0]),  # helpful at its plain weight 2: 2*3+1, 2*1-1
    (3, [1.5, 0.5, 1.5, 0.0, 4.0, 0.0]),  # helpful at 2*0.5: 3+1, 1-1
    (0, [1.5, 0.5, 1.5, 0.0, 1.0, -1.0]),  # helpful off: harmlessness only
])
def test_mixture_batch_routes_each_reward_to_its_tasks(step, totals):
    rewards, fns = _mixture()
    out = rewards(TEXTS, EXAMPLES, step=step)
    helpful_on = step != 0
    assert fns["accuracy"].calls == [TEXTS[:4]] and fns["format"].calls == [TEXTS[:4]]
    assert fns["harmless"].calls == [TEXTS[4:]]
    assert fns["helpful"].calls == ([TEXTS[4:]] if helpful_on else [])  # off: not called at all
    np.testing.assert_array_equal(out.total_B, np.array(totals, np.float32))
    reasoning_B = [True] * 4 + [False] * 2
    general_B = [not r for r in reasoning_B]
    assert {k: v.tolist() for k, v in out.routed.items()} == {
        "accuracy": reasoning_B, "format": reasoning_B, "helpful": general_B if helpful_on else [False] * 6,
        "harmless": general_B}
    assert out.scores["accuracy"].tolist() == [1, 0, 1, 0, 0, 0]
    assert out.scores["helpful"].tolist() == ([0] * 4 + [3, 1] if helpful_on else [0] * 6)
    assert out.scores["harmless"].tolist() == [0] * 4 + [1, -1]
    # Means over the routed items only: general prompts do not dilute accuracy.
    assert (out.mean("accuracy"), out.mean("format"), out.mean("harmless")) == (0.5, 0.75, 0.0)
    assert out.mean("helpful") == (2.0 if helpful_on else None) and out.mean("absent") is None
    m = out.metrics
    assert (m["accuracy/mean"], m["accuracy/count"], m["accuracy/weight"]) == (0.5, 4.0, 1.0)
    assert (m["format/mean"], m["format/count"], m["format/weight"]) == (0.75, 4.0, 0.5)
    assert (m["helpful/mean"], m["helpful/count"], m["helpful/weight"]) == (
        {None: (2.0, 2.0, 2.0), 3: (2.0, 2.0, 1.0), 0: (0.0, 0.0, 0.0)}[step])
    assert m["harmless/errors"] == 0 and m["helpful/timeouts"] == 0
    assert m["total/mean"] == pytest.approx(sum(totals) / 6, rel=1e-6)


def test_schedule_weights_by_step():
    reward = Reward("rm", words, 2.0, schedule=SCHEDULE)
    assert [reward.weight_at(s) for s in (0, 2, 3, 4, 5, 100, None)] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert [Reward("plain", words, 0.3).weight_at(s) for s in (0, 7, None)] == [0.3, 0.3, 0.3]
    with pytest.raises(ValueError):
        reward.weight_at(-1)
    # Configs read from JSON hold lists: taken as the tuples they mean.
    assert Reward("rm", words, tasks=["general"], schedule=[[0, 0], [3, 1]]).schedule == ((0, 0.0), (3, 1.0))


def test_zero_weight_reward_is_not_called():
    never, ones = Recorder(words), Recorder(lambda c, e: np.ones(len(c), np.float32))
    out = RewardSet([Reward("never", never, 0.0), Reward("one", ones)])(TEXTS, EXAMPLES)
    assert never.calls == [] and len(ones.calls) == 1
    assert out.scores["never"].tolist() == [0] * 6 and not out.routed["never"].any()
    assert out.mean("never") is None and out.total_B.tolist() == [1.0] * 6
    assert (out.metrics["never/weight"], out.metrics["never/count"], out.metrics["never/mean"]) == (0, 0, 0)


def test_a_reward_routed_to_no_item_is_not_called():
    code = Recorder(words)
    out = RewardSet([Reward("code", code, tasks=("code",)), Reward("harmless", harmless)])(TEXTS, EXAMPLES)
    assert code.calls == [] and out.metrics["code/count"] == 0 and out.mean("code") is None
    assert out.total_B.tolist() == [1.0] * 5 + [-1.0]


def test_timeouts_count_only_the_routed_items():
    release = threading.Event()

    def hang(c, e):
        release.wait(30)
        return np.ones(len(c))

    out = RewardSet([Reward("hang", hang, timeout_s=0.2, tasks=("general",))])(TEXTS, EXAMPLES)
    release.set()
    assert out.metrics["hang/timeouts"] == 2 and out.scores["hang"].tolist() == [0] * 6
    assert out.routed["hang"].tolist() == [False] * 4 + [True] * 2


@pytest.mark.parametrize("schedule", [
    ((3, 1.0),),  # does not start at step 0
    ((0, 1.0), (5, 0.0), (3, 1.0)),  # unsorted
    ((0, 1.0), (0, 0.5)),  # repeated step
    ((-1, 0.0), (0, 1.0)),  # negative step
    ((0, 1.0), (2.5, 0.0)),  # fractional step
    ((0, math.nan),), ((0, 1.0), (4, math.inf)),  # non-finite multipliers
    ((0,),), (0, 1.0),  # not (step, multiplier) pairs
])
def test_bad_schedules_are_rejected(schedule):
    with pytest.raises(ValueError, match="schedule of rm"):
        Reward("rm", words, schedule=schedule)


@pytest.mark.parametrize("tasks", [(), "math", ("math", "math"), ("",), ("math", None)])
def test_bad_tasks_are_rejected(tasks):
    with pytest.raises(ValueError, match="tasks of rm"):
        Reward("rm", words, tasks=tasks)
