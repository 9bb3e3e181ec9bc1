"""The R1 recipe's built-in task: toy.py's sums with a bilingual, hard-to-read base, plus general prompts.

Reasoning problems are toy.py's ("Compute 8+7+3", gold "18", task "arith"), asked in English
(record "language": "en"). The base corpus mixes toy.py's behaviours (step-by-step work, direct
answers that are often wrong, badly formatted replies), but its step-by-step work is written
in English ("8 plus 7 makes 15."), in Chinese ("8加7得15。") or drifts from one to the other
at a random step, as a base model pretrained on web text in many languages does. Digits stay
digits and every language's working is equally right, so rewards for accuracy and format alone
give RL no reason to prefer one language (R1-Zero keeps mixing); R1's language-consistency
reward and its English cold-start data are what make the CoT readable.

General prompts (task "general": "Greet Anna", "Thank Bob for the gift", ...) have replies of
graded quality, all in the template: good (warm, uses the name), plain (curt), rude. The base
sees all three; the SFT data of the rejection-sampling stage only good and plain ones, so a
reward model trained on `preference_pairs` still has something to improve in the last RL stage.
"""
import dataclasses

import numpy as np

from r1jax import toy
from r1jax.tokenizer import R1_ZERO_TEMPLATE, r1_zero_prompt

COT_LANGUAGES = ("en", "zh", "mixed")
QUALITIES = ("good", "plain", "rude")


@dataclasses.dataclass(frozen=True)
class R1ToyTask:
    # The sums, and in `arith.mix` the shares of step-by-step / direct / badly formatted replies.
    arith: toy.ToyTask = toy.ToyTask()
    # Language of step-by-step work: English, Chinese, mixed. Mixed CoTs are about half English,
    # so a policy writing like the base has a language consistency of about 0.35 + 0.4/2 = 0.55.
    languages: tuple[float, float, float] = (0.35, 0.25, 0.4)
    general_share: float = 0.2  # of the base corpus's lines
    general_mix: tuple[float, float, float] = (0.3, 0.5, 0.2)  # good, plain, rude replies in the base

    def __post_init__(self):
        for name in ("languages", "general_mix"):
            shares = getattr(self, name)
            if len(shares) != 3 or min(shares) < 0 or sum(shares) <= 0:
                raise ValueError(f"{name} needs three non-negative shares, got {shares}")
        if not 0 <= self.general_share < 1:
            raise ValueError(f"general_share must be in [0, 1), got {self.general_share}")
        if self.languages[2] > 0 and self.arith.min_terms < 3:
            raise ValueError("mixed-language CoTs switch between steps, so they need min_terms >= 3 "
                             f"(two steps at least), got min_terms={self.arith.min_terms}")


def _pick(shares, rng: np.random.Generator) -> int:
    return int(rng.choice(len(shares), p=np.asarray(shares, float) / sum(shares)))


# ---- reasoning ----

# Spaces around the digits in Chinese (a common typesetting rule) give both languages the same token count
# per step with the toy tokenizer (vocab >= 768) and the same word count for the language reward (2 per
# step), so length-sensitive losses favour neither language.
_STEP = {"en": "{a} plus {b} makes {c}.", "zh": "{a} 加 {b} 得 {c}。"}
# Framing of badly formatted replies, per language (the working itself is `_work`).
_OPEN = {"en": "Let me add them up.", "zh": "我来加一下。"}
_SO = {"en": "So the answer is {v}.", "zh": "所以答案是 {v}。"}
_ANSWER_IS = {"en": "The answer is {v}.", "zh": "答案是 {v}。"}


def problems(task: R1ToyTask, n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """toy.problems, each asked in English."""
    return [{**p, "language": "en"} for p in toy.problems(task.arith, n, seed, exclude)]


def _step_languages(n_steps: int, language: str, rng: np.random.Generator | None) -> list[str]:
    if language in ("en", "zh"):
        return [language] * n_steps
    if language != "mixed":
        raise ValueError(f"language is one of {COT_LANGUAGES}, got {language!r}")
    if rng is None:
        raise ValueError("a mixed-language CoT needs an rng (it switches at a random step)")
    if n_steps < 2:
        raise ValueError("a mixed-language CoT needs two steps at least (three terms)")
    first, second = ("en", "zh") if rng.random() < 0.5 else ("zh", "en")
    switch = int(rng.integers(1, n_steps))  # both languages hold at least one step
    return [first] * switch + [second] * (n_steps - switch)


def _work(terms: list[int], language: str, rng: np.random.Generator | None) -> tuple[str, int, list[str]]:
    """(the running sum in words, the total, each step's language)."""
    langs = _step_languages(len(terms) - 1, language, rng)
    steps, total = [], terms[0]
    for t, lang in zip(terms[1:], langs):
        steps.append(_STEP[lang].format(a=total, b=t, c=total + t))
        total += t
    return " ".join(steps), total, langs


def cot_completion(terms: list[int], language: str, rng: np.random.Generator | None = None) -> str:
    """toy.cot_completion's layout with the steps in words; `language` in COT_LANGUAGES."""
    work, total, _ = _work(terms, language, rng)
    return f" <think> {work} </think> <answer> {total} </answer>"


def bad_completion(terms: list[int], language: str, rng: np.random.Generator) -> str:
    """toy.bad_completion's five kinds of template breakage, worded in the CoT's languages."""
    work, total, langs = _work(terms, language, rng)
    first, last = langs[0], langs[-1]
    wrong = toy._wrong(total, rng) if rng.random() < 0.7 else total
    choices = [
        f" {_OPEN[first]} {work} {_SO[last].format(v=total)}",
        f" <think> {work} </think> {total}",
        f" <think> {work} </think> {_ANSWER_IS[last].format(v=total)}",
        f" <think> {work} <answer> {total}",
        f" {_ANSWER_IS[first].format(v=wrong)}",
    ]
    return choices[int(rng.integers(len(choices)))]


# ---- general prompts ----

NAMES = ("Anna", "Bob", "Carla", "Dan", "Eve", "Frank", "Grace", "Hugo", "Ida", "Jack", "Kim", "Leo",
         "Mia", "Nick", "Olga", "Paul", "Rosa", "Sam", "Tina", "Uma", "Victor", "Wendy", "Yuri", "Zoe",
         "Alice", "Ben", "Clara", "David", "Emma", "Felix", "Hannah", "Ivan", "Julia", "Karl", "Laura",
         "Max", "Nina", "Oscar", "Petra", "Rita", "Simon", "Tom", "Vera", "Walter", "Lily", "Omar", "Adam",
         "Bella", "Chris", "Diana", "Eric", "Fiona", "George", "Helen", "Igor", "Jane", "Kevin", "Lucy",
         "Mark", "Nora", "Otto", "Pia", "Ruth", "Sara")  # 64 names x 6 intents: 384 requests
# intent: (request, good thoughts, good answers, plain (think, answer)); {n} is the name.
INTENTS = {
    "greet": ("Greet {n}", ("{n} should feel welcome.", "A warm hello will make {n} smile."),
              ("Hello {n}, it is lovely to see you!", "Hi {n}, welcome, I am so glad you are here!",
               "Good to see you, {n}, I hope you are well!"), ("greet", "Hi.")),
    "thank": ("Thank {n} for the gift", ("{n} was kind and should know it.", "{n} chose the gift with care."),
              ("Thank you so much for the lovely gift, {n}!", "{n}, thank you for the gift, it made my day!",
               "What a thoughtful gift, thank you, {n}!"), ("thank", "Thanks.")),
    "trip": ("Wish {n} a good trip", ("{n} is leaving and deserves a kind farewell.", "{n} will travel far."),
             ("Have a wonderful trip, {n}, and travel safely!", "Safe travels, {n}, enjoy every moment!",
              "{n}, I hope your trip is full of joy!"), ("trip", "Good trip.")),
    "bye": ("Say goodbye to {n}", ("{n} is going home and should leave happy.", "A kind goodbye for {n}."),
            ("Goodbye {n}, it was a pleasure, see you soon!", "Take care, {n}, I will miss you!",
             "Bye {n}, thank you for the lovely time!"), ("bye", "Bye.")),
    "congrats": ("Congratulate {n} on the new job", ("{n} worked hard for this.", "{n} deserves praise."),
                 ("Congratulations on the new job, {n}, you earned it!", "Well done, {n}, I am so proud of you!",
                  "{n}, congratulations, they are lucky to have you!"), ("congrats", "Congrats.")),
    "birthday": ("Wish {n} a happy birthday", ("{n} should feel special today.", "It is {n}'s big day."),
                 ("Happy birthday, {n}, I hope your day is wonderful!", "Many happy returns, {n}, enjoy your day!",
                  "{n}, happy birthday, have a fantastic year!"), ("birthday", "Happy birthday.")),
}
_RUDE = (("whatever", "Go away."), ("no", "Not my problem."), ("whatever", "Leave me alone."),
         ("boring", "I do not care."))


def general_prompts(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """`n` distinct (intent, name) requests; the eval split passes the train prompts as `exclude`."""
    # No final period: the R1-Zero template writes "User: {prompt}. Assistant:".
    combos = [(intent, name) for intent in INTENTS for name in NAMES
              if INTENTS[intent][0].format(n=name) not in exclude]
    if n > len(combos):
        raise ValueError(f"asked for {n} general prompts, only {len(combos)} combinations are left")
    order = np.random.default_rng(seed).permutation(len(combos))[:n]
    return [{"prompt": INTENTS[combos[i][0]][0].format(n=combos[i][1]), "answer": "", "task": "general",
             "language": "en", "name": combos[i][1], "intent": combos[i][0]} for i in order]


def general_reply(record: dict, quality: str, rng: np.random.Generator) -> str:
    """A completion in the R1 template, `quality` in QUALITIES."""
    _, thoughts, answers, (plain_think, plain_answer) = INTENTS[record["intent"]]
    if quality == "good":
        think = thoughts[int(rng.integers(len(thoughts)))].format(n=record["name"])
        answer = answers[int(rng.integers(len(answers)))].format(n=record["name"])
    elif quality == "plain":
        think, answer = plain_think, plain_answer
    elif quality == "rude":
        think, answer = _RUDE[int(rng.integers(len(_RUDE)))]
    else:
        raise ValueError(f"quality is one of {QUALITIES}, got {quality!r}")
    return f" <think> {think} </think> <answer> {answer} </answer>"


# ---- datasets ----

def base_corpus(task: R1ToyTask, reasoning_records: list[dict], general_records: list[dict],
                seed: int) -> list[tuple[str, str]]:
    """(prompt text, completion text) pairs for pretraining the base, shuffled: one line per reasoning
    record, plus general lines (records drawn with replacement, replies by `general_mix`) making up
    `general_share` of the corpus."""
    rng = np.random.default_rng(seed)
    out = []
    for p in reasoning_records:
        kind = _pick(task.arith.mix, rng)
        if kind == 1:
            completion = toy.direct_completion(task.arith, p["terms"], rng)
        else:
            language = COT_LANGUAGES[_pick(task.languages, rng)]
            completion = (cot_completion(p["terms"], language, rng) if kind == 0
                          else bad_completion(p["terms"], language, rng))
        out.append((r1_zero_prompt(p["prompt"]), completion))
    n_general = round(len(reasoning_records) * task.general_share / (1 - task.general_share))
    if n_general and not general_records:
        raise ValueError(f"general_share={task.general_share} needs general records")
    for _ in range(n_general):
        g = general_records[int(rng.integers(len(general_records)))]
        out.append((r1_zero_prompt(g["prompt"]), general_reply(g, QUALITIES[_pick(task.general_mix, rng)], rng)))
    return [out[i] for i in rng.permutation(len(out))]


def _chat(question: str, reply: str, task: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
            "task": task}


def cold_start_records(records: list[dict], seed: int) -> list[dict]:
    """R1's cold-start data: readable long CoTs, here the English working of each reasoning record."""
    rng = np.random.default_rng(seed)
    return [_chat(p["prompt"], cot_completion(p["terms"], "en", rng), "arith") for p in records]


def general_sft_records(general_records: list[dict], seed: int, *, good_share: float = 0.5) -> list[dict]:
    """The non-reasoning SFT data mixed in at rejection sampling: mediocre on purpose (good or plain,
    never rude), so the last RL stage's reward model still finds better and worse replies."""
    if not 0 <= good_share <= 1:
        raise ValueError(f"good_share must be in [0, 1], got {good_share}")
    rng = np.random.default_rng(seed)
    return [_chat(g["prompt"], general_reply(g, "good" if rng.random() < good_share else "plain", rng), "general")
            for g in general_records]


def preference_pairs(general_records: list[dict], seed: int, *, rude_share: float = 0.4) -> list[dict]:
    """One pair per record for the reward model: a good reply over a plain (or, `rude_share` of the
    time, a rude) one, each a whole completion as the policy writes it."""
    rng = np.random.default_rng(seed)
    return [{"prompt": g["prompt"], "chosen": general_reply(g, "good", rng),
             "rejected": general_reply(g, "rude" if rng.random() < rude_share else "plain", rng)}
            for g in general_records]


def harmless_pairs(general_records: list[dict], seed: int) -> list[dict]:
    """One pair per record for the harmlessness reward model: a good or plain reply over a rude one."""
    rng = np.random.default_rng(seed)
    return [{"prompt": g["prompt"], "chosen": general_reply(g, "good" if rng.random() < 0.5 else "plain", rng),
             "rejected": general_reply(g, "rude", rng)} for g in general_records]


# The chat template of the toy tokenizer: a user turn renders as BOS + the R1-Zero prompt, an
# assistant turn as its text + EOS, no generation prompt. So a chat record renders to exactly
# the tokens and loss mask of the pair {"prompt": r1_zero_prompt(q), "completion": c}, and a
# prompt rendered through it is what the sampler sees.
_BEFORE, _AFTER = R1_ZERO_TEMPLATE.split("{prompt}")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token }}{% raw %}" + _BEFORE + "{% endraw %}"
    "{{ message['content'] }}{% raw %}" + _AFTER + "{% endraw %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('the toy chat template has only user and assistant turns') }}"
    "{% endif %}{% endfor %}"
)
