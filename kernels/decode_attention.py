"""Decode attention over a ragged KV cache: each row reads only its own filled slots.

Shapes: B rows (decode slots), N query heads, K kv heads, R = N/K, S cache slots, H head dim. One query per
row (the token being decoded). The cache is the model's layout: keys (B, K, H, S), values (B, K, S, H). `lengths_B` counts each row's filled slots, [0, length); a row of length 0
returns zeros.

`ragged_decode_attention` is the one function callers use: "xla" is the plain jnp form (it reads every slot
it is given and masks; the caller bounds the work by handing it only the cache's first `read_len` slots),
"pallas" the kernel, which walks each (row, kv head)'s cache in blocks and stops at the row's length, so a
row's cost follows its own length whatever its neighbours hold. The kernel is written in the Triton (GPU)
style: one program per (row, kv head), a loop over cache blocks with an online softmax in fp32. On CPU it
runs in Pallas' interpret mode (the tests' parity check); it was not compiled for a GPU or TPU here.
"""
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

DecodeImpl = Literal["xla", "pallas"]


def ragged_decode_reference(q_BxNxH, k_BxKxHxS, v_BxKxSxH, lengths_B):
    """Softmax attention of one query per row over slots [0, length) in fp32; zeros for an empty row."""
    B, N, H = q_BxNxH.shape
    K, S = k_BxKxHxS.shape[1], k_BxKxHxS.shape[3]
    q_BxKxRxH = q_BxNxH.reshape(B, K, N // K, H)
    scores_BxKxRxS = jnp.einsum("BKRH,BKHS->BKRS", q_BxKxRxH, k_BxKxHxS,
                                preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(H))
    valid_Bx1x1xS = (jnp.arange(S)[None, :] < lengths_B[:, None])[:, None, None, :]
    scores_BxKxRxS = jnp.where(valid_Bx1x1xS, scores_BxKxRxS, -jnp.inf)
    top = jnp.max(scores_BxKxRxS, axis=-1, keepdims=True)
    weights = jnp.exp(scores_BxKxRxS - jnp.where(jnp.isfinite(top), top, 0.0))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs_BxKxRxS = weights / jnp.where(total > 0, total, 1.0)
    out_BxKxRxH = jnp.einsum("BKRS,BKSH->BKRH", probs_BxKxRxS, v_BxKxSxH.astype(jnp.float32))
    return out_BxKxRxH.reshape(B, N, H)


def _kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, *, block: int):
    """One (row, kv head): q_ref (Rp, H), k_ref (H, S), v_ref (S, H), o_ref (Rp, H); lengths_ref (1,): the row's
    length."""
    length = lengths_ref[0]
    q_RxH = q_ref[...].astype(jnp.float32) / jnp.sqrt(jnp.float32(q_ref.shape[-1]))
    R, H = q_RxH.shape

    def body(i, carry):
        acc_RxH, top_R, total_R = carry
        slots = pl.ds(i * block, block)
        k_HxC = k_ref[:, slots].astype(jnp.float32)
        v_CxH = v_ref[slots, :].astype(jnp.float32)
        scores_RxC = jnp.dot(q_RxH, k_HxC, preferred_element_type=jnp.float32)
        valid_1xC = (i * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)) < length
        scores_RxC = jnp.where(valid_1xC, scores_RxC, -jnp.inf)
        new_top_R = jnp.maximum(top_R, jnp.max(scores_RxC, axis=1))  # every block holds a valid slot: finite
        rescale_R = jnp.exp(top_R - new_top_R)
        weights_RxC = jnp.exp(scores_RxC - new_top_R[:, None])
        acc_RxH = acc_RxH * rescale_R[:, None] + jnp.dot(weights_RxC, v_CxH, preferred_element_type=jnp.float32)
        return acc_RxH, new_top_R, total_R * rescale_R + jnp.sum(weights_RxC, axis=1)

    init = (jnp.zeros((R, H), jnp.float32), jnp.full((R,), -jnp.inf, jnp.float32), jnp.zeros((R,), jnp.float32))
    acc_RxH, _, total_R = jax.lax.fori_loop(0, pl.cdiv(length, block), body, init)
    o_ref[...] = (acc_RxH / jnp.where(total_R > 0, total_R, 1.0)[:, None]).astype(o_ref.dtype)


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("block", "interpret"))
def _pallas(q_BxNxH, k_BxKxHxS, v_BxKxSxH, lengths_B, *, block: int, interpret: bool):
    B, N, H = q_BxNxH.shape
    K, S = k_BxKxHxS.shape[1], k_BxKxHxS.shape[3]
    R = N // K
    # Triton's dots want both sides at least 16 wide and power-of-two blocks: pad the query heads of a group.
    Rp = _pow2_at_least(R, 16)
    q_BxKxRpxH = jnp.pad(q_BxNxH.reshape(B, K, R, H), ((0, 0), (0, 0), (0, Rp - R), (0, 0)))
    out = pl.pallas_call(
        functools.partial(_kernel, block=block),
        grid=(B, K),
        in_specs=[pl.BlockSpec((1,), lambda b, k: (b,)),
                  pl.BlockSpec((None, None, Rp, H), lambda b, k: (b, k, 0, 0)),
                  pl.BlockSpec((None, None, H, S), lambda b, k: (b, k, 0, 0)),
                  pl.BlockSpec((None, None, S, H), lambda b, k: (b, k, 0, 0))],
        out_specs=pl.BlockSpec((None, None, Rp, H), lambda b, k: (b, k, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((B, K, Rp, H), jnp.float32),
        interpret=interpret,
    )(lengths_B.astype(jnp.int32), q_BxKxRpxH, k_BxKxHxS, v_BxKxSxH)
    return out[:, :, :R].reshape(B, N, H)


def block_for(slots: int, largest: int = 128) -> int:
    """The kernel's cache block for a cache of `slots` slots: the largest power of two up to `largest` that
    divides it (so blocks never run past the cache)."""
    block = largest
    while slots % block:
        block //= 2
    return block


def ragged_decode_attention(q_BxNxH, k_BxKxHxS, v_BxKxSxH, lengths_B, *, impl: DecodeImpl = "xla"):
    """Attention of one query per row over that row's first `lengths_B` cache slots; fp32 out, (B, N, H)."""
    if impl == "xla":
        return ragged_decode_reference(q_BxNxH, k_BxKxHxS, v_BxKxSxH, lengths_B)
    if impl == "pallas":
        S = k_BxKxHxS.shape[3]
        return _pallas(q_BxNxH, k_BxKxHxS, v_BxKxSxH, lengths_B, block=block_for(S),
                       interpret=jax.default_backend() == "cpu")
    raise ValueError(f"decode attention impl={impl!r}; choose xla or pallas")
