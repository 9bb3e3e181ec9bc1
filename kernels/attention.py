"""Grouped-query attention behind one function, with a plain jnp reference.

Shapes: B rows, T queries, S keys, N query heads, K kv heads, R = N/K, H head dim.
"""
from typing import Literal

import jax
import jax.numpy as jnp

Impl = Literal["reference", "xla", "cudnn"]


def attention_reference(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS):
    """Softmax attention in fp32 with GQA; masked keys get no weight.

    A query whose keys are all masked (a left-pad position) gets a uniform average
    instead of NaN; its output is never read.
    """
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxSxKxH.shape[2]
    q_BxTxKxRxH = q_BxTxNxH.reshape(B, T, K, N // K, H).astype(jnp.float32)
    scores_BxKxRxTxS = jnp.einsum(
        "BTKRH,BSKH->BKRTS", q_BxTxKxRxH, k_BxSxKxH.astype(jnp.float32)
    ) / jnp.sqrt(jnp.float32(H))
    big_neg = jnp.finfo(jnp.float32).min
    scores_BxKxRxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxRxTxS, big_neg)
    probs_BxKxRxTxS = jax.nn.softmax(scores_BxKxRxTxS, axis=-1)
    out_BxTxKxRxH = jnp.einsum(
        "BKRTS,BSKH->BTKRH", probs_BxKxRxTxS, v_BxSxKxH.astype(jnp.float32)
    )
    return out_BxTxKxRxH.reshape(B, T, N, H).astype(q_BxTxNxH.dtype)


def attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, *, impl: Impl = "xla"):
    """Attention with an arbitrary boolean mask (causal, left padding, cache slots).

    "xla" and "cudnn" go through `jax.nn.dot_product_attention`, which handles GQA
    without repeating kv heads; "cudnn" is the fused flash kernel on NVIDIA GPUs
    (bf16/fp16 only). "reference" is the fp32 einsum path the others are tested
    against.
    """
    if impl == "reference":
        return attention_reference(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS)
    return jax.nn.dot_product_attention(
        q_BxTxNxH,
        k_BxSxKxH,
        v_BxSxKxH,
        mask=mask_BxTxS[:, None],
        implementation=impl,
    )


def cached_attention(q_BxTxNxH, k_BxKxHxS, v_BxKxSxH, mask_BxTxS):
    """T new queries over a KV cache laid out heads first: keys (B, K, H, S), values (B, K, S, H): the sampler's
    attention.

    Scores and softmax in fp32, GQA by grouping each kv head's R = N/K query heads. Each (row, kv head) is two
    plain matmuls over its own contiguous block of the cache, (R, H) x (H, S) and (R, S) x (S, H), so no layout
    change of the cache is needed at any step: with keys stored (S, H) XLA's CPU backend transposed every layer's
    key cache at every decode step to feed the score matmul. Returns fp32.
    """
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxKxHxS.shape[1]
    q_BxKxRxTxH = q_BxTxNxH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    scores_BxKxRxTxS = jnp.einsum("BKRTH,BKHS->BKRTS", q_BxKxRxTxH, k_BxKxHxS,
                                  preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(H))
    scores_BxKxRxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxRxTxS, jnp.finfo(jnp.float32).min)
    probs_BxKxRxTxS = jax.nn.softmax(scores_BxKxRxTxS, axis=-1)
    out_BxKxRxTxH = jnp.einsum("BKRTS,BKSH->BKRTH", probs_BxKxRxTxS.astype(v_BxKxSxH.dtype), v_BxKxSxH,
                               preferred_element_type=jnp.float32)
    return out_BxKxRxTxH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
