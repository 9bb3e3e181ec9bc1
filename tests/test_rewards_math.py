"""Math accuracy through math-verify in the worker pool: GSM8K gold answers and LaTeX forms."""
import json
import os
import time

import numpy as np
import pytest
from conftest import GSM8K_DIR

from r1jax.rewards import gsm8k_gold, make_math_reward, math_reward, stats
from r1jax.rewards.compose import combine


def r1(answer: str) -> str:
    return f"<think>\nLet me work it out step by step.\n</think>\n<answer>{answer}</answer>"


def test_gsm8k_gold_helper():
    assert gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gsm8k_gold("... #### 1,450,000") == "1450000"
    assert gsm8k_gold("#### -5") == "-5"
    with pytest.raises(ValueError):
        gsm8k_gold("no marker here")


@pytest.fixture(scope="module")
def gsm8k():
    with open(os.path.join(GSM8K_DIR, "test.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1319 and all({"question", "answer"} <= set(r) for r in rows)
    return rows


# The ways a model writes a final answer inside <answer>; the raw string keeps GSM8K's own
# formatting ("1,450,000").
FORMS = ["{raw}", "${raw}$", "\\boxed{{{raw}}}", "{raw} dollars", "${raw}", "{gold}.00",
         "The answer is {raw}.", "$\\boxed{{{gold}}}$"]


def test_every_gsm8k_test_answer_verifies(gsm8k):
    golds = [gsm8k_gold(r["answer"]) for r in gsm8k]
    raws = [r["answer"].rpartition("####")[2].strip() for r in gsm8k]
    examples = [{"prompt": r["question"], "answer": g} for r, g in zip(gsm8k, golds)]
    right = [r1(FORMS[i % len(FORMS)].format(raw=raw, gold=g))
             for i, (raw, g) in enumerate(zip(raws, golds))]
    wrong = [r1(FORMS[i % len(FORMS)].format(raw=f"{int(g) + 1:,}", gold=int(g) + 1))
             for i, g in enumerate(golds)]
    math_reward(right[:1], examples[:1])  # start the pool outside the timing
    t = time.perf_counter()
    scores = math_reward(right, examples)
    elapsed = time.perf_counter() - t
    failed = [(right[i], golds[i]) for i in np.flatnonzero(scores != 1.0)]
    assert not failed, failed[:10]
    scores = math_reward(wrong, examples)
    passed = [(wrong[i], golds[i]) for i in np.flatnonzero(scores != 0.0)]
    assert not passed, passed[:10]
    print(f"GSM8K: {len(right)} items through the pool in {elapsed:.2f}s")


LATEX_CASES = [  # (gold, answer block, expected)
    ("\\frac{14}{3}", "\\frac{14}{3}", 1), ("\\frac{14}{3}", "$\\dfrac{28}{6}$", 1),
    ("\\frac{14}{3}", "14/3", 1), ("\\frac{14}{3}", "4\\frac{2}{3}", 1),
    ("\\frac{14}{3}", "\\boxed{\\frac{14}{3}}", 1), ("\\frac{14}{3}", "\\frac{3}{14}", 0),
    ("\\frac{14}{3}", "4.67", 0),
    ("\\sqrt{2}", "\\sqrt{2}", 1), ("\\sqrt{2}", "$\\sqrt2$", 1), ("\\sqrt{2}", "2^{1/2}", 1),
    ("\\sqrt{2}", "sqrt(2)", 1), ("\\sqrt{2}", "2", 0),
    ("2\\sqrt{3}", "\\sqrt{12}", 1), ("2", "2\\sqrt{3}", 0),  # bare LaTeX is not read as "2"
    ("(1, 3]", "(1, 3]", 1), ("(1, 3]", "$(1,3]$", 1), ("(1, 3]", "\\boxed{(1,3]}", 1),
    ("(1, 3]", "(1, 3)", 0), ("(1, 3]", "[1, 3]", 0),
    ("[-2, \\infty)", "$[-2,\\infty)$", 1),
    ("90^\\circ", "90", 1), ("90^\\circ", "90^\\circ", 1), ("90^\\circ", "$90^{\\circ}$", 1),
    ("90^\\circ", "90 degrees", 1), ("90^\\circ", "45^\\circ", 0),
    ("\\text{Paris}", "Paris", 1), ("\\text{Paris}", "\\text{Paris}", 1),
    ("\\text{Paris}", "London", 0),
    ("x^2+1", "$1 + x^2$", 1), ("x^2+1", "x^{2} + 1", 1), ("x^2+1", "x^2", 0),
    ("\\pi", "\\pi", 1), ("\\pi", "3.14159265", 1), ("\\pi", "3.14", 0),
    ("0.5", "\\frac12", 1), ("0.5", ".5", 1), ("0.5", "50\\%", 1),
    ("\\{1,2\\}", "\\{2, 1\\}", 1), ("\\{1,2\\}", "\\{1\\}", 0),
    ("18", "$18", 1), ("18", "\\$18", 1), ("18", "18 dollars", 1), ("18", "18.00", 1),
    ("18", "$18$", 1), ("18", "x = 18", 1), ("18", "She makes $18 every day.", 1),
    ("18", "-18", 0), ("-5", "\u22125", 1), ("-5", "$-5$", 1), ("-5", "5", 0),
    ("1000", "1,000", 1), ("1000", "$1,000$", 1), ("1000", "\\boxed{1,000}", 1),
    ("1000", "100", 0),
]


def test_latex_and_number_forms():
    examples = [{"prompt": "q", "answer": gold} for gold, _, _ in LATEX_CASES]
    scores = math_reward([r1(a) for _, a, _ in LATEX_CASES], examples)
    wrong = [case for case, s in zip(LATEX_CASES, scores) if s != case[2]]
    assert not wrong


def test_no_answer_block_scores_zero():
    ex = [{"prompt": "q", "answer": "4"}] * 3
    assert math_reward(["<think>4</think>4", "\\boxed{4}", ""], ex).tolist() == [0, 0, 0]


def test_timed_out_item_scores_zero_and_is_counted():
    reward = make_math_reward(timeout_s=1.0)
    ex = [{"prompt": "q", "answer": "18"}] * 3
    before = stats.totals["timeouts"]
    t = time.perf_counter()
    out = combine({"accuracy": reward})(
        [r1("$9^{9^{9^{9}}}$"), r1("18"), r1("$\\sum_{n=1}^{10^{9}} n^{n}$")], ex)
    assert time.perf_counter() - t < 10
    assert out.scores["accuracy"].tolist() == [0, 1, 0]
    assert out.metrics["accuracy/timeouts"] == 2 and stats.totals["timeouts"] - before == 2
