"""Grouped generation for GRPO: one prefill per prompt, then one jitted while-loop decode over a donated KV cache.

Shapes: P prompts, G completions per prompt, B = P*G rows (group-major: row p*G + g), T a prompt's (bucketed,
left-padded) length or the completion length `max_new_tokens` (each array's own), S cache slots, V vocab.

Log-prob convention (DESIGN.md): a returned log-prob is log_softmax(logits / temperature) at the chosen token,
the same number `Transformer.token_logprobs(..., temperature=temperature)` recomputes in the trainer; top-k,
top-p and min-p then only shape which tokens can be drawn. With `logprobs="sampled"` it is instead the log-prob
under the distribution actually drawn from (the filtered one, renormalised): the behaviour policy's, for an
explicit importance correction in the trainer (rl.RLConfig.tis_cap). Greedy decoding returns log_softmax(logits)
(temperature 1), so `greedy=True` requires `temperature=1.0`.
"""
import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import AbstractMesh

from r1jax.model import KVCache, ModelConfig, Transformer, positions_from_mask
from r1jax.sharding import MESH_AXES, SAMPLE_RULES, Rules, host_array, logical_to_spec, put_rows

_DTYPES = (None, "float32", "bfloat16")
_MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static options: each distinct config compiles its own prefill and decode programs."""

    max_prompt_len: int = 512  # longest prompt accepted; also the largest bucket
    max_new_tokens: int = 512
    group_size: int = 1  # G completions per prompt
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off; keeps tokens with p >= min_p * max p
    greedy: bool = False
    stop_ids: tuple[int, ...] = ()  # a row finishes on the first of these (kept in its mask)
    # A row also finishes once its completion ends with one of these token sequences (kept in its mask): stop
    # strings, encoded by the caller (rollout.stop_sequences); rollout.complete trims the rarer spellings.
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    stop_strings: tuple[str, ...] = ()  # for rollout.complete, which encodes them into stop_sequences
    pad_id: int = 0  # written after a row finishes and into prompt padding
    # Prompt widths the compiled programs take; () means powers of two from 16 up to max_prompt_len.
    prompt_buckets: tuple[int, ...] = ()
    cache_dtype: str | None = None  # None: the model's compute dtype
    # 0: a lockstep batch (every row of a call decodes until the longest one ends). > 0: continuous batching
    # (r1jax.engine) over this many decode slots; a finished row's slot takes the next waiting request.
    slots: int = 0
    decode_impl: str = "xla"  # continuous batching's decode attention: kernels.decode_attention impl
    logprobs: str = "full"  # "full": log_softmax(logits / temperature); "sampled": of the filtered distribution

    def __post_init__(self):
        # Lists from the command line or a recipe become tuples, so the config stays hashable (a jit static).
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        object.__setattr__(self, "stop_sequences", tuple(tuple(int(i) for i in s) for s in self.stop_sequences))
        object.__setattr__(self, "stop_strings", tuple(str(s) for s in self.stop_strings))
        object.__setattr__(self, "prompt_buckets", tuple(int(b) for b in self.prompt_buckets))
        problems = []
        if self.max_prompt_len < 1 or self.max_new_tokens < 1 or self.group_size < 1:
            problems.append("max_prompt_len, max_new_tokens and group_size must be >= 1")
        if not self.temperature > 0:
            problems.append(f"temperature={self.temperature} must be > 0 (use greedy=True for argmax)")
        if self.greedy and self.temperature != 1.0:
            problems.append("greedy=True returns temperature-1 log-probs; leave temperature at 1.0")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            problems.append(f"min_p={self.min_p} must be in [0, 1)")
        if any(not s for s in self.stop_strings) or any(not s or min(s) < 0 for s in self.stop_sequences):
            problems.append("stop strings must be non-empty and stop sequences hold tokens, all >= 0")
        if any(i < 0 for i in self.stop_ids) or self.pad_id < 0:
            problems.append("stop_ids and pad_id must be >= 0")
        b = self.prompt_buckets
        if b and (list(b) != sorted(set(b)) or b[0] < 1 or b[-1] != self.max_prompt_len):
            problems.append(f"prompt_buckets={b} must increase strictly and end at max_prompt_len")
        if self.cache_dtype not in _DTYPES:
            problems.append(f"cache_dtype={self.cache_dtype!r}; choose from {_DTYPES}")
        if self.slots < 0:
            problems.append(f"slots={self.slots} must be >= 0 (0: the lockstep batch)")
        if self.logprobs not in ("full", "sampled"):
            problems.append(f"logprobs={self.logprobs!r}; choose full or sampled")
        if self.decode_impl not in ("xla", "pallas"):
            problems.append(f"decode_impl={self.decode_impl!r}; choose xla or pallas")
        if problems:
            raise ValueError("bad SamplerConfig: " + "; ".join(problems))

    def replace(self, **changes) -> "SamplerConfig":
        return dataclasses.replace(self, **changes)

    @property
    def buckets(self) -> tuple[int, ...]:
        if self.prompt_buckets:
            return self.prompt_buckets
        powers = [b for b in (2 ** i for i in range(31)) if _MIN_BUCKET <= b < self.max_prompt_len]
        return (*powers, self.max_prompt_len)

    def bucket(self, length: int) -> int:
        """The prompt width a batch whose longest prompt has `length` tokens is padded to."""
        if length > self.max_prompt_len:
            raise ValueError(f"prompt of {length} tokens exceeds max_prompt_len={self.max_prompt_len}")
        return next(b for b in self.buckets if b >= length)


@struct.dataclass
class Rollout:
    """G completions per prompt, group-major. `mask_BxT` is True up to and including the stop token; tokens
    after it are `pad_id` with log-prob 0. The prompt columns are the left-padded bucket, repeated per row."""

    prompt_tokens_BxT: jax.Array
    prompt_mask_BxT: jax.Array
    tokens_BxT: jax.Array
    logp_BxT: jax.Array  # float32, log_softmax(logits / temperature) at tokens_BxT
    mask_BxT: jax.Array
    lengths_B: jax.Array  # int32: completion tokens in the mask
    finished_B: jax.Array  # ended on a stop id
    truncated_B: jax.Array  # hit max_new_tokens without one
    group_size: int = struct.field(pytree_node=False, default=1)

    def sequences(self):
        """(tokens_BxT, positions_BxT, mask_BxT) of prompt + completion, as the trainer's forward takes them.

        Completion token j's log-prob is predicted at column `prompt width - 1 + j` of that forward.
        """
        tokens = jnp.concatenate([self.prompt_tokens_BxT, self.tokens_BxT], axis=1)
        mask = jnp.concatenate([self.prompt_mask_BxT, self.mask_BxT], axis=1)
        return tokens, positions_from_mask(mask), mask


def recompute_logprobs(model: Transformer, rollout: Rollout, *, temperature: float = 1.0, chunk: int = 256):
    """The trainer's view of `rollout.logp_BxT`: one teacher-forced forward, 0 outside the mask."""
    tokens, positions, mask = rollout.sequences()
    logp, _ = model.token_logprobs(tokens[:, :-1], positions[:, :-1], mask[:, :-1], tokens[:, 1:],
                                   temperature=temperature, chunk=chunk)
    start = rollout.prompt_tokens_BxT.shape[1] - 1
    return jnp.where(rollout.mask_BxT, logp[:, start:], 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Sampling one token per row.


def filter_logits(scaled_BxV, cfg: SamplerConfig):
    """(candidate logits_BxC, their token ids_BxC or None): what top-k, top-p and min-p leave drawable, the rest
    at -inf. Applied in transformers' order: top-k, then top-p over the renormalised survivors, then min-p.

    With top_k, `lax.top_k` sorts only the k kept. top-p alone never sorts the vocabulary: the smallest surviving
    probability is found by bisection over its float bits (`top_p_floor`).
    """
    neg_inf = jnp.float32(-jnp.inf)
    if not cfg.top_k:
        keep_BxV = jnp.ones(scaled_BxV.shape, bool)
        if cfg.top_p < 1.0:
            probs_BxV = jax.nn.softmax(scaled_BxV, axis=-1)
            keep_BxV = probs_BxV >= top_p_floor(probs_BxV, cfg.top_p)
        if cfg.min_p > 0:
            keep_BxV &= scaled_BxV >= jnp.max(scaled_BxV, axis=-1, keepdims=True) + jnp.log(cfg.min_p)
        return jnp.where(keep_BxV, scaled_BxV, neg_inf), None
    k = min(cfg.top_k, scaled_BxV.shape[-1])
    vals_BxC, ids_BxC = jax.lax.top_k(scaled_BxV, k)  # descending
    keep_BxC = jnp.ones(vals_BxC.shape, bool)
    if cfg.top_p < 1.0:
        probs = jax.nn.softmax(vals_BxC, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly ahead of each token; the top one always stays
        keep_BxC &= before < cfg.top_p
    if cfg.min_p > 0:
        keep_BxC &= vals_BxC >= vals_BxC[:, :1] + jnp.log(cfg.min_p)
    return jnp.where(keep_BxC, vals_BxC, neg_inf), ids_BxC


def top_p_floor(probs_BxV, top_p: float):
    """Per row, the smallest probability a token may have and survive top-p: the least t whose mass strictly
    above it, sum(p > t), is below `top_p` (a token survives when the tokens more probable than it hold less
    than top_p), as a Bx1 float.

    Non-negative floats order like their bit patterns, so 31 halvings of the integer range [0, bits(max p)]
    find that t exactly among representable floats: 31 passes over the vocabulary instead of a sort of it.
    Tokens tied at the boundary are kept or dropped together (a sort keeps those ranked first).

    On CPU the rows go a few at a time, so the 31 passes over them run from the core's cache rather than memory
    (3x faster at 32 rows x 49k tokens); accelerators take all rows in each pass.
    """
    B, V = probs_BxV.shape
    rows = B
    if jax.default_backend() == "cpu":
        rows = max(1, min(B, _CACHE_BYTES // (4 * V)))
        while B % rows:
            rows -= 1
    if rows < B:
        chunks_CxRxV = probs_BxV.reshape(B // rows, rows, V)
        return jax.lax.map(lambda p_RxV: _top_p_floor(p_RxV, top_p), chunks_CxRxV).reshape(B, 1)
    return _top_p_floor(probs_BxV, top_p)


_CACHE_BYTES = 512 * 1024  # a CPU core's share of cache the bisection's rows should fit in


def _top_p_floor(probs_BxV, top_p: float):
    B = probs_BxV.shape[0]
    as_float = lambda bits: jax.lax.bitcast_convert_type(bits, jnp.float32)  # noqa: E731

    def halve(_, bounds):
        lo, hi = bounds  # mass above lo >= top_p (or lo = -1, below every probability); mass above hi < top_p
        mid = lo + (hi - lo) // 2
        mass = jnp.sum(jnp.where(probs_BxV > as_float(jnp.maximum(mid, 0)), probs_BxV, 0.0), axis=-1,
                       keepdims=True)
        below = mass < top_p
        return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

    hi = jax.lax.bitcast_convert_type(jnp.max(probs_BxV, axis=-1, keepdims=True), jnp.int32)
    lo = jnp.full((B, 1), -1, jnp.int32)
    _, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return as_float(hi)


def first_argmax(x_BxC):
    """jnp.argmax over the last axis (the first index of the maximum) as a max and a min reduction."""
    top_Bx1 = jnp.max(x_BxC, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x_BxC.shape, x_BxC.ndim - 1)
    return jnp.min(jnp.where(x_BxC == top_Bx1, iota, x_BxC.shape[-1]), axis=-1)


_DRAW_BLOCK = 256  # tokens per block of the two-level draw


def categorical(key, logits_BxC):
    """One draw per row from softmax(logits_BxC) (-inf: never drawn), in two Gumbel-max levels: a block of
    `_DRAW_BLOCK` tokens with probability proportional to its mass (each block's logsumexp), then a token of that
    block in proportion to its probability. P(block) * P(token | block) is the token's probability, as with a
    Gumbel-max over all C tokens, but it takes C / 256 + 256 random numbers per row instead of C: on XLA's CPU
    backend the random bits of a full-vocabulary draw cost more than the rest of sampling (49k tokens)."""
    B, C = logits_BxC.shape
    if C <= 2 * _DRAW_BLOCK:
        return first_argmax(jax.random.gumbel(key, (B, C), jnp.float32) + logits_BxC)
    n = -(-C // _DRAW_BLOCK)
    padded_BxNxK = jnp.pad(logits_BxC, ((0, 0), (0, n * _DRAW_BLOCK - C)),
                           constant_values=-jnp.inf).reshape(B, n, _DRAW_BLOCK)
    top_BxNx1 = jnp.max(padded_BxNxK, axis=-1, keepdims=True)
    safe_BxNx1 = jnp.where(jnp.isfinite(top_BxNx1), top_BxNx1, 0.0)  # a block of -inf only: mass 0, lse -inf
    lse_BxN = jnp.log(jnp.sum(jnp.exp(padded_BxNxK - safe_BxNx1), axis=-1)) + safe_BxNx1[..., 0]
    block_key, token_key = jax.random.split(key)
    block_B = first_argmax(jax.random.gumbel(block_key, (B, n), jnp.float32) + lse_BxN)
    within_BxK = jnp.take_along_axis(padded_BxNxK, block_B[:, None, None], axis=1)[:, 0]
    token_B = first_argmax(jax.random.gumbel(token_key, (B, _DRAW_BLOCK), jnp.float32) + within_BxK)
    return block_B * _DRAW_BLOCK + token_B


def sample_tokens(logits_BxV, key, cfg: SamplerConfig):
    """(token_B, logp_B): a draw per row and its log-prob, log_softmax(logits / temperature) or, with
    cfg.logprobs="sampled", the log-prob under the filtered distribution it was drawn from."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if cfg.greedy:
        token_B = jnp.argmax(logits_BxV, axis=-1)
        scaled_BxV = logits_BxV
    else:
        scaled_BxV = logits_BxV / cfg.temperature
        cand_BxC, ids_BxC = filter_logits(scaled_BxV, cfg)
        choice_B = categorical(key, cand_BxC)
        token_B = choice_B if ids_BxC is None else jnp.take_along_axis(ids_BxC, choice_B[:, None], -1)[:, 0]
        if cfg.logprobs == "sampled":
            picked_B = jnp.take_along_axis(cand_BxC, choice_B[:, None], -1)[:, 0]
            return token_B.astype(jnp.int32), picked_B - jax.nn.logsumexp(cand_BxC, axis=-1)
    picked_B = jnp.take_along_axis(scaled_BxV, token_B[:, None], -1)[:, 0]
    logp_B = picked_B - jax.nn.logsumexp(scaled_BxV, axis=-1)
    return token_B.astype(jnp.int32), logp_B


# ---------------------------------------------------------------------------------------------------------------
# The two compiled programs: prefill (P rows) and decode (B rows).


@struct.dataclass
class DecodeState:
    """What prefill hands the decode loop (besides the cache, which is donated separately). Column `step` of
    tokens_BxT holds the last token drawn; it is fed to the model in the next iteration."""

    prompt_tokens_BxT: jax.Array
    prompt_mask_BxT: jax.Array
    tokens_BxT: jax.Array
    logp_BxT: jax.Array
    lengths_B: jax.Array
    finished_B: jax.Array
    next_pos_B: jax.Array  # position of tokens_BxT[:, step]
    step: jax.Array
    key: jax.Array


def ends_with_stop_sequence(tokens_BxN, last_B, cfg: SamplerConfig):
    """Per row: do the completion's tokens up to column `last_B` (inclusive) end with a stop sequence?"""
    hit_B = jnp.zeros(last_B.shape, bool)
    for seq in cfg.stop_sequences:
        cols_BxK = last_B[:, None] - (len(seq) - 1) + jnp.arange(len(seq))
        window_BxK = jnp.take_along_axis(tokens_BxN, jnp.maximum(cols_BxK, 0), axis=1)
        hit_B |= (cols_BxK[:, 0] >= 0) & jnp.all(window_BxK == jnp.asarray(seq, jnp.int32), axis=1)
    return hit_B


def stops(tokens_BxN, last_B, cfg: SamplerConfig):
    """Per row: does the token at column `last_B` end the completion (a stop id, or the end of a stop
    sequence)? Both samplers ask this after writing each token."""
    token_B = jnp.take_along_axis(tokens_BxN, last_B[:, None], axis=1)[:, 0]
    hit_B = ends_with_stop_sequence(tokens_BxN, last_B, cfg)
    return hit_B | jnp.isin(token_B, jnp.asarray(cfg.stop_ids, jnp.int32)) if cfg.stop_ids else hit_B


# Every trace bumps this (a Python side effect runs only while tracing); tests read it to prove reuse.
TRACES = {"prefill": 0, "decode": 0}


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def _prefill(graphdef, state, prompt_PxT, prompt_mask_PxT, key, cfg: SamplerConfig):
    """Run each prompt once, copy its K/V to the G rows of its group, draw every row's first token."""
    TRACES["prefill"] += 1
    model: Transformer = nnx.merge(graphdef, state)
    P, T = prompt_PxT.shape
    G, N = cfg.group_size, cfg.max_new_tokens
    # The decode cache: the prompt's T slots then N for the completion (slot T+N-1 is never written: the last
    # token drawn is never fed back).
    logits_PxV, cache = model.prefill_grouped(prompt_PxT, prompt_mask_PxT, group=G, length=T + N,
                                              dtype=cfg.cache_dtype)

    def group(x, axis):
        return jnp.repeat(x, G, axis=axis)

    token_B, logp_B = sample_tokens(group(logits_PxV, 0), jax.random.fold_in(key, 0), cfg)
    B = P * G
    tokens_BxT = jnp.full((B, N), cfg.pad_id, jnp.int32).at[:, 0].set(token_B)
    logp_BxT = jnp.zeros((B, N), jnp.float32).at[:, 0].set(logp_B)
    ds = DecodeState(
        prompt_tokens_BxT=group(prompt_PxT, 0),
        prompt_mask_BxT=group(prompt_mask_PxT, 0),
        tokens_BxT=tokens_BxT,
        logp_BxT=logp_BxT,
        lengths_B=jnp.ones((B,), jnp.int32),
        finished_B=stops(tokens_BxT, jnp.zeros((B,), jnp.int32), cfg),
        next_pos_B=group(jnp.sum(prompt_mask_PxT, axis=1, dtype=jnp.int32), 0),
        step=jnp.zeros((), jnp.int32),
        key=key,
    )
    return ds, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"), donate_argnames=("cache",))
def _decode(graphdef, state, ds: DecodeState, cache: KVCache, cfg: SamplerConfig, until):
    """Feed the last token, draw the next, until every row finished, max_new_tokens were drawn or `step`
    reached `until` (a traced bound, so decoding in segments reuses one program). The cache is donated (and
    returned) so the loop updates the caller's buffer in place instead of a copy of it."""
    TRACES["decode"] += 1
    model: Transformer = nnx.merge(graphdef, state)
    B, N = ds.tokens_BxT.shape
    ones_Bx1 = jnp.ones((B, 1), bool)

    def cond(carry):
        ds, _ = carry
        return (ds.step + 1 < N) & ~jnp.all(ds.finished_B) & (ds.step < until)

    def body(carry):
        ds, cache = carry
        fed_B = ds.tokens_BxT[:, ds.step]
        logits_Bx1xV, cache = model(fed_B[:, None], ds.next_pos_B[:, None], ones_Bx1, cache)
        token_B, logp_B = sample_tokens(logits_Bx1xV[:, 0], jax.random.fold_in(ds.key, ds.step + 1), cfg)
        live_B = ~ds.finished_B
        token_B = jnp.where(live_B, token_B, cfg.pad_id)
        logp_B = jnp.where(live_B, logp_B, 0.0)
        step = ds.step + 1
        tokens_BxT = jax.lax.dynamic_update_slice(ds.tokens_BxT, token_B[:, None], (0, step))
        ends_B = stops(tokens_BxT, jnp.full((B,), step), cfg)
        ds = ds.replace(
            tokens_BxT=tokens_BxT,
            logp_BxT=jax.lax.dynamic_update_slice(ds.logp_BxT, logp_B[:, None], (0, step)),
            lengths_B=ds.lengths_B + live_B,
            finished_B=ds.finished_B | (live_B & ends_B),
            next_pos_B=ds.next_pos_B + 1,
            step=step,
        )
        return ds, cache

    ds, cache = jax.lax.while_loop(cond, body, (ds, cache))
    done = (ds.step + 1 >= N) | jnp.all(ds.finished_B)
    return ds, cache, done


@functools.partial(jax.jit, static_argnames="cfg")
def _rollout(ds: DecodeState, cfg: SamplerConfig) -> Rollout:
    N = ds.tokens_BxT.shape[1]
    mask_BxT = jnp.arange(N)[None, :] < ds.lengths_B[:, None]
    return Rollout(
        prompt_tokens_BxT=ds.prompt_tokens_BxT,
        prompt_mask_BxT=ds.prompt_mask_BxT,
        tokens_BxT=ds.tokens_BxT,
        logp_BxT=ds.logp_BxT,
        mask_BxT=mask_BxT,
        lengths_B=ds.lengths_B,
        finished_B=ds.finished_B,
        truncated_B=~ds.finished_B,
        group_size=cfg.group_size,
    )


# ---------------------------------------------------------------------------------------------------------------
# The host-side entry point.


def pad_prompts(prompts: Sequence[Sequence[int]], cfg: SamplerConfig):
    """Left-pad token lists to their bucket: (tokens_PxT int32, mask_PxT bool) as numpy arrays."""
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) < 1:
        raise ValueError("every prompt needs at least one token")
    T = cfg.bucket(max(lengths))
    tokens = np.full((len(prompts), T), cfg.pad_id, np.int32)
    mask = np.zeros((len(prompts), T), bool)
    for row, p in enumerate(prompts):
        tokens[row, T - len(p):] = p
        mask[row, T - len(p):] = True
    return tokens, mask


def _rebucket(tokens_PxT, mask_PxT, cfg: SamplerConfig):
    """A left-padded array brought to its bucket's width: crop padding on the left, or pad more."""
    mask = np.asarray(mask_PxT, bool)
    lengths = mask.sum(axis=1)
    if lengths.min() < 1:
        raise ValueError("every prompt needs at least one token")
    width = mask.shape[1]
    if not (mask == (np.arange(width)[None] >= width - lengths[:, None])).all():
        raise ValueError("prompt_mask_PxT must be left-padded: each row's tokens contiguous at the right end")
    T = cfg.bucket(int(lengths.max()))
    if T == width:
        return tokens_PxT, mask_PxT
    tokens = np.asarray(tokens_PxT, np.int32)
    if T < width:
        return tokens[:, width - T:], mask[:, width - T:]
    return (np.pad(tokens, ((0, 0), (T - width, 0)), constant_values=cfg.pad_id),
            np.pad(mask, ((0, 0), (T - width, 0))))


def _put_rows(x, model: Transformer):
    """Rows over data/fsdp like the model's activations (replicated if they do not divide); works multi-host."""
    if model.act_sharding is None:
        return jnp.asarray(x)
    return put_rows(np.asarray(x), model.act_sharding.mesh, model.act_sharding.rules)


def check_fits(mcfg: ModelConfig, cfg: SamplerConfig) -> None:
    if cfg.max_prompt_len + cfg.max_new_tokens > mcfg.max_seq_len:
        raise ValueError(f"max_prompt_len + max_new_tokens = {cfg.max_prompt_len + cfg.max_new_tokens} exceeds "
                         f"{mcfg.name}'s max_seq_len={mcfg.max_seq_len}")
    for i in (*cfg.stop_ids, cfg.pad_id):
        if i >= mcfg.vocab_size:
            raise ValueError(f"token id {i} (stop_ids/pad_id) is outside the vocabulary of {mcfg.vocab_size}")


def prefill(model: Transformer, prompts, key, cfg: SamplerConfig, prompt_mask_PxT=None):
    """The first half of `generate`, on its own so benchmarks can time the first token."""
    check_fits(model.cfg, cfg)
    if prompt_mask_PxT is None:
        tokens_PxT, mask_PxT = pad_prompts(prompts, cfg)
    else:
        tokens_PxT, mask_PxT = _rebucket(prompts, prompt_mask_PxT, cfg)
    graphdef, state = nnx.split(model)
    ds, cache = _prefill(graphdef, state, _put_rows(tokens_PxT, model), _put_rows(mask_PxT, model), key, cfg)
    return graphdef, state, ds, cache


POLL_EVERY = 64  # decode steps between polls: a stop waits at most this many tokens


def decode(graphdef, state, ds: DecodeState, cache: KVCache, cfg: SamplerConfig, *,
           poll: Callable[[], None] | None = None, poll_every: int | None = None) -> Rollout:
    """Decode to the end. With `poll`, decoding runs in segments of `poll_every` tokens and `poll()` is called
    between them: a long generation can be abandoned (raise from `poll`, e.g. on SIGTERM) within one segment.
    The tokens are the same either way (the same loop body, keyed by step)."""
    N = cfg.max_new_tokens
    poll_every = poll_every or POLL_EVERY
    until = N if poll is None else poll_every
    while True:
        ds, cache, done = _decode(graphdef, state, ds, cache, cfg, jnp.int32(until))
        if poll is None or until >= N or bool(host_array(done)):
            return _rollout(ds, cfg)
        poll()
        until += poll_every


def generate(model: Transformer, prompts, key, cfg: SamplerConfig, prompt_mask_PxT=None, *,
             poll: Callable[[], None] | None = None) -> Rollout:
    """G = cfg.group_size completions for each of P prompts; `poll` as in `decode`.

    `prompts`: P token lists of any lengths, or a left-padded int array tokens_PxT with `prompt_mask_PxT`.
    The model enters the compiled programs as (graphdef, state), so calling again with new weights (every RL
    step) reuses them; prompts are padded to a bucket width, so a run compiles one program per bucket used.
    Rows are sharded like the model's activations (its `act_sharding`: SAMPLE_RULES for a sampling model).
    With `cfg.slots`, continuous batching (r1jax.engine) samples them instead, into the same Rollout.
    """
    if cfg.slots:
        from r1jax import engine  # engine builds on this module

        if prompt_mask_PxT is not None:
            prompts = [list(np.asarray(t)[np.asarray(m, bool)]) for t, m in zip(prompts, prompt_mask_PxT)]
        return engine.generate(model, prompts, key, cfg, poll=poll)
    return decode(*prefill(model, prompts, key, cfg, prompt_mask_PxT), cfg, poll=poll)


# ---------------------------------------------------------------------------------------------------------------
# Memory: size G and the batch before launching.


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Estimated bytes per device for one `generate` call of B = P * G rows, S = max_prompt_len + max_new_tokens:

    weights  = every parameter's shard under the rules (bytes(param_dtype))
    kv_cache = B * 2 * L * S * K * H * bytes(cache dtype)              the donated decode cache
    logits   = B * 3 * V * 4                                          fp32 logits, scaled copy, sort buffer
    prefill  = P * (2 * L * T * K * H * bytes                          the prompts' own cache (T = max_prompt_len)
                    + T * (2F + (N + 2K) * H + 2D) * bytes + N * T * T * 4)   one layer's activations, fp32 scores
    rollout  = B * max_new_tokens * (4 + 4 + 1)                        tokens, log-probs, mask
    each divided by the mesh axes that shard it (rows over data*fsdp, heads/mlp/vocab over tensor) where they
    divide evenly, as r1jax.sharding does. Prefill and decode do not overlap except for the cache.
    """

    prompts: int
    rows: int
    kv_bytes_per_row: int  # unsharded, for sizing: rows that fit ~ free bytes / this
    weights: int
    kv_cache: int
    logits: int
    prefill: int
    rollout: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.logits + self.prefill + self.rollout

    def table(self) -> str:
        gib = 2.0 ** 30
        lines = [f"sampler memory per device: {self.prompts} prompts x {self.rows // self.prompts} = {self.rows} rows",
                 f"  {'kv cache per row (unsharded)':<30} {self.kv_bytes_per_row / 2**20:10.3f} MiB"]
        for name in ("weights", "kv_cache", "logits", "prefill", "rollout", "total"):
            lines.append(f"  {name:<30} {getattr(self, name) / gib:10.3f} GiB")
        return "\n".join(lines)


def memory_report(mcfg: ModelConfig, cfg: SamplerConfig, prompts: int,
                  mesh_shape: tuple[int, int, int] = (1, 1, 1), rules: Rules = SAMPLE_RULES) -> MemoryReport:
    """The MemoryReport estimate for `prompts` prompts on a (data, fsdp, tensor) mesh; needs no devices."""
    mesh = AbstractMesh(tuple(mesh_shape), MESH_AXES)

    def shard(nbytes_per_elem: int, shape, axes) -> int:
        spec = logical_to_spec(axes, rules, shape, mesh)
        ways = [np.prod([mesh.shape[a] for a in ((s,) if isinstance(s, str) else s)]) for s in spec if s]
        return int(np.prod(shape)) * nbytes_per_elem // int(np.prod(ways))

    P, B = prompts, prompts * cfg.group_size
    L, D, F, V = mcfg.n_layers, mcfg.d_model, mcfg.d_ff, mcfg.vocab_size
    N, K, H = mcfg.n_heads, mcfg.n_kv_heads, mcfg.head_dim
    S, T = cfg.max_prompt_len + cfg.max_new_tokens, cfg.max_prompt_len
    act = jnp.dtype(mcfg.compute_dtype).itemsize
    kv = jnp.dtype(cfg.cache_dtype or mcfg.compute_dtype).itemsize
    abstract = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
    param = jnp.dtype(mcfg.param_dtype).itemsize
    weights = sum(shard(param, v.get_value().shape, v.get_metadata().get("axes") or (None,) * v.get_value().ndim)
                  for v in jax.tree.leaves(nnx.state(abstract), is_leaf=lambda x: isinstance(x, nnx.Variable)))
    kv_axes = (None, "batch", "kv_heads", None, None)
    prefill = (shard(kv, (2 * L, P, K, T, H), kv_axes)
               + shard(act, (P, T, 2 * F), ("batch", None, "mlp"))
               + shard(act, (P, T, N + 2 * K, H), ("batch", None, "kv_heads", None))
               + shard(act, (P, T, 2 * D), ("batch", None, None))
               + shard(4, (P, N, T, T), ("batch", "heads", None, None)))
    return MemoryReport(
        prompts=P,
        rows=B,
        kv_bytes_per_row=KVCache.bytes_per_row(mcfg, S, cfg.cache_dtype or mcfg.compute_dtype),
        weights=weights,
        kv_cache=shard(kv, (2 * L, B, K, S, H), kv_axes),
        logits=shard(4, (B, 3, V), ("batch", None, "vocab")),
        prefill=prefill,
        rollout=shard(9, (B, cfg.max_new_tokens), ("batch", None)),
    )
