"""The rollout seam shared by RL, evaluation, the generation stage (rejection sampling, teacher traces):
prompts -> template -> tokens that fit -> sampler -> decoded text -> rewards scored across processes.

Shapes: P prompts, G completions per prompt, B = P*G rows (prompt-major), Tp prompt length, T completion length.
"""
import collections
import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from r1jax import sampler
from r1jax.rewards import RewardOutput, RewardSet
from r1jax.sharding import allgather_json, host_array
from r1jax.tokenizer import Tokenizer

# A stream that keeps yielding prompts too long to fit is misconfigured, not unlucky.
_MAX_SKIPPED_PER_PROMPT = 100


def encode_prompts(records: list[dict], render: Callable[[str], str], tokenizer: Tokenizer,
                   max_prompt_len: int) -> tuple[list[dict], list[list[int]], int]:
    """(kept records, their token lists, number dropped): prompts longer than `max_prompt_len` tokens are
    dropped whole, never cut (a left cut loses the template and BOS, a right cut the question)."""
    ids = tokenizer.encode_batch([render(r["prompt"]) for r in records], add_bos=True)
    kept = [(r, p) for r, p in zip(records, ids) if len(p) <= max_prompt_len]
    return [r for r, _ in kept], [p for _, p in kept], len(records) - len(kept)


def take_prompts(take: Callable[[int], list[dict]], n: int, render: Callable[[str], str],
                 tokenizer: Tokenizer, max_prompt_len: int) -> tuple[list[dict], list[list[int]], int]:
    """`n` records that fit from `take(k) -> k records`, drawing more for those that do not; returns
    (records, token lists, number skipped as too long)."""
    records, prompts, skipped = [], [], 0
    while len(records) < n:
        got, ids, dropped = encode_prompts(take(n - len(records)), render, tokenizer, max_prompt_len)
        records += got
        prompts += ids
        skipped += dropped
        if skipped > _MAX_SKIPPED_PER_PROMPT * n:
            raise ValueError(f"{skipped} prompts exceeded max_prompt_len={max_prompt_len} tokens (with the "
                             f"template) while filling a batch of {n}; raise max_prompt_len or filter the data")
    return records, prompts, skipped


def process_slice(n: int) -> slice:
    """This process's contiguous share of n items (the first n % count processes take one more)."""
    count, index = jax.process_count(), jax.process_index()
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


def score(rewards: RewardSet, texts: list[str], examples: list[dict], *, step: int | None = None) -> RewardOutput:
    """Score B completions at training step `step` (None: evaluation, plain weights) with each process
    scoring only its own share, then gather, so that every process holds the same rewards whatever its own
    timing (timeouts in verifiers are wall-clock: two hosts scoring the same completion could disagree, and
    their advantages would silently differ). Collective rewards (a sharded reward model) are run by every
    process on the full batch instead, after the gather, so no two collectives interleave."""
    if jax.process_count() == 1:
        return rewards(texts, examples, step=step)
    local = [r for r in rewards.rewards if not r.collective]
    shared = [r for r in rewards.rewards if r.collective]
    scores, counts = {}, {}
    if local:
        mine = process_slice(len(texts))
        part_scores, part_counts = RewardSet(local).evaluate(texts[mine], examples[mine], step=step)
        parts = allgather_json({"scores": {k: v.tolist() for k, v in part_scores.items()},
                                "counts": {k: dict(c) for k, c in part_counts.items()}})
        for r in local:  # float32 -> JSON -> float32 is exact, so the scores are the single-process ones
            scores[r.name] = np.concatenate([np.asarray(p["scores"][r.name], np.float32) for p in parts])
            counts[r.name] = sum((collections.Counter(p["counts"][r.name]) for p in parts), collections.Counter())
    if shared:  # counts are this process's own: every process scored the same items
        shared_scores, shared_counts = RewardSet(shared).evaluate(texts, examples, step=step)
        scores.update(shared_scores)
        counts.update(shared_counts)
    return rewards.summarize(scores, counts, examples, step=step)


def stop_sequences(tokenizer: Tokenizer, strings) -> tuple[tuple[int, ...], ...]:
    """Each stop string's tokens as the tokenizer writes it on its own: the spelling the sampler watches for.
    A model may spell a string with other tokens; `trim_at_stop_strings` catches those after decoding."""
    return tuple(tuple(tokenizer.encode(s)) for s in strings)


def trim_at_stop_strings(tokenizer: Tokenizer, tokens_BxT, mask_BxT, logp_BxT, truncated_B, texts: list[str],
                         rows, strings) -> list[str]:
    """Cut each row (of `rows`; `texts` in their order) after the first token whose text completes a stop
    string, in place: the rest leaves the mask (log-prob 0) and the row counts as finished. Returns the texts,
    cut. Rows the sampler already stopped on a stop string end with it and are left as they are."""
    out = list(texts)
    for j, i in enumerate(rows):
        ends = [out[j].find(s) + len(s) for s in strings if s in out[j]]
        if not ends or min(ends) == len(out[j]):
            continue
        ids = tokens_BxT[i][mask_BxT[i]]
        lo, hi = 1, len(ids)  # the shortest prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            text = tokenizer.decode(ids[:mid])
            lo, hi = (lo, mid) if any(s in text for s in strings) else (mid + 1, hi)
        mask_BxT[i, lo:] = False
        logp_BxT[i, lo:] = 0.0
        truncated_B[i] = False
        out[j] = tokenizer.decode(ids[:lo])
    return out


ROW_FIELDS = ("prompt_tokens_BxTp", "prompt_mask_BxTp", "tokens_BxT", "mask_BxT", "logp_BxT", "truncated_B")


@dataclasses.dataclass
class Completions:
    """One generate call's completions on the host, decoded and scored, B rows prompt-major.

    The arrays hold all B rows. `rows` are the rows this process decoded and scored: all of them, or with
    `local=True` only its `process_slice`; `texts` and `scored` cover exactly those rows.
    """

    examples: list[dict]  # B: the record of each row
    prompt_tokens_BxTp: np.ndarray
    prompt_mask_BxTp: np.ndarray
    tokens_BxT: np.ndarray
    mask_BxT: np.ndarray
    logp_BxT: np.ndarray  # the sampler's log-probs: log_softmax(logits / temperature), before top-k/top-p
    truncated_B: np.ndarray
    rows: range
    texts: list[str]
    scored: RewardOutput | None
    sample_s: float = 0.0  # wall time of the generate call, until its arrays were on the host
    reward_s: float = 0.0  # decoding the text and scoring it (host work)

    @property
    def lengths_B(self) -> np.ndarray:
        return self.mask_BxT.sum(axis=1)


def sample(model, records: list[dict], prompts: list[list[int]], key: jax.Array, cfg: sampler.SamplerConfig,
           tokenizer: Tokenizer, *, poll: Callable[[], None] | None = None) -> Completions:
    """G = cfg.group_size completions of each prompt (`records[i]` rendered and encoded as `prompts[i]`), on the
    host and not yet decoded (`texts` empty, `scored` None): the device's part of `complete`. A caller may queue
    more device work on these rows before `decode_and_score` runs the host's part."""
    t0 = time.perf_counter()
    if cfg.stop_strings and not cfg.stop_sequences:
        cfg = cfg.replace(stop_sequences=stop_sequences(tokenizer, cfg.stop_strings))
    out = sampler.generate(model, prompts, key, cfg, poll=poll)
    host = {f: np.array(host_array(getattr(out, f.replace("Tp", "T")))) for f in ROW_FIELDS}  # writable
    B = len(host["tokens_BxT"])
    examples = [r for r in records for _ in range(B // len(records))]
    return Completions(examples, *(host[f] for f in ROW_FIELDS), range(0), [], None,
                       sample_s=time.perf_counter() - t0)


def decode_and_score(done: Completions, tokenizer: Tokenizer, rewards: RewardSet | None = None,
                     stop_strings: Sequence[str] = (), *, step: int | None = None, local: bool = False) -> Completions:
    """The host's part of `complete`: decode `done`'s rows, cut them at `stop_strings` (in place: a row that spelled
    one with other tokens than the sampler watched for ends after it), and score them with `rewards` at `step`
    (None: evaluation weights; no rewards: not scored). Returns `done` with `rows`, `texts`, `scored`, `reward_s`.

    A cut only shortens a row's mask: every token left in it has the same prefix, so log-probs a model computed on
    the uncut row before this ran are those of the cut one."""
    t0 = time.perf_counter()
    B = len(done.tokens_BxT)
    rows = range(*process_slice(B).indices(B)) if local else range(B)
    tokens, mask = done.tokens_BxT, done.mask_BxT
    texts = tokenizer.decode_batch([tokens[i][mask[i]] for i in rows])
    if stop_strings:
        texts = trim_at_stop_strings(tokenizer, tokens, mask, done.logp_BxT, done.truncated_B, texts, rows,
                                     stop_strings)
    examples = done.examples
    scored = None
    if rewards is not None and not local:
        scored = score(rewards, texts, examples, step=step)
    elif rewards is not None and texts:
        if jax.process_count() > 1 and any(r.collective for r in rewards.rewards):
            raise ValueError("collective rewards (reward models) score the full batch on every process; "
                             "they cannot score one process's rows (local=True)")
        scored = rewards(texts, [examples[i] for i in rows], step=step)
    return dataclasses.replace(done, rows=rows, texts=texts, scored=scored, reward_s=time.perf_counter() - t0)


def complete(model, records: list[dict], prompts: list[list[int]], key: jax.Array, cfg: sampler.SamplerConfig,
             tokenizer: Tokenizer, rewards: RewardSet | None = None, *, step: int | None = None,
             poll: Callable[[], None] | None = None, local: bool = False) -> Completions:
    """G = cfg.group_size completions of each prompt (`records[i]` rendered and encoded as `prompts[i]`),
    decoded and scored by `rewards` at `step` (None: evaluation, no rewards: not scored): `sample`, then
    `decode_and_score`.

    By default every process ends with every row's text and score (each scored its share, then gathered:
    `score`). With `local=True` each process decodes and scores only its own share of the rows (a stage that
    writes its rows and never needs the others'); collective rewards cannot run that way across processes.
    """
    done = sample(model, records, prompts, key, cfg, tokenizer, poll=poll)
    return decode_and_score(done, tokenizer, rewards, cfg.stop_strings, step=step, local=local)
