"""Math accuracy: the completion's final answer checked against the gold answer, MATH-grader style.

What is checked: the last `\\boxed{}` inside <answer>, else the whole answer block (no
answer block scores 0: the template is part of the task), in three steps, cheapest first:

1. `screen`, in the calling process, no parser: an answer equal to the gold (whitespace
   stripped) scores 1; an answer too big to parse (over `_MAX_ANSWER_CHARS`, or brackets
   nested deeper than `_MAX_NESTING`) scores 0 and is counted as "oversize" (nothing a
   grader should accept is that big, and parsing it costs seconds); an answer equal to the
   gold after the MATH grader's normalisation (`normalize_answer`: Hendrycks et al.'s
   `is_equiv`, as lm-eval's minerva_math extends it) scores 1.
2. math-verify on the answer as written, the gold read as `\\boxed{gold}`. It finds answers
   in LaTeX delimiters or as plain numbers and expressions, but bare LaTeX such as
   `2\\sqrt{3}` would be read as "2" and bare words as nothing, so (see `_candidates`) bare
   LaTeX and short answers are wrapped in `$...$` first, prose is tried as-is first, and the
   first reading that parses is the one verified: a later reading never rescues a wrong first
   one. Numbers with a currency sign, thousands commas, decimals, % or unit words ("$1,000",
   "18 dollars", "18.00") go to math-verify's plain-number reader as they are.
3. math-verify on the normalised forms (a gold such as `\\$32,\\!348` or `5 \\text{ cm}`
   that math-verify reads poorly as written).

Steps 2-3 run in a worker process of a persistent pool (see pool.py), because math-verify
can hang and its own timeout needs SIGALRM in a main thread. Inside the worker our interval
timer bounds them (`timeout_s`); a worker that ignores it (stuck in C) is killed after
`timeout_s + 2` and replaced. Either way the item scores 0 and counts as a timeout.

math-verify turns any exception in its parsers and comparisons into "no match": a
RecursionError on a deeply nested answer came back as a silent 0 (or, worse, a later
reading of a fragment of the answer was verified instead). While it runs, its parser and
comparison entry points are wrapped so that running out of stack or memory escapes as a
`VerifierError`, and a parsed answer nested deeper than `_MAX_EXPR_DEPTH` is refused the
same way: such items count as errors, never as judged zeros.
"""

from __future__ import annotations

import contextlib
import functools
import re
import signal
import threading

import numpy as np

from r1jax.rewards import stats
from r1jax.rewards.pool import OK, TIMEOUT, WorkerPool
from r1jax.rewards.template import R1_TAGS, Tags, final_answer

__all__ = ["make_math_reward", "math_reward", "verify_answer", "screen", "normalize_answer",
           "gsm8k_gold", "math_pool", "VerifierError"]

_HARD_GRACE_S = 2.0
_MAX_ANSWER_CHARS = 500  # a MATH matrix or interval answer is ~100 characters
_MAX_NESTING = 10  # brackets; real answers nest 3-4 deep, and 14 nested fractions take seconds
_MAX_EXPR_DEPTH = 50  # of a parsed answer's expression tree (`2!!!...!` nests without brackets)


def gsm8k_gold(answer_field: str) -> str:
    """GSM8K's `answer` field ends with "#### 1,234": return "1234"."""
    head, sep, gold = answer_field.rpartition("####")
    if not sep or not gold.strip():
        raise ValueError(f"no '#### <answer>' in GSM8K answer field: {answer_field[-80:]!r}")
    return gold.strip().replace(",", "")


# --- step 1: exact match, size limits, the MATH grader's normalisation ---------------------

def _oversize(answer: str) -> bool:
    if len(answer) > _MAX_ANSWER_CHARS:
        return True
    depth = 0
    for ch in re.sub(r"[^()\[\]{}]", "", answer):
        depth += 1 if ch in "([{" else -1
        if depth > _MAX_NESTING:
            return True
    return False


_REPLACEMENTS = [
    ("\u2212", "-"), ("\u2013", "-"), ("\n", " "), ("~", " "), ("\\ ", " "),
    ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\displaystyle", ""),
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
    ("^{\\circ}", ""), ("^\\circ", ""), ("\\degree", ""), ("\u00b0", ""),
    ("\\$", ""), ("$", ""), ("\\%", ""), ("%", ""), ("{,}", ","),
]
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_DELIMS = re.compile(r"^\\[(\[]|\\[)\]]$")
_TEXT = r"\\(?:text|textrm|textbf|textit|mbox|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}"
_UNIT = re.compile(r"(?<=[\w}).\])])\s*" + _TEXT + r"(?:\^\{?[23]\}?)?\s*$")  # "5 \text{ cm}"
_TEXT_WRAP = re.compile(_TEXT)  # "\text{(A)}" -> "(A)"
_NUMBER_AND_WORDS = re.compile(r"(-?(?:\d[\d,]*(?:\.\d+)?|\.\d+))\s+[A-Za-z]{2}[A-Za-z .'/-]*")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC_SHORT = [  # \frac12, \frac1{2}, \frac{1}2 -> \frac{1}{2}; \sqrt2 -> \sqrt{2}
    (re.compile(r"\\frac(\{[^{}]*\})([^{\\])"), r"\\frac\1{\2}"),
    (re.compile(r"\\frac([^{\\])\{"), r"\\frac{\1}{"),
    (re.compile(r"\\frac([^{\\])([^{\\])"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\sqrt([^{\[\\])"), r"\\sqrt{\1}"),
]
_A_SLASH_B = re.compile(r"(-?)(\d+)/(\d+)")
_EQ_LHS = re.compile(r"(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?=(?![=<>])")


def normalize_answer(text: str) -> str:
    """The MATH grader's canonical form: no `\\$`, `\\!`, `\\,`, `\\left`/`\\right`, trailing
    `\\text{...}` units or unit words, `^\\circ`, `\\%`, thousands commas or spaces;
    `\\dfrac`/`\\tfrac` -> `\\frac`, `\\frac12` -> `\\frac{1}{2}`, `3/4` -> `\\frac{3}{4}`."""
    s = text.strip()
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    s = _DELIMS.sub("", _LEFT_RIGHT.sub("", s).strip()).strip()
    s = _UNIT.sub("", s)
    s = _TEXT_WRAP.sub(r"\1", s).strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    if m := _NUMBER_AND_WORDS.fullmatch(s):
        s = m[1]
    s = re.sub(r"\s+", "", s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    s = re.sub(r"(?<![\w}])\.(?=\d)", "0.", s)  # ".5" -> "0.5", "{.5}" -> "{0.5}"
    for pattern, repl in _FRAC_SHORT:
        s = pattern.sub(repl, s)
    return _A_SLASH_B.sub(r"\1\\frac{\2}{\3}", s) if _A_SLASH_B.fullmatch(s) else s


def _without_lhs(s: str) -> str:
    m = _EQ_LHS.match(s)
    return s[m.end():] if m and s.count("=") == 1 else s


def _normalized_pair(answer: str, gold: str) -> tuple[str, str]:
    """Both normalised; "x = 5" for a gold of "5" (and "2x+3" for "y = 2x+3") compares the
    right-hand side, as the MATH grader does; two equations compare whole."""
    a, g = normalize_answer(answer), normalize_answer(gold)
    if "=" in a and "=" not in g:
        a = _without_lhs(a)
    elif "=" in g and "=" not in a:
        g = _without_lhs(g)
    return a, g


def screen(answer: str, gold: str) -> float | None:
    """The score when no parsing is needed: 1.0 for an exact or a normalised match, 0.0 for an
    answer too big to parse (see the module docstring); None when it must be parsed."""
    answer, gold = answer.strip(), gold.strip()
    if answer and answer == gold:
        return 1.0
    if _oversize(answer):
        return 0.0
    a, g = _normalized_pair(answer, gold)
    return 1.0 if a and a == g else None


# --- steps 2-3: math-verify, in a worker ----------------------------------------------------

# A number, optionally with a currency sign, thousands commas, decimals, %, or unit words:
# "$18", "\$1,000.50", "18 dollars", "-5", "18.00", "25%". math-verify's plain-expression
# reader handles these; wrapped in $...$ the unit words would become symbols. A unit word
# follows a space and has two letters or more: "2k" and "2 k" are expressions.
_NUMBER_LIKE = re.compile(
    r"^(?:\\?\$\s*)?-?\s*(?:\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))(?:\.\d+)?"
    r"(?:\s*\\?%|\s+[A-Za-z]{2}[A-Za-z .'/-]*)?\s*\.?$")
_LATEXISH = re.compile(r"[\\^_{}]")
_WORD = re.compile(r"[A-Za-z]{2,}")
_COMMAND = re.compile(r"\\[A-Za-z]+")


def _has_words(text: str) -> bool:
    return bool(_WORD.search(_COMMAND.sub("", text)))


def _candidates(answer: str) -> list[str]:
    a = answer.strip().replace("\u2212", "-").replace("\u2013", "-")
    a = re.sub(r"\\\$(?=\s*[-\d.])", "", a)  # a LaTeX-escaped currency sign: "\$18"
    if a.endswith(".") and not a.endswith(".."):
        a = a[:-1].rstrip()
    if _NUMBER_LIKE.match(a):
        return [a.replace("\\%", "%")]
    if "$" in a or "\\(" in a or "\\[" in a:
        return [a]
    if _LATEXISH.search(a) or len(a.split()) <= 4 or not _has_words(a):
        return [f"${a}$", a]
    return [a, f"${a}$"]


def _gold_text(gold: str) -> str:
    gold = gold.strip()
    if "\\boxed" in gold:
        return gold
    if len(gold) > 1 and gold[0] == gold[-1] == "$" and gold[-2] != "\\":
        gold = gold.strip("$")  # "$\frac{1}{2}$": delimiters, not a currency sign
    return f"\\boxed{{{gold}}}"


class VerifierError(RuntimeError):
    """math-verify gave up on an item (out of stack or memory) instead of judging it."""


class _ItemTimeout(BaseException):
    """BaseException, so math-verify's `except Exception` cannot swallow it."""


class _GaveUp(BaseException):
    """Likewise; raised where math-verify ran out of stack or memory."""


class _Run:  # what happened during the current item, even if someone swallowed the exception
    expired = False
    gave_up: str | None = None


def _on_alarm(signum, frame):
    _Run.expired = True
    raise _ItemTimeout


def _give_up(why: str):
    _Run.gave_up = why
    raise _GaveUp


def _loud(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RecursionError, MemoryError) as e:
            _give_up(f"{type(e).__name__} in math-verify ({fn.__name__})")
    return wrapper


# math-verify's calls into the recursive parsers and into the comparison, by module global.
_LOUD = {"math_verify.parser": ("latex2sympy", "parse_expr"),
         "math_verify.grader": ("sympy_expr_eq",)}
_PATCHES: list[tuple[object, str, object, object]] = []  # (module, name, original, loud)


@contextlib.contextmanager
def _loud_failures():
    if not _PATCHES:
        import importlib
        for module_name, names in _LOUD.items():
            module = importlib.import_module(module_name)
            _PATCHES.extend((module, name, getattr(module, name), _loud(getattr(module, name)))
                            for name in names)
    for module, name, _, loud in _PATCHES:
        setattr(module, name, loud)
    try:
        yield
    finally:
        for module, name, original, _ in _PATCHES:
            setattr(module, name, original)


def _depth(expr) -> int:
    best, stack = 0, [(expr, 1)]
    while stack:  # no recursion: the tree may be as deep as the stack
        node, d = stack.pop()
        best = max(best, d)
        stack.extend((arg, d + 1) for arg in getattr(node, "args", ()) or ())
    return best


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    from math_verify import parse
    return parse(_gold_text(gold), parsing_timeout=None)


def _verify(answer: str, gold: str) -> float:
    from math_verify import parse, verify
    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return 0.0
    for text in _candidates(answer):
        pred = parse(text, parsing_timeout=None)
        if any(not isinstance(p, str) for p in pred):
            depth = max(_depth(p) for p in pred if not isinstance(p, str))
            if depth > _MAX_EXPR_DEPTH:
                _give_up(f"the parsed answer nests {depth} deep")
            return float(verify(gold_parsed, pred, timeout_seconds=None))
    return 0.0


def verify_answer(answer: str, gold: str, timeout_s: float = 5.0) -> float | None:
    """1.0 if `answer` (the text of an answer block) matches `gold`, else 0.0; None when it ran
    out of time. Raises VerifierError when math-verify gave up instead of judging.

    Uses SIGALRM: call it in a main thread (the pool's workers do)."""
    settled = screen(answer, gold)
    if settled is not None:
        return settled
    _Run.expired, _Run.gave_up = False, None
    score = None
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        with _loud_failures():
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:  # the timer stops before math-verify is restored
                score = _verify(answer, gold)
                normalized = _normalized_pair(answer, gold)
                # Normalising prose glues its words together: no use reading it again.
                if (not score and not _has_words(normalized[0])
                        and normalized != (answer.strip(), gold.strip())):
                    score = _verify(*normalized)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except (_ItemTimeout, _GaveUp):
        pass
    finally:
        signal.signal(signal.SIGALRM, previous)
    if _Run.gave_up:
        raise VerifierError(_Run.gave_up)
    return None if _Run.expired else score


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
        n_oversize = 0
        for i, (completion, example) in enumerate(zip(completions, examples, strict=True)):
            answer = final_answer(completion, tags)
            if not answer:
                continue
            gold = str(example["answer"])
            settled = screen(answer, gold)
            if settled is None:
                todo.append(i)
                args.append((answer, gold, timeout_s))
            else:
                scores[i] = settled
                n_oversize += settled == 0.0
        outcomes = ((pool or math_pool()).map(verify_answer, args, timeout_s + _HARD_GRACE_S)
                    if args else [])
        n_timeouts = n_errors = 0
        for i, (status, value) in zip(todo, outcomes):
            if status == OK and value is not None:
                scores[i] = value
            elif status == TIMEOUT or (status == OK and value is None):
                n_timeouts += 1
            else:
                n_errors += 1
        stats.count("oversize", n_oversize)
        stats.count("timeouts", n_timeouts)
        stats.count("errors", n_errors)
        return scores

    return math_reward


math_reward = make_math_reward()
