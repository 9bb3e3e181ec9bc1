"""Continuous batching: a fixed number of decode slots, each (prompt, sample) request taking a free one.

The lockstep sampler (r1jax.sampler) decodes a batch until its longest row ends, so with R1's long-tailed
completion lengths most rows sit finished while a few run on. Here a request that finishes frees its slot,
and the next waiting request is prefilled into it between decode segments.

Shapes: R requests (P prompts x G samples, group-major: request p*G + g), B decode slots, N max_new_tokens,
T a prompt's bucket, S slots per cache row (max_prompt_len + max_new_tokens), V vocab.

A request's tokens and log-probs do not depend on what shares the batch with it:
- its randomness is keyed by (request, token index), not by decode step or slot;
- its prompt is prefilled alone, at the width of its own bucket (`Transformer.prefill_slots`);
- decoding is row-independent (`Transformer.decode_slots` reads each row's own cache and length).
The log-prob convention is the lockstep sampler's (log_softmax(logits / temperature) at the drawn token),
and the result is the same `Rollout`, so callers do not know which sampler ran.
"""
import collections
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from r1jax.model import CACHE_AXES, SlotCache, Transformer
from r1jax.sampler import Rollout, SamplerConfig, check_fits, pad_prompts, sample_tokens, stops
from r1jax.sharding import host_array

_MIN_READ = 64  # the smallest attention window (cache slots) a decode program reads


@struct.dataclass
class Slots:
    """The decode slots, on device: what each holds is one request's state. Nothing here is sized by the
    number of requests, so every call with the same slots and lengths reuses the compiled programs; the host
    copies a request's row out once it has finished."""

    cache: SlotCache
    request_B: jax.Array  # int32 the slot's request: keys its randomness
    limit_B: jax.Array  # int32 the request's max_new_tokens
    drawn_B: jax.Array  # int32 tokens the request has drawn
    last_B: jax.Array  # int32 the last token drawn: fed next
    live_B: jax.Array  # bool: still decoding
    stopped_B: jax.Array  # bool: ended on a stop id
    tokens_BxN: jax.Array
    logp_BxN: jax.Array


def _laid_out(sl: Slots, model: Transformer) -> Slots:
    """Slots sharded like the model's activations: rows over the batch axes (where they divide), the cache's
    kv heads over tensor, as the lockstep sampler lays out its rows and cache."""
    if model.act_sharding is None:
        return sl
    c = model.act_sharding.constrain
    cache = sl.cache
    rows = {f: c(getattr(sl, f), ("batch",) + (None,) * (getattr(sl, f).ndim - 1))
            for f in ("request_B", "limit_B", "drawn_B", "last_B", "live_B", "stopped_B", "tokens_BxN", "logp_BxN")}
    layers = lambda kv_L: tuple(c(x, CACHE_AXES) for x in kv_L)  # noqa: E731
    return sl.replace(cache=SlotCache(layers(cache.k_LxBxKxHxS), layers(cache.v_LxBxKxSxH),
                                      c(cache.lengths_B, ("batch",))), **rows)


# Every trace bumps this (a Python side effect runs only while tracing); tests read it to prove reuse.
TRACES = {"admit": 0, "decode": 0}


def _draw(logits_BxV, key, request_B, index_B, cfg: SamplerConfig):
    """One token per row, keyed by (request, token index) so a row's draw is its own whatever its slot."""
    keys = jax.vmap(lambda r, i: jax.random.fold_in(jax.random.fold_in(key, r), i))(request_B, index_B)
    token_B, logp_B = jax.vmap(lambda lg, k: sample_tokens(lg[None], k, cfg))(logits_BxV, keys)
    return token_B[:, 0], logp_B[:, 0]


def _record(sl: Slots, writing_B, token_B, logp_B, cfg: SamplerConfig) -> Slots:
    """Append each writing slot's new token to its request and retire the requests that end on it."""
    N = sl.tokens_BxN.shape[1]
    rows_B = jnp.arange(token_B.shape[0])
    at_B = jnp.where(writing_B, sl.drawn_B, N)  # N: out of range, dropped
    tokens_BxN = sl.tokens_BxN.at[rows_B, at_B].set(token_B, mode="drop")
    stop_B = stops(tokens_BxN, jnp.minimum(sl.drawn_B, N - 1), cfg)
    drawn_B = sl.drawn_B + writing_B
    ends_B = writing_B & (stop_B | (drawn_B >= sl.limit_B))
    return sl.replace(
        tokens_BxN=tokens_BxN,
        logp_BxN=sl.logp_BxN.at[rows_B, at_B].set(logp_B, mode="drop"),
        drawn_B=drawn_B,
        last_B=jnp.where(writing_B, token_B, sl.last_B),
        live_B=jnp.where(writing_B, ~ends_B, sl.live_B),
        stopped_B=jnp.where(writing_B, stop_B, sl.stopped_B),
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"), donate_argnames=("sl",))
def _admit(graphdef, state, sl: Slots, key, prompt_1xT, length, slots_A, requests_A, limits_A,
           cfg: SamplerConfig) -> Slots:
    """Prefill one prompt into the slots `slots_A` (B pads the list) for `requests_A`; draw their first tokens."""
    TRACES["admit"] += 1
    model: Transformer = nnx.merge(graphdef, state)
    B = sl.live_B.shape[0]
    logits_V, cache = model.prefill_slots(prompt_1xT, length, sl.cache, slots_A)
    put = lambda x, v: x.at[slots_A].set(v, mode="drop")  # noqa: E731
    sl = sl.replace(cache=cache, request_B=put(sl.request_B, requests_A), limit_B=put(sl.limit_B, limits_A),
                    drawn_B=put(sl.drawn_B, 0), tokens_BxN=put(sl.tokens_BxN, cfg.pad_id),
                    logp_BxN=put(sl.logp_BxN, 0.0))
    writing_B = put(jnp.zeros((B,), bool), True)
    token_B, logp_B = _draw(jnp.broadcast_to(logits_V, (B, logits_V.shape[0])), key, sl.request_B,
                            jnp.zeros((B,), jnp.int32), cfg)
    return _laid_out(_record(sl, writing_B, token_B, logp_B, cfg), model)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "read_len"), donate_argnames=("sl",))
def _decode(graphdef, state, sl: Slots, key, cfg: SamplerConfig, read_len: int, steps, refill_at):
    """Decode every live slot until `steps` tokens were drawn, `refill_at` slots are free (a traced bound: 0
    means never), no slot is live, or a live row would outgrow the `read_len` window."""
    TRACES["decode"] += 1
    model: Transformer = nnx.merge(graphdef, state)

    def cond(carry):
        sl, n = carry
        fits = jnp.all(~sl.live_B | (sl.cache.lengths_B < read_len))
        free = jnp.sum(~sl.live_B)
        return (n < steps) & jnp.any(sl.live_B) & fits & ((refill_at == 0) | (free < refill_at))

    def body(carry):
        sl, n = carry
        logits_BxV, cache = model.decode_slots(sl.last_B, sl.cache, sl.live_B, read_len=read_len,
                                               impl=cfg.decode_impl)
        token_B, logp_B = _draw(logits_BxV, key, sl.request_B, sl.drawn_B, cfg)
        return _record(sl.replace(cache=cache), sl.live_B, token_B, logp_B, cfg), n + 1

    return _laid_out(jax.lax.while_loop(cond, body, (sl, jnp.int32(0)))[0], model)


@functools.partial(jax.jit, static_argnames=("graphdef", "B", "S", "N", "cfg"))
def _empty(graphdef, state, B: int, S: int, N: int, cfg: SamplerConfig) -> Slots:
    """Free slots, made by a compiled program so their arrays are laid out as the programs' outputs are (the
    first admit then compiles once, not once for fresh arrays and again for its own outputs)."""
    model: Transformer = nnx.merge(graphdef, state)
    zeros = lambda dtype: jnp.zeros((B,), dtype)  # noqa: E731
    return _laid_out(Slots(cache=model.init_slot_cache(B, S, cfg.cache_dtype), request_B=zeros(jnp.int32),
                           limit_B=zeros(jnp.int32), drawn_B=zeros(jnp.int32), last_B=zeros(jnp.int32),
                           live_B=zeros(bool), stopped_B=zeros(bool),
                           tokens_BxN=jnp.full((B, N), cfg.pad_id, jnp.int32),
                           logp_BxN=jnp.zeros((B, N), jnp.float32)), model)


def _read_window(longest: int, steps: int, S: int) -> int:
    """The decode program's attention window: a power of two (at least _MIN_READ) covering the longest live
    row `steps` tokens ahead, or the whole cache. Few distinct windows: few compiled programs.

    A window is a slice of the cache, which XLA copies before the attention reads it, and the copy is slow (a
    strided gather per row and head): on XLA's CPU backend a window of a fifth of the cache cost more than
    reading all of it (the toy long-tail benchmark), so a window is taken only below an eighth of the cache."""
    need = longest + steps
    window = _MIN_READ
    while window < need:
        window *= 2
    return window if 8 * window <= S else S


def generate(model: Transformer, prompts: Sequence[Sequence[int]], key, cfg: SamplerConfig, *,
             max_new_tokens_R: Sequence[int] | None = None, poll: Callable[[], None] | None = None,
             segment: int = 32) -> Rollout:
    """G = cfg.group_size completions of each prompt over `cfg.slots` decode slots; the lockstep sampler's
    `Rollout` (prompts left-padded to the longest prompt's bucket, completions to max_new_tokens).

    `max_new_tokens_R` caps each request on its own (a long-tailed benchmark mix); `segment` is the most
    tokens decoded between host visits (admitting requests, `poll()`); the device returns sooner once a
    quarter of the slots (or every waiting request's worth) are free.
    """
    check_fits(model.cfg, cfg)
    P, G, N, B = len(prompts), cfg.group_size, cfg.max_new_tokens, cfg.slots
    R = P * G
    if B < 1:
        raise ValueError(f"slots={B}: continuous batching needs at least one decode slot")
    if jax.process_count() > 1:
        raise NotImplementedError("continuous batching runs in one process (its host loop admits requests from "
                                  "local arrays); across processes use the lockstep sampler (slots=0)")
    limits = np.full((R,), N, np.int32) if max_new_tokens_R is None else np.asarray(max_new_tokens_R, np.int32)
    if limits.shape != (R,) or limits.min() < 1 or limits.max() > N:
        raise ValueError(f"max_new_tokens_R must hold {R} values in [1, {N}]")
    tokens_PxT, mask_PxT = pad_prompts(prompts, cfg)  # also checks every prompt fits
    S = cfg.max_prompt_len + N
    graphdef, state = nnx.split(model)
    sl = _empty(graphdef, state, B, S, N, cfg)
    out_tokens = np.full((R, N), cfg.pad_id, np.int32)
    out_logp = np.zeros((R, N), np.float32)
    out_len = np.zeros((R,), np.int32)
    out_stopped = np.zeros((R,), bool)

    waiting = collections.deque(range(R))
    owner = [None] * B  # the request each slot holds, until its row is copied out
    refill_at = max(1, B // 4)
    while True:
        free = [b for b in range(B) if owner[b] is None]
        while free and waiting:  # admit: one prefill per prompt for its requests that got a slot
            p = waiting[0] // G
            group = []
            while waiting and waiting[0] // G == p and free:
                group.append((free.pop(0), waiting.popleft()))
            n = len(prompts[p])
            prompt = np.full((1, cfg.bucket(n)), cfg.pad_id, np.int32)
            prompt[0, :n] = prompts[p]
            slots, reqs = np.full((G,), B, np.int32), np.zeros((G,), np.int32)
            slots[:len(group)], reqs[:len(group)] = zip(*group)
            for b, r in group:
                owner[b] = r
            sl = _admit(graphdef, state, sl, key, jnp.asarray(prompt), jnp.int32(n), jnp.asarray(slots),
                        jnp.asarray(reqs), jnp.asarray(limits[reqs]), cfg)
        live, lengths = (host_array(x) for x in (sl.live_B, sl.cache.lengths_B))
        if live.any():
            window = _read_window(int(lengths[live].max()), segment, S)
            sl = _decode(graphdef, state, sl, key, cfg, window, jnp.int32(segment),
                         jnp.int32(min(refill_at, len(waiting)) if waiting else 0))
            if poll is not None:
                poll()
            live = host_array(sl.live_B)
        done = [b for b in range(B) if owner[b] is not None and not live[b]]
        if done:  # copy the finished requests' rows out; their slots are free again
            tokens, logp, drawn, stopped = (host_array(x) for x in (sl.tokens_BxN, sl.logp_BxN, sl.drawn_B,
                                                                     sl.stopped_B))
            for b in done:
                r = owner[b]
                out_tokens[r], out_logp[r], out_len[r], out_stopped[r] = tokens[b], logp[b], drawn[b], stopped[b]
                owner[b] = None
        if not waiting and all(o is None for o in owner):
            break

    tokens_RxT, mask_RxT = (jnp.asarray(np.repeat(x, G, axis=0)) for x in (tokens_PxT, mask_PxT))
    return Rollout(prompt_tokens_BxT=tokens_RxT, prompt_mask_BxT=mask_RxT, tokens_BxT=jnp.asarray(out_tokens),
                   logp_BxT=jnp.asarray(out_logp), mask_BxT=jnp.asarray(np.arange(N)[None, :] < out_len[:, None]),
                   lengths_B=jnp.asarray(out_len), finished_B=jnp.asarray(out_stopped),
                   truncated_B=jnp.asarray(~out_stopped), group_size=G)
