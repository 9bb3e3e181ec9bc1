"""The R1 recipe's built-in task: shares, correctness, language scores, splits, chat-template parity."""
import re

import numpy as np
import pytest

from r1jax import sft_data, toy, toy_r1
from r1jax.rewards import accuracy_reward, format_reward, make_language_consistency_reward
from r1jax.tokenizer import r1_zero_prompt, train_sentencepiece

TASK = toy_r1.R1ToyTask()
LANG = make_language_consistency_reward(languages=("english", "chinese"))
STEP = re.compile(r"(\d+) plus (\d+) makes (\d+)\.|(\d+) 加 (\d+) 得 (\d+)。")
COT = re.compile(r" <think> (.*) </think> <answer> (\d+) </answer>")


@pytest.fixture(scope="module")
def data():
    probs = toy_r1.problems(TASK, 4000, seed=0)
    general = toy_r1.general_prompts(200, seed=0)
    return probs, general, toy_r1.base_corpus(TASK, probs, general, seed=1)


def _question(prompt_text):
    return prompt_text.split("User: ", 1)[1].rsplit(". Assistant:", 1)[0]


def _steps(text):
    """[(a, b, c, language)] of each step of the working in `text`."""
    return [(int(m[1]), int(m[2]), int(m[3]), "en") if m[1] else (int(m[4]), int(m[5]), int(m[6]), "zh")
            for m in STEP.finditer(text)]


def _check_working(text, terms):
    steps = _steps(text)
    assert [b for _, b, _, _ in steps] == terms[1:]
    running = terms[0]
    for a, b, c, _ in steps:
        assert (a, c) == (running, running + b)
        running = c


def test_config_is_validated():
    with pytest.raises(ValueError, match="languages"):
        toy_r1.R1ToyTask(languages=(0.5, 0.5))
    with pytest.raises(ValueError, match="general_mix"):
        toy_r1.R1ToyTask(general_mix=(1.0, -0.1, 0.1))
    with pytest.raises(ValueError, match="general_share"):
        toy_r1.R1ToyTask(general_share=1.0)
    with pytest.raises(ValueError, match="min_terms >= 3"):
        toy_r1.R1ToyTask(arith=toy.ToyTask(min_terms=2, direct_accuracy=(0.5,) * 5))
    toy_r1.R1ToyTask(arith=toy.ToyTask(min_terms=2, direct_accuracy=(0.5,) * 5), languages=(1, 1, 0))


def test_deterministic_from_seeds(data):
    probs, general, corpus = data
    assert toy_r1.problems(TASK, 4000, seed=0) == probs
    assert toy_r1.general_prompts(200, seed=0) == general
    assert toy_r1.base_corpus(TASK, probs, general, seed=1) == corpus
    assert toy_r1.base_corpus(TASK, probs, general, seed=2) != corpus
    for make in (toy_r1.cold_start_records, toy_r1.general_sft_records, toy_r1.preference_pairs):
        records = probs[:50] if make is toy_r1.cold_start_records else general
        assert make(records, seed=3) == make(records, seed=3)
    assert toy_r1.general_sft_records(general, 3) != toy_r1.general_sft_records(general, 4)
    assert all(p["language"] == "en" and p["task"] == "arith" for p in probs)


def _within(count, n, p, sigmas=4.0):
    assert abs(count / n - p) <= sigmas * np.sqrt(p * (1 - p) / n), (count, n, p)


def test_corpus_shares(data):
    probs, general, corpus = data
    by_prompt = {g["prompt"]: g for g in general}
    n_general = round(len(probs) * TASK.general_share / (1 - TASK.general_share))
    assert len(corpus) == len(probs) + n_general
    kinds, langs, quality, directions = [], [], [], []
    for prompt, c in corpus:
        if (g := by_prompt.get(_question(prompt))) is not None:
            plain = " <think> {} </think> <answer> {} </answer>".format(*toy_r1.INTENTS[g["intent"]][3])
            quality.append("good" if g["name"] in c else "plain" if c == plain else "rude")
        elif re.fullmatch(r" <answer> \d+ </answer>", c):
            kinds.append("direct")
        elif COT.fullmatch(c):
            kinds.append("cot")
            step_langs = [s[3] for s in _steps(c)]
            langs.append(step_langs[0] if len(set(step_langs)) == 1 else "mixed")
            if langs[-1] == "mixed":
                directions.append(step_langs[0])
        else:
            kinds.append("bad")
    assert len(quality) == n_general and len(kinds) == len(probs)
    mix = np.asarray(TASK.arith.mix) / sum(TASK.arith.mix)
    for kind, p in zip(("cot", "direct", "bad"), mix):
        _within(kinds.count(kind), len(kinds), p)
    for lang, p in zip(toy_r1.COT_LANGUAGES, np.asarray(TASK.languages) / sum(TASK.languages)):
        _within(langs.count(lang), len(langs), p)
    _within(directions.count("en"), len(directions), 0.5)
    for q, p in zip(toy_r1.QUALITIES, np.asarray(TASK.general_mix) / sum(TASK.general_mix)):
        _within(quality.count(q), len(quality), p)


def test_every_cot_is_right_and_scores_one(data):
    probs, _, corpus = data
    rng = np.random.default_rng(0)
    for lang in toy_r1.COT_LANGUAGES:
        cots = [toy_r1.cot_completion(p["terms"], lang, rng) for p in probs[:300]]
        for c, p in zip(cots, probs):
            _check_working(c, p["terms"])
        np.testing.assert_array_equal(format_reward(cots, probs[:300]), 1.0)
        np.testing.assert_array_equal(accuracy_reward(cots, probs[:300]), 1.0)
    cold = toy_r1.cold_start_records(probs[:300], seed=0)
    cold_texts = [r["messages"][1]["content"] for r in cold]
    assert [r["messages"][0]["content"] for r in cold] == [p["prompt"] for p in probs[:300]]
    np.testing.assert_array_equal(accuracy_reward(cold_texts, probs[:300]), 1.0)
    np.testing.assert_array_equal(LANG(cold_texts, probs[:300]), 1.0)
    # The base corpus: all working (CoT or badly formatted) is right; only CoT lines pass the format check.
    by_prompt = {r1_zero_prompt(p["prompt"]): p for p in probs}
    for prompt, c in corpus[:1500]:
        if prompt in by_prompt and _steps(c):
            _check_working(c, by_prompt[prompt]["terms"])


def test_language_consistency_scores(data):
    probs = data[0][:200]
    rng = np.random.default_rng(1)
    en = [toy_r1.cot_completion(p["terms"], "en") for p in probs]
    zh = [toy_r1.cot_completion(p["terms"], "zh") for p in probs]
    mixed = [toy_r1.cot_completion(p["terms"], "mixed", rng) for p in probs]
    np.testing.assert_array_equal(LANG(en, probs), 1.0)
    np.testing.assert_array_equal(LANG(zh, probs), 0.0)
    scores = LANG(mixed, probs)
    assert np.all((scores > 0) & (scores < 1))
    # Both languages spend two words per step, so the score is the share of English steps.
    share = [np.mean([s[3] == "en" for s in _steps(c)]) for c in mixed]
    np.testing.assert_allclose(scores, share, rtol=1e-6)
    # Either direction, switching at any step boundary, equally often.
    many = [_steps(toy_r1.cot_completion([1] * 5, "mixed", rng)) for _ in range(4000)]
    _within(sum(s[0][3] == "en" for s in many), len(many), 0.5)
    switches = [next(i for i in range(1, 4) if s[i][3] != s[0][3]) for s in many]
    for i in range(1, 4):
        _within(switches.count(i), len(many), 1 / 3)
    # Badly formatted replies keep their working's language.
    bad = [toy_r1.bad_completion(p["terms"], "zh", rng) for p in probs]
    assert all("plus" not in b and "The answer" not in b for b in bad)


def test_general_prompts_and_replies():
    train = toy_r1.general_prompts(240, seed=0)
    held_out = toy_r1.general_prompts(40, seed=1, exclude=frozenset(g["prompt"] for g in train))
    assert len({g["prompt"] for g in train}) == 240 and len({g["prompt"] for g in held_out}) == 40
    assert not {g["prompt"] for g in train} & {g["prompt"] for g in held_out}
    assert all(g["task"] == "general" and g["answer"] == "" and g["language"] == "en" for g in train)
    with pytest.raises(ValueError, match="combinations"):
        toy_r1.general_prompts(len(toy_r1.INTENTS) * len(toy_r1.NAMES) - 240 + 1, seed=1,
                               exclude=frozenset(g["prompt"] for g in train))
    rng = np.random.default_rng(0)
    replies = {q: [toy_r1.general_reply(g, q, rng) for g in train] for q in toy_r1.QUALITIES}
    for q, texts in replies.items():
        np.testing.assert_array_equal(format_reward(texts, train), 1.0)
        np.testing.assert_array_equal(LANG(texts, train), 1.0)
        named = [g["name"] in t.split("<answer>")[1] for g, t in zip(train, texts)]
        assert all(named) if q == "good" else not any(named)
    sft = toy_r1.general_sft_records(train, seed=0)
    answers = [r["messages"][1]["content"] for r in sft]
    good = sum(g["name"] in a.split("<answer>")[1] for g, a in zip(train, answers))
    _within(good, len(train), 0.5)
    rude = {f" <think> {t} </think> <answer> {a} </answer>" for t, a in toy_r1._RUDE}
    assert not rude & set(answers) and all(r["task"] == "general" for r in sft)
    pairs = toy_r1.preference_pairs(train, seed=0)
    assert [p["prompt"] for p in pairs] == [g["prompt"] for g in train]
    assert all(g["name"] in p["chosen"] and g["name"] not in p["rejected"] for g, p in zip(train, pairs))
    assert 0 < sum(p["rejected"] in rude for p in pairs) < len(pairs)


@pytest.mark.parametrize("vocab_size", [512, 1024])
def test_chat_template_renders_like_the_pair(data, vocab_size):
    probs, general, corpus = data
    tok = train_sentencepiece([p + c for p, c in corpus[:3000]], None, vocab_size, max_piece_length=128,
                              split_by_whitespace=False, split_by_unicode_script=False,
                              chat_template=toy_r1.CHAT_TEMPLATE)
    assert tok.vocab_size == vocab_size
    for p, c in corpus:
        assert tok.decode(tok.encode(p + c)) == p + c
    records = (toy_r1.cold_start_records(probs[:20], seed=0) + toy_r1.general_sft_records(general[:20], seed=0)
               + [{"messages": [{"role": "user", "content": _question(p)}, {"role": "assistant", "content": c}]}
                  for p, c in corpus[:40]])
    for r in records:
        q, c = r["messages"][0]["content"], r["messages"][1]["content"]
        assert tok.apply_chat_template(r["messages"][:1]) == "<s>" + r1_zero_prompt(q)
        assert tok.apply_chat_template(r["messages"][:1], tokenize=True) == tok.encode(r1_zero_prompt(q),
                                                                                       add_bos=True)
        chat = sft_data.render_record(r, tok)
        pair = sft_data.render_record({"prompt": r1_zero_prompt(q), "completion": c}, tok)
        np.testing.assert_array_equal(chat.tokens, pair.tokens)
        np.testing.assert_array_equal(chat.loss_mask, pair.loss_mask)
        assert chat.tokens[-1] == tok.eos_id and chat.loss_mask[-1] and not chat.loss_mask[0]
    with pytest.raises(Exception, match="only user and assistant"):
        tok.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
