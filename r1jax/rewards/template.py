"""Reading the R1 template: reasoning in <think>...</think>, the answer in <answer>...</answer>.

These readers are lenient (they find the parts of a sloppy completion); `format_reward` is
the strict judge of the template itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Tags:
    think: tuple[str, str] = ("<think>", "</think>")
    answer: tuple[str, str] = ("<answer>", "</answer>")

    def __post_init__(self):
        tags = (*self.think, *self.answer)
        if len(tags) != 4 or not all(isinstance(t, str) and t for t in tags):
            raise ValueError(f"tags are two pairs of non-empty strings, got {self}")
        if len(set(tags)) != 4 or any(a in b for a in tags for b in tags if a != b):
            raise ValueError(f"no tag may equal or contain another: {self}")


R1_TAGS = Tags()


def think_text(completion: str, tags: Tags = R1_TAGS) -> str | None:
    """The reasoning: from the first opening think tag (or the start, when the chat template
    prefilled it) to the first closing one. None without a closing tag."""
    open_tag, close_tag = tags.think
    end = completion.find(close_tag)
    if end < 0:
        return None
    start = completion.find(open_tag, 0, end)
    return completion[start + len(open_tag) if start >= 0 else 0:end]


def answer_text(completion: str, tags: Tags = R1_TAGS) -> str | None:
    """The content of the last complete answer block, or None. Only the last block counts,
    so writing several answers never gains anything."""
    open_tag, close_tag = tags.answer
    end = completion.rfind(close_tag)
    if end < 0:
        return None
    start = completion.rfind(open_tag, 0, end)
    if start < 0:
        return None
    return completion[start + len(open_tag):end]


def after_think(completion: str, tags: Tags = R1_TAGS) -> str:
    """The completion without its reasoning: everything after the first closing think tag
    (all of it when there is none)."""
    close_tag = tags.think[1]
    end = completion.find(close_tag)
    return completion if end < 0 else completion[end + len(close_tag):]


_BOXED = re.compile(r"\\(?:boxed|fbox)\b\s*")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces matched), or of `\\boxed 5`; else None."""
    for m in reversed(list(_BOXED.finditer(text))):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{" and text[j - 1] != "\\":
                    depth += 1
                elif text[j] == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j]
            continue  # unbalanced: try an earlier one
        word = re.match(r"[^\s$]+", text[i:])
        if word:
            return word.group(0)
    return None


def final_answer(completion: str, tags: Tags = R1_TAGS) -> str | None:
    """What a rule-based verifier checks: the last `\\boxed{}` inside the answer block if there
    is one, else the whole block, stripped. None without an answer block."""
    answer = answer_text(completion, tags)
    if answer is None:
        return None
    boxed = last_boxed(answer)
    return (boxed if boxed is not None else answer).strip()
