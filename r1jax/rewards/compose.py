"""Composing rewards: a weighted sum of named rewards that never crashes a run.

Each reward applies to the examples of its `tasks` (all if None) and is called only on those
(a reward model must not run on reasoning prompts); its weight may follow a step `schedule`
(R1 switches the reward models on for the last 400 steps), and at weight 0 it is not called.

Each reward runs in its own daemon thread (all at once; the heavy ones wait on worker
processes), with a deadline. A reward that raises is retried item by item so one bad
completion costs only its own score; an item that still raises, or returns a non-finite
score, scores 0 and counts under "<name>/errors". A reward that misses its deadline scores
0 for all its items and counts them under "<name>/timeouts"; its thread is
abandoned (Python cannot kill a thread: rewards that can hang should bound themselves, as
math/code do with processes). Counts that rewards report through `stats.count` appear as
"<name>/<key>" (e.g. math-verify timeouts inside `accuracy`, under "accuracy/timeouts").
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from r1jax.rewards import stats
from r1jax.rewards.accuracy import task_of

__all__ = ["Reward", "RewardSet", "RewardOutput", "combine"]

RewardFn = Callable[[list[str], list[dict]], np.ndarray]
log = logging.getLogger(__name__)


def _checked_schedule(name: str, schedule) -> tuple[tuple[int, float], ...]:
    # Starting at step 0 leaves no step before the first entry to guess a multiplier for.
    pairs = [tuple(e) if isinstance(e, (tuple, list)) else (e,) for e in schedule]
    ok = all(len(e) == 2 and type(e[0]) is int and isinstance(e[1], (int, float)) and math.isfinite(e[1])
             for e in pairs)
    steps = [e[0] for e in pairs] if ok else []
    if not ok or (steps and steps[0] != 0) or any(a >= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"schedule of {name} must be ((0, m0), (step, m), ...) with increasing integer "
                         f"steps and finite multipliers, got {schedule!r}")
    return tuple((s, float(v)) for s, v in pairs)


@dataclass(frozen=True)
class Reward:
    """`tasks`: the `task_of(example)` values it applies to (None: all); elsewhere it scores 0 and
    is not called. `schedule`: ((step, multiplier), ...) from step 0, a piecewise-constant
    multiplier of `weight` by training step (`((0, 0.0), (600, 1.0))`: on from step 600); empty:
    always 1. `collective`: `fn` is a collective over all JAX processes (a sharded reward model),
    so every process calls it on the same full batch (`rollout.score`); it must be deterministic
    and should not time out on one process only."""

    name: str
    fn: RewardFn
    weight: float = 1.0
    timeout_s: float | None = 300.0  # None: wait forever
    tasks: tuple[str, ...] | None = None
    schedule: tuple[tuple[int, float], ...] = ()
    collective: bool = False

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"a reward name is non-empty and has no '/': {self.name!r}")
        if not math.isfinite(self.weight):
            raise ValueError(f"weight of {self.name} is not finite: {self.weight}")
        if self.tasks is not None:
            # A bare string would iterate into letters: "math" -> ("m", "a", "t", "h").
            tasks = () if isinstance(self.tasks, str) else tuple(self.tasks)
            if (not tasks or not all(isinstance(t, str) and t for t in tasks)
                    or len(set(tasks)) != len(tasks)):
                raise ValueError(f"tasks of {self.name} must be None or distinct non-empty task names, "
                                 f"got {self.tasks!r}")
            object.__setattr__(self, "tasks", tasks)
        object.__setattr__(self, "schedule", _checked_schedule(self.name, self.schedule))

    def weight_at(self, step: int | None) -> float:
        """The weight at training step `step` (0-based); None (evaluation): the plain weight."""
        if step is None or not self.schedule:
            return self.weight
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        i = bisect.bisect_right([s for s, _ in self.schedule], step) - 1
        return self.weight * self.schedule[i][1]

    def routed(self, examples: Sequence[dict], step: int | None = None) -> np.ndarray:
        """Bool per example: does this reward score it at `step` (its task, a non-zero weight)."""
        if self.weight_at(step) == 0:
            return np.zeros(len(examples), dtype=bool)
        if self.tasks is None:
            return np.ones(len(examples), dtype=bool)
        return np.array([task_of(e) in self.tasks for e in examples], dtype=bool)


@dataclass(frozen=True)
class RewardOutput:
    total_B: np.ndarray  # sum over rewards of weight * score, float32
    scores: dict[str, np.ndarray]  # name -> unweighted per-item scores (B,), 0 where not routed
    metrics: dict[str, float]  # "<name>/{mean,weight,count,errors,timeouts}", "total/mean"
    routed: dict[str, np.ndarray]  # name -> bool (B,): the reward scored this item

    def mean(self, name: str) -> float | None:
        """Mean score over the items `name` scored; None if absent or it scored none."""
        return routed_mean(self.scores, self.routed, name)


def routed_mean(scores: dict[str, np.ndarray], routed: dict[str, np.ndarray], name: str) -> float | None:
    """Reward `name`'s mean score over the items it scored; None if absent or it scored none."""
    mask = routed.get(name)
    if mask is None or not mask.any():
        return None
    return float(scores[name][mask].mean())


def _checked(scores, n: int) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if scores.shape != (n,):
        raise ValueError(f"reward returned {scores.shape[0]} scores for {n} items")
    return scores


def _evaluate(reward: Reward, completions, examples, counts: collections.Counter, out: dict):
    with stats.collecting(counts):
        n = len(completions)
        try:
            scores = _checked(reward.fn(completions, examples), n)
        except Exception:  # noqa: BLE001 - isolate the failing items
            log.warning("reward %s raised on a batch of %d; retrying item by item",
                        reward.name, n, exc_info=True)
            scores = np.zeros(n, dtype=np.float32)
            for i in range(n):
                try:
                    scores[i] = _checked(reward.fn([completions[i]], [examples[i]]), 1)[0]
                except Exception:  # noqa: BLE001
                    counts["errors"] += 1
        bad = ~np.isfinite(scores)
        if bad.any():
            counts["errors"] += int(bad.sum())
            scores = np.where(bad, 0.0, scores).astype(np.float32)
        out["scores"] = scores


class RewardSet:
    """Call with (completions, examples, step=...) to get a `RewardOutput`."""

    def __init__(self, rewards: Sequence[Reward]):
        names = [r.name for r in rewards]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"reward names must be unique and non-empty: {names}")
        self.rewards = tuple(rewards)

    def __call__(self, completions: list[str], examples: list[dict], *,
                 step: int | None = None) -> RewardOutput:
        scores, counts = self.evaluate(completions, examples, step=step)
        return self.summarize(scores, counts, examples, step=step)

    def evaluate(self, completions: list[str], examples: list[dict], *, step: int | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, collections.Counter]]:
        """Per reward: float32 scores (B,), 0 where not routed, and its counts; no total. This is
        the part `rollout.score` spreads over processes before one `summarize`."""
        n = len(completions)
        if len(examples) != n:
            raise ValueError(f"{n} completions but {len(examples)} examples")
        runs = []
        start = time.monotonic()
        for reward in self.rewards:
            idx = np.flatnonzero(reward.routed(examples, step))
            counts, out, thread = collections.Counter(), {}, None
            if idx.size:  # otherwise not called at all: no reward-model forward for nothing
                thread = threading.Thread(
                    target=_evaluate, name=f"reward-{reward.name}", daemon=True,
                    args=(reward, [completions[i] for i in idx], [examples[i] for i in idx], counts, out))
                thread.start()
            runs.append((reward, idx, thread, counts, out))
        scores, all_counts = {}, {}
        for reward, idx, thread, counts, out in runs:
            s = np.zeros(n, dtype=np.float32)
            if thread is not None:
                wait = None if reward.timeout_s is None else max(
                    0.0, start + reward.timeout_s - time.monotonic())
                thread.join(wait)
                if "scores" in out:
                    s[idx] = out["scores"]
                else:  # hung, or died without a result: all its items score 0
                    hung = thread.is_alive()
                    log.warning("reward %s %s", reward.name,
                                f"gave no result within {reward.timeout_s}s" if hung else "died")
                    counts = collections.Counter(counts)  # a hung thread still owns the original
                    counts["timeouts" if hung else "errors"] += idx.size
            scores[reward.name] = s
            all_counts[reward.name] = counts
        return scores, all_counts

    def summarize(self, scores: Mapping[str, np.ndarray], counts: Mapping[str, Mapping[str, float]],
                  examples: list[dict], *, step: int | None = None) -> RewardOutput:
        """The total and metrics from `evaluate`'s full-batch scores and counts. The total adds
        the rewards in this set's order, so one process and many give bitwise-equal totals."""
        n = len(examples)
        total_B = np.zeros(n, dtype=np.float32)
        metrics, routed = {}, {}
        for reward in self.rewards:
            name, s = reward.name, scores[reward.name]
            weight = reward.weight_at(step)
            routed[name] = reward.routed(examples, step)
            total_B += np.float32(weight) * s  # s is 0 off the routed items: adds nothing there
            for key in ("errors", "timeouts"):
                metrics[f"{name}/{key}"] = 0.0
            for key, value in counts[name].items():
                metrics[f"{name}/{key}"] = float(value)
            count = int(routed[name].sum())
            metrics[f"{name}/mean"] = float(s[routed[name]].mean()) if count else 0.0
            metrics[f"{name}/weight"] = float(weight)
            metrics[f"{name}/count"] = float(count)
        metrics["total/mean"] = float(total_B.mean()) if n else 0.0
        return RewardOutput(total_B, dict(scores), metrics, routed)


def combine(rewards: Mapping[str, RewardFn | tuple[RewardFn, float]], *,
            timeout_s: float | None = 300.0) -> RewardSet:
    """`combine({"accuracy": accuracy_reward, "format": (format_reward, 0.5)})`: weight 1
    unless given."""
    return RewardSet([Reward(name, *(spec if isinstance(spec, tuple) else (spec, 1.0)),
                             timeout_s=timeout_s) for name, spec in rewards.items()])
