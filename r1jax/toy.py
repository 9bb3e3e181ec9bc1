"""The embedded default task: multi-term sums with an exact verifier, and the base corpus.

A problem is "Compute 8+7+3+9+6" with gold answer "33" (task "arith", checked exactly by
r1jax.rewards). The base model is pretrained on a corpus that mixes three behaviours, as
a web-scale base model would have seen them:
- step-by-step work in `<think>`, then the answer: always right (but rare in the corpus),
- short direct answers with no reasoning: often wrong, more so the more terms,
- badly formatted replies (no tags, tags out of order, unclosed tags), most of them with
  the right working in them.
R1-Zero's accuracy and format rewards should teach the policy to choose the first.
"""
import dataclasses

import numpy as np

from r1jax.tokenizer import r1_zero_prompt


@dataclasses.dataclass(frozen=True)
class ToyTask:
    min_terms: int = 3
    max_terms: int = 6
    min_value: int = 1
    max_value: int = 9
    # Share of each behaviour in the base corpus: step-by-step, direct, badly formatted.
    mix: tuple[float, float, float] = (0.15, 0.35, 0.5)
    # Chance that a direct answer is right, for min_terms ... max_terms terms.
    direct_accuracy: tuple[float, ...] = (0.4, 0.2, 0.1, 0.05)

    def __post_init__(self):
        if not 2 <= self.min_terms <= self.max_terms:
            raise ValueError(f"need 2 <= min_terms <= max_terms, got {self.min_terms}, {self.max_terms}")
        if len(self.direct_accuracy) != self.max_terms - self.min_terms + 1:
            raise ValueError("direct_accuracy needs one entry per number of terms "
                             f"({self.min_terms}..{self.max_terms}), got {self.direct_accuracy}")
        if len(self.mix) != 3 or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ValueError(f"mix needs three non-negative shares, got {self.mix}")


def question(terms: list[int]) -> str:
    return "Compute " + "+".join(str(t) for t in terms)


def make_problem(task: ToyTask, rng: np.random.Generator) -> dict:
    k = int(rng.integers(task.min_terms, task.max_terms + 1))
    terms = [int(x) for x in rng.integers(task.min_value, task.max_value + 1, size=k)]
    return {"prompt": question(terms), "answer": str(sum(terms)), "task": "arith", "terms": terms}


def problems(task: ToyTask, n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """`n` distinct problems; the eval split passes the train prompts as `exclude`."""
    rng = np.random.default_rng(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        p = make_problem(task, rng)
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            out.append(p)
    return out


def cot_work(terms: list[int]) -> tuple[str, int]:
    """The step-by-step running sum, "8+1=9. 9+4=13.", and the total."""
    steps, total = [], terms[0]
    for t in terms[1:]:
        steps.append(f"{total}+{t}={total + t}.")
        total += t
    return " ".join(steps), total


def cot_completion(terms: list[int]) -> str:
    work, total = cot_work(terms)
    return f" <think> {work} </think> <answer> {total} </answer>"


def _wrong(value: int, rng: np.random.Generator) -> int:
    delta = int(rng.integers(1, 6)) * (1 if rng.random() < 0.5 else -1)
    return abs(value + delta)


def direct_completion(task: ToyTask, terms: list[int], rng: np.random.Generator) -> str:
    p_right = task.direct_accuracy[len(terms) - task.min_terms]
    value = sum(terms) if rng.random() < p_right else _wrong(sum(terms), rng)
    return f" <answer> {value} </answer>"


def bad_completion(terms: list[int], rng: np.random.Generator) -> str:
    """Replies that break the template (no answer block to check); most hold the right working."""
    work, total = cot_work(terms)
    choices = [
        f" Let me add them up. {work} So the answer is {total}.",
        f" <think> {work} </think> {total}",
        f" <think> {work} </think> The answer is {total}.",
        f" <think> {work} <answer> {total}",
        f" The answer is {_wrong(total, rng) if rng.random() < 0.7 else total}.",
    ]
    return choices[int(rng.integers(len(choices)))]


def base_corpus(task: ToyTask, problems_: list[dict], seed: int) -> list[tuple[str, str]]:
    """(prompt text, completion text) pairs for pretraining the toy base model."""
    rng = np.random.default_rng(seed)
    out = []
    for p in problems_:
        kind = rng.choice(3, p=np.asarray(task.mix) / sum(task.mix))
        if kind == 0:
            completion = cot_completion(p["terms"])
        elif kind == 1:
            completion = direct_completion(task, p["terms"], rng)
        else:
            completion = bad_completion(p["terms"], rng)
        out.append((r1_zero_prompt(p["prompt"]), completion))
    return out
