"""Accuracy: one rule-based verifier per task, chosen by `example["task"]`.

Tasks: "arith" and "countdown" (exact verifiers, tasks.py), "code" (the sandbox, code.py;
also chosen when an example has `tests` and no task), anything else is math (math-verify,
math.py). A batch mixing tasks calls each verifier once on its share of the items.

An answer equal to the gold `answer` (whitespace stripped) scores 1 before any verifier runs,
so no parser quirk can fail an exactly right answer; except for Countdown and code, whose
verifiers judge against the numbers or the tests, not against `answer`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from r1jax.rewards.code import code_reward
from r1jax.rewards.math import math_reward
from r1jax.rewards.tasks import arith_reward, countdown_reward
from r1jax.rewards.template import R1_TAGS, Tags, final_answer

__all__ = ["make_accuracy_reward", "accuracy_reward", "task_of"]

RewardFn = Callable[[list[str], list[dict]], np.ndarray]
VERIFIERS: Mapping[str, RewardFn] = {"arith": arith_reward, "countdown": countdown_reward,
                                     "code": code_reward}
NOT_JUDGED_BY_ANSWER = frozenset({"countdown", "code"})


def task_of(example: dict) -> str:
    return example.get("task") or ("code" if example.get("tests") else "math")


def _exact(completion: str, example: dict, tags: Tags) -> bool:
    gold = example.get("answer")
    if gold is None or task_of(example) in NOT_JUDGED_BY_ANSWER:
        return False
    answer = final_answer(completion, tags)
    return bool(answer) and answer.strip() == str(gold).strip()


def make_accuracy_reward(verifiers: Mapping[str, RewardFn] = VERIFIERS,
                         default: RewardFn = math_reward, *, tags: Tags = R1_TAGS):
    def accuracy_reward(completions: list[str], examples: list[dict]) -> np.ndarray:
        if len(completions) != len(examples):
            raise ValueError("completions and examples differ in length")
        scores = np.zeros(len(completions), dtype=np.float32)
        by_fn: dict[int, tuple[RewardFn, list[int]]] = {}
        for i, ex in enumerate(examples):
            if _exact(completions[i], ex, tags):
                scores[i] = 1.0
                continue
            fn = verifiers.get(task_of(ex), default)
            by_fn.setdefault(id(fn), (fn, []))[1].append(i)
        for fn, idx in by_fn.values():
            scores[idx] = fn([completions[i] for i in idx], [examples[i] for i in idx])
        return scores

    return accuracy_reward


accuracy_reward = make_accuracy_reward()
