"""Composing rewards: a weighted sum of named rewards that never crashes a run.

Each reward runs in its own daemon thread (all at once; the heavy ones wait on worker
processes), with a deadline. A reward that raises is retried item by item so one bad
completion costs only its own score; an item that still raises, or returns a non-finite
score, scores 0 and counts under "<name>/errors". A reward that misses its deadline scores
0 for the whole batch and counts the batch under "<name>/timeouts"; its thread is
abandoned (Python cannot kill a thread: rewards that can hang should bound themselves, as
math/code do with processes). Counts that rewards report through `stats.count` appear as
"<name>/<key>" (e.g. math-verify timeouts inside `accuracy`, under "accuracy/timeouts").
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from r1jax.rewards import stats

__all__ = ["Reward", "RewardSet", "RewardOutput", "combine"]

RewardFn = Callable[[list[str], list[dict]], np.ndarray]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0
    timeout_s: float | None = 300.0  # None: wait forever

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"a reward name is non-empty and has no '/': {self.name!r}")
        if not math.isfinite(self.weight):
            raise ValueError(f"weight of {self.name} is not finite: {self.weight}")


@dataclass(frozen=True)
class RewardOutput:
    total_B: np.ndarray  # sum over rewards of weight * score, float32
    scores: dict[str, np.ndarray]  # name -> unweighted per-item scores (B,)
    metrics: dict[str, float]  # "<name>/mean", "<name>/errors", "<name>/timeouts", "total/mean"


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
    """Call with (completions, examples) to get a `RewardOutput`."""

    def __init__(self, rewards: Sequence[Reward]):
        names = [r.name for r in rewards]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"reward names must be unique and non-empty: {names}")
        self.rewards = tuple(rewards)

    def __call__(self, completions: list[str], examples: list[dict]) -> RewardOutput:
        n = len(completions)
        if len(examples) != n:
            raise ValueError(f"{n} completions but {len(examples)} examples")
        runs = []
        start = time.monotonic()
        for reward in self.rewards:
            counts, out = collections.Counter(), {}
            thread = threading.Thread(target=_evaluate, name=f"reward-{reward.name}",
                                      args=(reward, completions, examples, counts, out),
                                      daemon=True)
            thread.start()
            runs.append((reward, thread, counts, out))
        total_B = np.zeros(n, dtype=np.float32)
        scores, metrics = {}, {}
        for reward, thread, counts, out in runs:
            wait = None if reward.timeout_s is None else max(
                0.0, start + reward.timeout_s - time.monotonic())
            thread.join(wait)
            if "scores" in out:
                s = out["scores"]
            else:  # hung, or died without a result: the whole batch scores 0
                hung = thread.is_alive()
                log.warning("reward %s %s", reward.name,
                            f"gave no result within {reward.timeout_s}s" if hung else "died")
                s = np.zeros(n, dtype=np.float32)
                counts = collections.Counter(counts)  # a hung thread still owns the original
                counts["timeouts" if hung else "errors"] += n
            scores[reward.name] = s
            total_B += np.float32(reward.weight) * s
            metrics[f"{reward.name}/mean"] = float(s.mean()) if n else 0.0
            for key in ("errors", "timeouts"):
                metrics[f"{reward.name}/{key}"] = float(counts.get(key, 0))
            for key, value in counts.items():
                metrics[f"{reward.name}/{key}"] = float(value)
        metrics["total/mean"] = float(total_B.mean()) if n else 0.0
        return RewardOutput(total_B, scores, metrics)


def combine(rewards: Mapping[str, RewardFn | tuple[RewardFn, float]], *,
            timeout_s: float | None = 300.0) -> RewardSet:
    """`combine({"accuracy": accuracy_reward, "format": (format_reward, 0.5)})`: weight 1
    unless given."""
    return RewardSet([Reward(name, *(spec if isinstance(spec, tuple) else (spec, 1.0)),
                             timeout_s=timeout_s) for name, spec in rewards.items()])
