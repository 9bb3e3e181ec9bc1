"""Exact verifiers for the built-in tasks (arith, countdown) and the accuracy dispatcher."""
from fractions import Fraction

import pytest

from r1jax.rewards import (
    accuracy_reward,
    arith_reward,
    countdown_reward,
    parse_integer,
    safe_arith_eval,
)


def r1(answer: str) -> str:
    return f"<think>work</think><answer>{answer}</answer>"


@pytest.mark.parametrize("answer, expected", [
    ("42", 1), (" 42 ", 1), ("$42$", 1), ("\\boxed{42}", 1), ("42.00", 1), ("42.", 1),
    ("+42", 1), ("41", 0), ("42.5", 0), ("4 2", 0), ("x = 42", 0), ("forty-two", 0), ("", 0),
])
def test_arith(answer, expected):
    assert arith_reward([r1(answer)], [{"task": "arith", "answer": "42"}])[0] == expected


def test_arith_negative_and_commas():
    ex = [{"task": "arith", "answer": "-1234"}] * 4
    out = arith_reward([r1("-1,234"), r1("\u22121234"), r1("$-1,234.0$"), r1("1234")], ex)
    assert out.tolist() == [1, 1, 1, 0]
    assert parse_integer("1,23") is None  # not a thousands grouping


CD = {"task": "countdown", "numbers": [3, 5, 7, 2], "target": 24}


@pytest.mark.parametrize("answer, expected", [
    ("(7 - 5 + 2) * 3 + 0 * 0", 0),     # 0s are not given numbers
    ("(7 - 5) * 3 * 2 + 0", 0),
    ("3 * (7 + 5) / 2 + 2 - 2", 0),     # 2 used twice
    ("(7 + 5) * (3 - 2) * 2", 0),       # 2 used twice
    ("(5 - 3 + 2) * 7 - 4", 0),         # 4 is not given
    ("3 * (5 + 7 - 2) * 1", 0),
    ("(7 + 5 - 2) * 3 - 6", 0),
    ("3 * 5 + 7 + 2", 1),               # 15 + 7 + 2 = 24
    ("$3 \\times 5 + 7 + 2$", 1),
    ("\\boxed{2 + 7 + 5 \\cdot 3}", 1),
    ("3*5+7+2 = 24", 1),
    ("3*5+7+2 = 25", 0),
    ("3*5+7", 0),                        # 2 unused
    ("3*5+7+2+2", 0),                    # 2 used twice
    ("(3+5)*(7-2)", 0),                  # 40
    ("7/(5-3-2)", 0),                    # division by zero
    ("3**5", 0), ("2**2**2**2**2**2**2**2", 0),   # powers are refused, huge ones too
    ("__import__('os').system('true')", 0),
    ("().__class__.__bases__[0].__subclasses__()", 0),
    ("open('/etc/passwd').read()", 0),
    ("-3*-5+7+2", 0),                    # unary minus is refused
    ("3.0*5+7+2", 0),                    # floats are refused
    ("(" * 300 + "3" + ")" * 300, 0),    # over-long / over-nested
    ("lambda: 1", 0), ("", 0),
])
def test_countdown(answer, expected):
    assert countdown_reward([r1(answer)], [CD])[0] == expected


def test_countdown_exact_division():
    ex = {"task": "countdown", "numbers": [7, 2, 4], "target": 14}
    assert countdown_reward([r1("7 / 2 * 4"), r1("7 * 4 / 2"), r1("(7 // 2) * 4")],
                            [ex] * 3).tolist() == [1, 1, 0]   # 7/2 is 7/2, not 3


def test_safe_arith_eval():
    assert safe_arith_eval("(1 + 2) * 3 / 4") == (Fraction(9, 4), [1, 2, 3, 4])
    for bad in ["2 ** 100000", "9 ** 9 ** 9", "x + 1", "f(1)", "[1][0]", "1 if 1 else 2",
                "1 << 1000000", "1; 2", "'a' * 10", "True + 1", "a.b"]:
        with pytest.raises(ValueError):
            safe_arith_eval(bad)
    with pytest.raises(ZeroDivisionError):
        safe_arith_eval("1 / (2 - 2)")


def test_accuracy_dispatches_on_task():
    examples = [{"task": "arith", "answer": "7"}, CD, {"prompt": "q", "answer": "\\frac{1}{2}"},
                {"task": "code", "tests": ["assert f() == 1"]}]
    completions = [r1("7"), r1("3*5+7+2"), r1("0.5"),
                   r1("```python\ndef f():\n    return 1\n```")]
    assert accuracy_reward(completions, examples).tolist() == [1, 1, 1, 1]
    wrong = [r1("8"), r1("3*5+7"), r1("2"), r1("```python\ndef f():\n    return 2\n```")]
    assert accuracy_reward(wrong, examples).tolist() == [0, 0, 0, 0]
