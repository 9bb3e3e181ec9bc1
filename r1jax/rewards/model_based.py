"""Model-based rewards (R1's last RL stage): adaptors from a scorer to the reward contract.

A scorer maps (prompts, texts) to one float per pair; the real one is a Flax model with a
scalar head, built elsewhere (this package imports no jax). What each reward shows it:
- helpfulness: the prompt and ONLY the final answer (the <answer> block, else the text after
  </think>): R1 "focuses exclusively on the final summary", so the reasoning is not judged;
- harmlessness: the prompt and the whole response, reasoning included. R1 (section 2.3.4)
  judges "the entire response of the model, including both the reasoning process and the
  summary" for harmlessness; pass view="answer" to judge only the answer instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import numpy as np

from r1jax.rewards.template import R1_TAGS, Tags, after_think, answer_text

__all__ = ["Scorer", "make_model_reward", "helpfulness_reward", "harmlessness_reward",
           "final_response"]


class Scorer(Protocol):
    def __call__(self, prompts: list[str], texts: list[str]) -> np.ndarray:
        """One score per (prompt, text) pair, shape (len(prompts),)."""


def final_response(completion: str, tags: Tags = R1_TAGS) -> str:
    """The part a helpfulness judge sees: the answer block, else everything after the
    reasoning, stripped."""
    answer = answer_text(completion, tags)
    return (answer if answer is not None else after_think(completion, tags)).strip()


def make_model_reward(score_fn: Scorer, *, view: Literal["answer", "full"] = "answer",
                      batch_size: int | None = None, tags: Tags = R1_TAGS,
                      transform: Callable[[np.ndarray], np.ndarray] | None = None):
    """A reward that calls `score_fn(prompts, texts)` in batches of `batch_size` (all at once
    by default). `view`: "answer" shows the final response only, "full" the whole completion.
    `transform` maps raw scores to rewards (e.g. a sigmoid, or a shift to mean 0)."""
    if view not in ("answer", "full"):
        raise ValueError(f"view is 'answer' or 'full', got {view!r}")

    def model_reward(completions: list[str], examples: list[dict]) -> np.ndarray:
        if len(completions) != len(examples):
            raise ValueError("completions and examples differ in length")
        prompts = [str(ex["prompt"]) for ex in examples]
        texts = [final_response(c, tags) if view == "answer" else c for c in completions]
        step = batch_size or max(1, len(texts))
        scores = np.concatenate([np.asarray(score_fn(prompts[i:i + step], texts[i:i + step]),
                                            dtype=np.float32).reshape(-1)
                                 for i in range(0, len(texts), step)] or [np.zeros(0)])
        if scores.shape != (len(completions),):
            raise ValueError(f"scorer returned {scores.shape[0]} scores for "
                             f"{len(completions)} completions")
        return (transform(scores) if transform else scores).astype(np.float32)

    return model_reward


def helpfulness_reward(score_fn: Scorer, *, batch_size: int | None = None,
                       tags: Tags = R1_TAGS,
                       transform: Callable[[np.ndarray], np.ndarray] | None = None):
    return make_model_reward(score_fn, view="answer", batch_size=batch_size, tags=tags,
                             transform=transform)


def harmlessness_reward(score_fn: Scorer, *, view: Literal["answer", "full"] = "full",
                        batch_size: int | None = None, tags: Tags = R1_TAGS,
                        transform: Callable[[np.ndarray], np.ndarray] | None = None):
    return make_model_reward(score_fn, view=view, batch_size=batch_size, tags=tags,
                             transform=transform)
