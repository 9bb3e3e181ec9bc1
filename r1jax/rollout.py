"""The rollout seam shared by RL, evaluation (and later rejection sampling and distillation):
prompts -> template -> tokens that fit -> sampler -> decoded text -> rewards scored across processes.

Shapes: P prompts, G completions per prompt, B = P*G rows (prompt-major).
"""
from collections.abc import Callable

import jax
import numpy as np

from r1jax.rewards import RewardOutput, RewardSet
from r1jax.sharding import allgather_json
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


def score(rewards: RewardSet, texts: list[str], examples: list[dict]) -> RewardOutput:
    """Score B completions with each process scoring only its own share, then gather, so that every
    process holds the same rewards whatever its own timing (timeouts in verifiers are wall-clock: two
    hosts scoring the same completion could disagree, and their advantages would silently differ)."""
    if jax.process_count() == 1:
        return rewards(texts, examples)
    mine = process_slice(len(texts))
    local = rewards(texts[mine], examples[mine])
    parts = allgather_json({"total": local.total_B.tolist(),
                            "scores": {k: v.tolist() for k, v in local.scores.items()},
                            "counts": {k: v for k, v in local.metrics.items() if not k.endswith("/mean")}})
    total_B = np.concatenate([np.asarray(p["total"], np.float32) for p in parts])
    scores = {name: np.concatenate([np.asarray(p["scores"][name], np.float32) for p in parts])
              for name in local.scores}
    metrics = {}
    for p in parts:  # counts (errors, timeouts, ...) add up over processes
        for k, v in p["counts"].items():
            metrics[k] = metrics.get(k, 0.0) + v
    metrics.update({f"{name}/mean": float(s.mean()) for name, s in scores.items()})
    metrics["total/mean"] = float(total_B.mean())
    return RewardOutput(total_B, scores, metrics)
