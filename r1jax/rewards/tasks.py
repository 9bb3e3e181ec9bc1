"""Exact verifiers for the built-in tasks: toy arithmetic and Countdown.

arith:     example {"task": "arith", "answer": "42"}; the answer block must hold one integer
           (after removing `$`, `\\boxed{}`, thousands commas and a zero fraction "42.00").
countdown: example {"task": "countdown", "numbers": [...], "target": int}; the answer is an
           expression using each given number exactly once with + - * / and parentheses,
           equal to the target. "expr = target" is accepted when the right side equals the
           target. Unary minus, powers, floats, names and calls are rejected. The expression
           is evaluated by a tiny AST walker over Fractions, never `eval`: 7/2 is 7/2, and
           dividing by zero scores 0.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction

import numpy as np

from r1jax.rewards.template import R1_TAGS, Tags, final_answer

__all__ = ["make_arith_reward", "arith_reward", "make_countdown_reward", "countdown_reward",
           "safe_arith_eval", "parse_integer"]

_MAX_EXPR_CHARS = 200  # a Countdown expression over 6 numbers is ~30 chars
_LATEX_OPS = {r"\times": "*", r"\cdot": "*", r"\div": "/", "×": "*", "·": "*", "÷": "/",
              "−": "-", "–": "-", r"\left": "", r"\right": "", "$": "", r"\(": "", r"\)": "",
              r"\[": "", r"\]": "", "{": "(", "}": ")"}
_INTEGER = re.compile(r"([-+]?)\s*(\d{1,3}(?:,\d{3})+|\d+)(?:\.0*)?")


def _plain(text: str) -> str:
    for k, v in _LATEX_OPS.items():
        text = text.replace(k, v)
    return text.strip().rstrip(".").strip()


def parse_integer(text: str) -> int | None:
    """'$-1,234.00$' -> -1234; anything that is not exactly one integer -> None."""
    m = _INTEGER.fullmatch(_plain(text))
    return int(m[1] + m[2].replace(",", "")) if m else None


class _Rejected(ValueError):
    pass


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def safe_arith_eval(expr: str) -> tuple[Fraction, list[int]]:
    """Evaluate + - * / over non-negative integer literals and parentheses, exactly.

    Returns (value, the integer literals in order). Raises ValueError for anything else
    (names, calls, attributes, powers, unary operators, floats, over-long input) and
    ZeroDivisionError for a division by zero."""
    if len(expr) > _MAX_EXPR_CHARS:
        raise _Rejected("expression too long")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, MemoryError, RecursionError) as e:
        raise _Rejected(f"not an expression: {e}") from None
    literals: list[int] = []

    def walk(node) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        if (isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0):
            literals.append(node.value)
            return Fraction(node.value)
        raise _Rejected(f"{type(node).__name__} is not allowed")

    return walk(tree.body), literals


def _countdown_one(answer: str | None, numbers, target) -> float:
    if not answer:
        return 0.0
    parts = _plain(answer).split("=")
    if len(parts) > 2:
        return 0.0
    try:
        value, used = safe_arith_eval(parts[0].strip())
        if len(parts) == 2 and parse_integer(parts[1]) != int(target):
            return 0.0
    except (ValueError, ZeroDivisionError):
        return 0.0
    return float(Counter(used) == Counter(int(n) for n in numbers) and value == int(target))


def make_countdown_reward(*, tags: Tags = R1_TAGS):
    def countdown_reward(completions: list[str], examples: list[dict]) -> np.ndarray:
        return np.array([_countdown_one(final_answer(c, tags), ex["numbers"], ex["target"])
                         for c, ex in zip(completions, examples, strict=True)], dtype=np.float32)
    return countdown_reward


def make_arith_reward(*, tags: Tags = R1_TAGS):
    def arith_reward(completions: list[str], examples: list[dict]) -> np.ndarray:
        out = []
        for c, ex in zip(completions, examples, strict=True):
            answer = final_answer(c, tags)
            pred = parse_integer(answer) if answer else None
            out.append(float(pred is not None and pred == parse_integer(str(ex["answer"]))))
        return np.array(out, dtype=np.float32)
    return arith_reward


countdown_reward = make_countdown_reward()
arith_reward = make_arith_reward()
