"""Language consistency: the share of the chain of thought's words written in the target language.

R1 adds this to the reasoning-stage reward to stop the CoT from mixing languages. The
target is `example["language"]` ("en", "zh", "english", a lingua `Language`...) if given,
else the language with the most words in the prompt.

How words are counted and judged (measured while building this): lingua is accurate on
sentences and poor on single Latin-script words ("a" -> Portuguese, "x" -> French), and its
mixed-language mode mislabels English clauses as French or German. So:
- math is removed first ($...$, \\(...\\), \\[...\\], LaTeX commands); digits and
  one-letter Latin words (variables) are not words;
- a word is a run of letters, except in Chinese/Japanese script where each character is one
  word (neither language puts spaces between words);
- words are grouped into segments: a segment ends at a change of script, or at the end of
  a sentence once it holds >= 20 words;
- lingua labels each segment and all its words take that label; segments it cannot label
  count on neither side.
Cost and resolution: a lingua call costs ~70 us plus ~2 us per word, so a 20k-character CoT
takes 20-50 ms on one core. Mixing across scripts (R1's failure: Chinese in an English CoT
or the reverse) is caught at word resolution; a switch to another language of the same script
shorter than ~20 words can be missed.
No think block, or no words in it, scores 0.

The detector covers `LANGUAGES` by default (restricting it makes it faster and more
accurate); it is built once per process, on first use.
"""

from __future__ import annotations

import re
import threading
import unicodedata

import numpy as np

from r1jax.rewards.template import R1_TAGS, Tags, think_text

__all__ = ["make_language_consistency_reward", "language_consistency_reward",
           "language_word_counts", "LANGUAGES"]

LANGUAGES = ("english", "chinese", "japanese", "korean", "russian", "french", "german",
             "spanish", "portuguese", "italian", "arabic", "vietnamese")
_MIN_SEGMENT_WORDS = 20

_MATH = re.compile(r"\$\$.*?\$\$|\$[^$\n]*\$|\\\(.*?\\\)|\\\[.*?\\\]|\\[A-Za-z]+", re.DOTALL)
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# one CJK character, a sentence end, or a run of other letters
_TOKEN = re.compile(rf"([{_CJK}])|([.!?。！？;；\n]+)|([^\W\d_{_CJK}]+)")

_detectors: dict[tuple[str, ...], object] = {}
_detectors_lock = threading.Lock()


def _detector(languages: tuple[str, ...]):
    with _detectors_lock:
        if languages not in _detectors:
            from lingua import LanguageDetectorBuilder
            _detectors[languages] = LanguageDetectorBuilder.from_languages(
                *(_to_language(n) for n in languages)).build()
        return _detectors[languages]


def _to_language(name):
    from lingua import IsoCode639_1, IsoCode639_3, Language
    if isinstance(name, Language):
        return name
    s = str(name).strip().lower().replace("_", "-").split("-")[0]
    try:
        if len(s) == 2:
            return Language.from_iso_code_639_1(IsoCode639_1.from_str(s))
        if len(s) == 3:
            return Language.from_iso_code_639_3(IsoCode639_3.from_str(s))
        return Language.from_str(s)
    except ValueError:
        raise ValueError(f"unknown language {name!r}") from None


def _script(word: str) -> str:
    if re.match(rf"[{_CJK}]", word):
        return "cjk"
    name = unicodedata.name(word[0], "")
    return name.split(" ")[0] if name else "other"


def _segments(text: str) -> list[tuple[str, int]]:
    """(segment text, word count) for the words of `text`; see the module docstring."""
    sentences: list[list[tuple[str, str]]] = [[]]  # sentences of (word, script)
    for m in _TOKEN.finditer(_MATH.sub(" ", text)):
        cjk, stop, word = m.groups()
        if stop:
            sentences.append([])
        elif cjk:
            sentences[-1].append((cjk, "cjk"))
        elif len(word) > 1 or not word.isascii():
            sentences[-1].append((word, _script(word)))
    segments: list[list] = []  # [script, words, sentence ended]
    for sentence in sentences:
        for word, script in sentence:
            last = segments[-1] if segments else None
            if last and last[0] == script and (not last[2] or len(last[1]) < _MIN_SEGMENT_WORDS):
                last[1].append(word)
                last[2] = False
            else:
                segments.append([script, [word], False])
        if segments:
            segments[-1][2] = True
    return [(("" if script == "cjk" else " ").join(words), len(words))
            for script, words, _ in segments]


def language_word_counts(text: str, languages: tuple[str, ...] = LANGUAGES) -> dict:
    """{lingua Language or None: number of words} for `text`."""
    detector = _detector(languages)
    counts: dict = {}
    for segment, n in _segments(text):
        lang = detector.detect_language_of(segment)
        counts[lang] = counts.get(lang, 0) + n
    return counts


def make_language_consistency_reward(*, languages: tuple[str, ...] = LANGUAGES,
                                     tags: Tags = R1_TAGS):
    languages = tuple(languages)

    def target_of(example: dict):
        if example.get("language"):
            target = _to_language(example["language"])
            if target not in {_to_language(n) for n in languages}:
                raise ValueError(f"target language {target} is not among {languages}")
            return target
        counts = {k: v for k, v in language_word_counts(example["prompt"], languages).items()
                  if k is not None}
        return max(counts, key=counts.get) if counts else None

    def one(completion: str, example: dict) -> float:
        think = think_text(completion, tags)
        if not think:
            return 0.0
        counts = language_word_counts(think, languages)
        counts.pop(None, None)
        total = sum(counts.values())
        if not total:
            return 0.0
        # A prompt without words ("12*7=?") has no language: judge consistency with the
        # CoT's own majority language.
        target = target_of(example) or max(counts, key=counts.get)
        return counts.get(target, 0) / total

    def language_consistency_reward(completions: list[str], examples: list[dict]) -> np.ndarray:
        return np.array([one(c, ex) for c, ex in zip(completions, examples, strict=True)],
                        dtype=np.float32)

    return language_consistency_reward


language_consistency_reward = make_language_consistency_reward()
