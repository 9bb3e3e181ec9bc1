"""Language consistency: share of CoT words in the target language (lingua)."""
import time

import pytest

from r1jax.rewards import language_consistency_reward, language_word_counts

EN = ("Let me think about this problem carefully. Janet's ducks lay 16 eggs per day, and she "
      "eats three of them for breakfast every morning. She bakes muffins with four more, so "
      "$16 - 3 - 4 = 9$ eggs are left to sell. Each egg sells for two dollars, so she makes "
      "9 times 2, which is 18 dollars every day. Let x be the daily income; then x = 18.")
ZH = "首先计算剩下的鸭蛋数量，然后乘以每个鸭蛋的价格。所以她每天赚十八美元。"
FR = ("Nous devons d'abord calculer le nombre d'oeufs qui restent chaque jour, puis le "
      "multiplier par le prix de chaque oeuf vendu au marché.")
EX_EN = {"prompt": "Janet's ducks lay 16 eggs per day. How much does she make every day?",
         "answer": "18"}
EX_ZH = {"prompt": "珍妮的鸭子每天下16个蛋。她每天在农贸市场赚多少钱？", "answer": "18"}


def score(cot, example):
    return float(language_consistency_reward([f"<think>{cot}</think><answer>18</answer>"],
                                             [example])[0])


def test_single_language_cot_scores_one():
    assert score(EN, EX_EN) == 1.0
    assert score(ZH, EX_ZH) == 1.0


def test_wrong_language_scores_zero():
    assert score(ZH, EX_EN) == 0.0
    assert score(EN, EX_ZH) == 0.0


def test_mixed_cot_scores_the_target_share():
    mixed = EN + ZH + EN
    n_en = 2 * sum(language_word_counts(EN).values())
    n_zh = sum(language_word_counts(ZH).values())
    assert score(mixed, EX_EN) == pytest.approx(n_en / (n_en + n_zh), abs=1e-6)
    assert score(mixed, EX_ZH) == pytest.approx(n_zh / (n_en + n_zh), abs=1e-6)
    assert 0.0 < score(EN + " " + FR, EX_EN) < 1.0   # same script, other language


def test_explicit_language_overrides_the_prompt():
    assert score(ZH, {**EX_EN, "language": "zh"}) == 1.0
    assert score(ZH, {**EX_EN, "language": "Chinese"}) == 1.0
    assert score(EN, {**EX_ZH, "language": "en"}) == 1.0
    with pytest.raises(ValueError):
        score(EN, {**EX_EN, "language": "klingon"})


def test_word_counting_ignores_math_and_variables():
    counts = language_word_counts("Let $x = \\frac{a}{b}$ and y be 3 \\cdot 4 = 12 apples.")
    assert sum(counts.values()) == 4  # Let, and, be, apples
    assert sum(language_word_counts("首先计算").values()) == 4  # one word per character


def test_edge_cases():
    assert score("", EX_EN) == 0.0                       # empty think
    assert score("2 + 2 = 4", EX_EN) == 0.0              # no words
    no_think = language_consistency_reward(["just an answer"], [EX_EN])[0]
    assert no_think == 0.0
    # A prompt without words has no language: the CoT's majority language is the target.
    assert score(EN, {"prompt": "12 * 7 = ?"}) == 1.0


def test_speed_of_long_cots():
    cot = (EN + " ") * 60  # ~25k characters, ~5k words
    language_consistency_reward([f"<think>{EN}</think>"], [EX_EN])  # load models
    t = time.perf_counter()
    language_consistency_reward([f"<think>{cot}</think>"] * 8, [EX_EN] * 8)
    per_cot = (time.perf_counter() - t) / 8
    print(f"language consistency: {per_cot * 1e3:.1f} ms per {len(cot)}-char CoT")
    assert per_cot < 0.5
