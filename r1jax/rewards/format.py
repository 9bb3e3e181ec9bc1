"""Format reward: 1.0 for a completion that follows the R1 template exactly, else 0.0.

The template, with the default tags:

    <think> reasoning </think> <answer> answer </answer>

Rules, each a choice the tests pin down:
- only whitespace before the opening think tag: R1-Zero's prompt ends with "Assistant:", so
  the completion starts with the tag. With `think_prefilled=True` (chat templates such as
  DeepSeek-R1-Distill's and Qwen3's end the prompt with "<think>\\n") the completion starts
  inside the reasoning and must not open it again;
- each tag exactly once, in the order above: a missing, repeated or nested tag scores 0;
- only whitespace between the closing think tag and the opening answer tag, and after the
  closing answer tag (decode without special tokens: a trailing EOS string scores 0);
- the reasoning and the answer are not empty (whitespace counts as empty). An empty think
  block satisfies the letter of the template but not its purpose: R1's gains come from the
  reasoning, and rewarding `<think></think>` lets GRPO collapse to answering without any.
"""

from __future__ import annotations

import re

import numpy as np

from r1jax.rewards.template import R1_TAGS, Tags

__all__ = ["make_format_reward", "format_reward"]


def make_format_reward(tags: Tags = R1_TAGS, *, think_prefilled: bool = False):
    t_open, t_close = tags.think
    a_open, a_close = tags.answer
    required = (t_close, a_open, a_close) if think_prefilled else (t_open, t_close, a_open, a_close)
    start = r"\A" if think_prefilled else r"\A\s*" + re.escape(t_open)
    pattern = re.compile(
        start + r"(?P<think>.*?)" + re.escape(t_close) + r"\s*" + re.escape(a_open)
        + r"(?P<answer>.*?)" + re.escape(a_close) + r"\s*\Z", re.DOTALL)

    def one(completion: str) -> float:
        if t_open in completion and think_prefilled:
            return 0.0
        if any(completion.count(t) != 1 for t in required):
            return 0.0
        m = pattern.match(completion)
        return float(bool(m and m["think"].strip() and m["answer"].strip()))

    def format_reward(completions: list[str], examples: list[dict]) -> np.ndarray:
        del examples  # the template does not depend on the question
        return np.array([one(c) for c in completions], dtype=np.float32)

    return format_reward


format_reward = make_format_reward()
