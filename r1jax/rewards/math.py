"""Math accuracy: the completion's final answer checked against the gold answer with math-verify.

math-verify bounds its work with SIGALRM, which only works in a main thread, so every item
runs in a worker process of a persistent pool (see pool.py): inside the worker our own
interval timer bounds parse + verify (`timeout_s`); a worker that ignores it (stuck in C)
is killed after `timeout_s + 2` and replaced. Either way the item scores 0 and is counted
as a timeout; a crashed worker counts as an error.

What is checked: the last `\\boxed{}` inside <answer>, else the whole answer block (no
answer block scores 0: the template is part of the task); the gold is read as
`\\boxed{gold}`. math-verify finds answers in LaTeX delimiters (`$...$`, `\\(...\\)`,
`\\[...\\]`) or as plain numbers and expressions, but bare LaTeX such as `2\\sqrt{3}`
would be read as "2" and bare words as nothing, so (see `_candidates`) bare LaTeX and short
answers are wrapped in `$...$` first, prose is tried as-is first, and the first reading that
parses is the one verified: a later reading never rescues a wrong first one. Numbers with a
currency sign, thousands commas, decimals, % or unit words ("$1,000", "18 dollars",
"18.00") go to math-verify's plain-number reader as they are.
"""

from __future__ import annotations

import functools
import re
import signal
import threading

import numpy as np

from r1jax.rewards import stats
from r1jax.rewards.pool import OK, TIMEOUT, WorkerPool
from r1jax.rewards.template import R1_TAGS, Tags, final_answer

__all__ = ["make_math_reward", "math_reward", "verify_answer", "gsm8k_gold", "math_pool"]

_HARD_GRACE_S = 2.0


def gsm8k_gold(answer_field: str) -> str:
    """GSM8K's `answer` field ends with "#### 1,234": return "1234"."""
    head, sep, gold = answer_field.rpartition("####")
    if not sep or not gold.strip():
        raise ValueError(f"no '#### <answer>' in GSM8K answer field: {answer_field[-80:]!r}")
    return gold.strip().replace(",", "")


# A number, optionally with a currency sign, thousands commas, decimals, %, or unit words:
# "$18", "\$1,000.50", "18 dollars", "-5", "18.00", "25%". math-verify's plain-expression
# reader handles these; wrapped in $...$ the unit words would become symbols.
_NUMBER_LIKE = re.compile(
    r"^(?:\\?\$\s*)?-?\s*(?:\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))(?:\.\d+)?\s*"
    r"(?:\\?%|[A-Za-z][A-Za-z .'/-]*)?\s*\.?$")
_LATEXISH = re.compile(r"[\\^_{}]")


def _candidates(answer: str) -> list[str]:
    a = answer.strip().replace("\u2212", "-").replace("\u2013", "-")
    a = re.sub(r"\\\$(?=\s*[-\d.])", "", a)  # a LaTeX-escaped currency sign: "\$18"
    if a.endswith(".") and not a.endswith(".."):
        a = a[:-1].rstrip()
    if _NUMBER_LIKE.match(a):
        return [a.replace("\\%", "%")]
    if "$" in a or "\\(" in a or "\\[" in a:
        return [a]
    if _LATEXISH.search(a) or len(a.split()) <= 4:
        return [f"${a}$", a]
    return [a, f"${a}$"]


def _gold_text(gold: str) -> str:
    gold = gold.strip()
    return gold if "$" in gold or "\\boxed" in gold else f"\\boxed{{{gold}}}"


class _ItemTimeout(BaseException):
    """BaseException, so math-verify's `except Exception` cannot swallow it."""


def _on_alarm(signum, frame):
    raise _ItemTimeout


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    from math_verify import parse
    return parse(_gold_text(gold), parsing_timeout=None)


def verify_answer(answer: str, gold: str, timeout_s: float = 5.0) -> float | None:
    """1.0 if `answer` (the text of an answer block) matches `gold`, else 0.0; None on timeout.

    Uses SIGALRM: call it in a main thread (the pool's workers do)."""
    from math_verify import parse, verify
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        gold_parsed = _parse_gold(gold)
        if not gold_parsed:
            return 0.0
        for text in _candidates(answer):
            pred = parse(text, parsing_timeout=None)
            if any(not isinstance(p, str) for p in pred):
                return float(verify(gold_parsed, pred, timeout_seconds=None))
        return 0.0
    except _ItemTimeout:
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _init_worker():
    import logging
    # We bound time ourselves, so math-verify's "timeout is disabled" warning is noise.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    verify_answer("$\\frac{1}{2}$", "0.5")  # import sympy and compile regexes before "ready"


_POOL: WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def math_pool() -> WorkerPool:
    """The process-wide pool for math verification; its workers start on first use."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = WorkerPool(initializer=_init_worker)
        return _POOL


def make_math_reward(*, tags: Tags = R1_TAGS, timeout_s: float = 5.0,
                     pool: WorkerPool | None = None):
    def math_reward(completions: list[str], examples: list[dict]) -> np.ndarray:
        scores = np.zeros(len(completions), dtype=np.float32)
        todo, args = [], []
        for i, (completion, example) in enumerate(zip(completions, examples, strict=True)):
            answer = final_answer(completion, tags)
            if answer:
                todo.append(i)
                args.append((answer, str(example["answer"]), timeout_s))
        outcomes = (pool or math_pool()).map(verify_answer, args, timeout_s + _HARD_GRACE_S)
        n_timeouts = n_errors = 0
        for i, (status, value) in zip(todo, outcomes):
            if status == OK and value is not None:
                scores[i] = value
            elif status == TIMEOUT or (status == OK and value is None):
                n_timeouts += 1
            else:
                n_errors += 1
        stats.count("timeouts", n_timeouts)
        stats.count("errors", n_errors)
        return scores

    return math_reward


math_reward = make_math_reward()
