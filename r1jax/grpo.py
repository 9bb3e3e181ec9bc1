"""GRPO loss math: group advantages, per-token KL estimators and the clipped surrogate.

Shapes: B rows (P prompts x G completions, each group contiguous), T completion tokens.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

SCALES = ("group", "batch", "none")
KL_KINDS = ("k1", "k2", "k3")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
IMPORTANCE_LEVELS = ("token", "sequence")

# exp(20) ~ 4.9e8: far past any clip range, yet finite in fp32 and bf16. verl uses the same bound.
LOG_RATIO_CLAMP = 20.0


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r}; expected one of {choices}")


def _sample_std(x, axis):
    # ddof=1, as TRL, verl and tunix use; a lone sample has no spread, so its std is 0, not NaN.
    n = x.shape[axis]
    centred = x - x.mean(axis=axis, keepdims=True)
    return jnp.sqrt(jnp.sum(jnp.square(centred), axis=axis) / max(n - 1, 1))


def _rewards_PxG(rewards_B, group_size):
    rewards_B = jnp.asarray(rewards_B, jnp.float32)
    if rewards_B.ndim != 1 or group_size < 1 or rewards_B.shape[0] % group_size:
        raise ValueError(f"rewards of shape {rewards_B.shape} do not split into groups of "
                         f"{group_size}")
    return rewards_B.reshape(-1, group_size)


def _zero_spread_P(rewards_PxG):
    return rewards_PxG.max(axis=1) == rewards_PxG.min(axis=1)


def group_advantages(rewards_B, group_size, *, scale="group", eps=1e-6):
    """GRPO advantages (r - mean(group)) / (std + eps); rows of a group are contiguous in rewards_B.

    scale: "group" divides by the group's std, "batch" by the std of all of rewards_B (taken about
    the batch mean; the mean subtracted stays the group's), "none" only subtracts the group mean
    (Dr. GRPO).
    std is the sample std (ddof=1), as in TRL, verl and tunix; eps is added to the std, outside the
    square root (1e-6 as verl and tunix; TRL uses 1e-4). A group whose rewards are all equal (or
    that has one member) gets exactly 0: its centred rewards would otherwise be float rounding
    noise, amplified by the division.
    """
    _check_choice("scale", scale, SCALES)
    rewards_PxG = _rewards_PxG(rewards_B, group_size)
    centred_PxG = rewards_PxG - rewards_PxG.mean(axis=1, keepdims=True)
    if scale == "group":
        adv_PxG = centred_PxG / (_sample_std(rewards_PxG, axis=1)[:, None] + eps)
    elif scale == "batch":
        adv_PxG = centred_PxG / (_sample_std(rewards_PxG.reshape(-1), axis=0) + eps)
    else:
        adv_PxG = centred_PxG
    adv_PxG = jnp.where(_zero_spread_P(rewards_PxG)[:, None], 0.0, adv_PxG)
    return adv_PxG.reshape(-1)


def zero_spread_fraction(rewards_B, group_size):
    """Share of groups whose rewards are all equal: they get zero advantage and teach nothing."""
    return _zero_spread_P(_rewards_PxG(rewards_B, group_size)).mean(dtype=jnp.float32)


def kl_penalty(logp_BxT, ref_logp_BxT, kind="k3"):
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (Schulman's k1-k3).

    k1 = log(pi/pi_ref): unbiased, can be negative. k2 = 0.5 * log(pi/pi_ref)^2: non-negative.
    k3 = pi_ref/pi - log(pi_ref/pi) - 1, R1's and DeepSeekMath's: unbiased and non-negative.
    k3 clamps log(pi_ref/pi) to +-LOG_RATIO_CLAMP so exp cannot overflow (gradient 0 beyond it).
    verl also caps k3 itself at 10; r1jax does not, so far-drifted tokens keep their pull to pi_ref.
    """
    _check_choice("kind", kind, KL_KINDS)
    log_ratio_BxT = logp_BxT.astype(jnp.float32) - ref_logp_BxT.astype(jnp.float32)
    if kind == "k1":
        return log_ratio_BxT
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio_BxT)
    ref_log_ratio_BxT = jnp.clip(-log_ratio_BxT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    # expm1(x) - x rather than exp(x) - x - 1: near pi == pi_ref, k3 ~ x^2/2 would drown in
    # rounding (exp(x) - x - 1 even goes negative). The floor at 0 guards an expm1 off by an ulp.
    return jnp.maximum(jnp.expm1(ref_log_ratio_BxT) - ref_log_ratio_BxT, 0.0)


class LossAux(NamedTuple):
    """What grpo_loss returns beside the loss; every field a scalar.

    loss_numerator, loss_denominator: see grpo_loss's accumulation contract.
    valid_tokens: this call's count of unmasked tokens. Every *_frac and *_mean is a mean over those
    tokens, so weighting by valid_tokens combines microbatches into the full batch's value exactly.
    clip_low_frac: share of tokens where the lower clip binds (ratio < 1 - clip_low and adv < 0);
    clip_high_frac: where the upper clip binds (ratio > 1 + clip_high and adv > 0);
    dual_clip_frac: where the dual clip binds (ratio > dual_clip and adv < 0). Where any binds, the
    token's surrogate gradient is exactly zero. ratio_mean: mean importance ratio as the loss used
    it; log_ratio_mean: mean per-token logp - old_logp (drift from the sampling policy);
    kl_mean: mean per-token KL estimate to the reference (0 without one).
    """

    loss_numerator: jax.Array
    loss_denominator: jax.Array
    valid_tokens: jax.Array
    clip_low_frac: jax.Array
    clip_high_frac: jax.Array
    dual_clip_frac: jax.Array
    ratio_mean: jax.Array
    log_ratio_mean: jax.Array
    kl_mean: jax.Array


def loss_denominator(mask_BxT, aggregation):
    """The loss's normaliser for these rows (int32): valid tokens for "token_mean", else rows with
    at least one valid token. Additive over rows: a batch's is the sum of its microbatches'."""
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    valid_BxT = jnp.asarray(mask_BxT).astype(bool)
    if aggregation == "token_mean":
        return valid_BxT.sum(dtype=jnp.int32)
    return valid_BxT.any(axis=1).sum(dtype=jnp.int32)


def grpo_loss(
    logp_BxT,
    old_logp_BxT,
    ref_logp_BxT,
    adv_B,
    mask_BxT,
    *,
    clip_low=0.2,
    clip_high=0.2,
    kl_coef=0.0,
    kl_kind="k3",
    aggregation="seq_mean_token_mean",
    max_len=None,
    dual_clip=None,
    importance="token",
    log_ratio_clamp=LOG_RATIO_CLAMP,
    normalizer=None,
):
    """Clipped GRPO surrogate plus kl_coef * KL to the reference, aggregated over valid tokens.

    Per token: ratio = exp(clip(logp - old_logp, +-log_ratio_clamp)); loss = -min(ratio * A,
    clip(ratio, 1 - clip_low, 1 + clip_high) * A) + kl_coef * kl_penalty(logp, ref_logp, kl_kind).
    dual_clip=c (> 1, verl's clip_ratio_c) also caps a negative-advantage token's loss at -c * A.
    importance="sequence" is GSPO: every token's ratio is exp(mean over the row's valid tokens of
    logp - old_logp), written as logp - sg(logp) + sg(mean) so the value is the sequence ratio and
    each token's gradient flows through its own logp ("GSPO-token", as in the paper and verl);
    the clip then acts on whole rows, so use GSPO's far smaller clip ranges (paper: 3e-4, 4e-4).
    ref_logp_BxT may be None only when kl_coef is the Python number 0. Masked positions may hold
    anything (even -inf or NaN logprobs): they never reach the loss or the gradient.

    aggregation (each a sum of per-row terms, divided by normalizer):
      "seq_mean_token_mean" (GRPO): each row's mean over its valid tokens, then the mean over rows;
      "token_mean" (DAPO): sum over all valid tokens / their count;
      "seq_mean_token_sum_norm" (Dr. GRPO): each row's token sum / max_len (required: the static
        generation budget, not the padded width), then the mean over rows.
    A row with no valid token contributes nothing and is not counted: it is as if absent, so padding
    a batch with empty rows changes neither loss nor gradient. No valid token at all gives loss 0.

    Accumulation contract: loss = aux.loss_numerator / normalizer, where the numerator is a sum over
    rows and normalizer defaults to aux.loss_denominator = loss_denominator(mask_BxT, aggregation).
    To split a batch into microbatches or over processes, pass every part the full batch's
    normalizer N (loss_denominator of the full mask, or the sum / psum of the parts'
    aux.loss_denominator): the parts' losses and gradients then sum to the full batch's. Group
    advantages must be computed on the full groups beforehand. Normalizers below 1 count as 1.

    Returns (loss, LossAux); the loss is float32 whatever the inputs' dtype.
    """
    _check_choice("kl_kind", kl_kind, KL_KINDS)
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    _check_choice("importance", importance, IMPORTANCE_LEVELS)
    if aggregation == "seq_mean_token_sum_norm" and max_len is None:
        raise ValueError('aggregation="seq_mean_token_sum_norm" needs max_len')
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip={dual_clip}; it must exceed 1")
    if ref_logp_BxT is None and not (isinstance(kl_coef, (int, float)) and kl_coef == 0):
        raise ValueError("ref_logp_BxT=None needs kl_coef=0")
    shape = jnp.shape(mask_BxT)
    others = [old_logp_BxT] + ([] if ref_logp_BxT is None else [ref_logp_BxT])
    if len(shape) != 2 or any(jnp.shape(x) != shape for x in [logp_BxT, *others]):
        raise ValueError(f"logp, old_logp, ref_logp and mask must share one (B, T) shape; "
                         f"mask is {shape}")
    if jnp.shape(adv_B) != shape[:1]:
        raise ValueError(f"adv_B has shape {jnp.shape(adv_B)}; expected {shape[:1]}")

    valid_BxT = jnp.asarray(mask_BxT).astype(bool)
    # Padding may hold -inf or NaN: zeroing it before any arithmetic keeps loss and gradient finite.
    logp_BxT = jnp.where(valid_BxT, logp_BxT.astype(jnp.float32), 0.0)
    old_logp_BxT = jnp.where(valid_BxT, old_logp_BxT.astype(jnp.float32), 0.0)
    adv_Bx1 = adv_B.astype(jnp.float32)[:, None]
    tokens_B = valid_BxT.sum(axis=1)
    valid_tokens = tokens_B.sum()

    def token_mean(x_BxT):
        return jnp.sum(jnp.where(valid_BxT, x_BxT, 0.0)) / jnp.maximum(valid_tokens, 1)

    log_ratio_BxT = logp_BxT - old_logp_BxT
    if importance == "sequence":
        seq_log_ratio_B = log_ratio_BxT.sum(axis=1) / jnp.maximum(tokens_B, 1)
        sg = jax.lax.stop_gradient
        used_log_ratio_BxT = logp_BxT - sg(logp_BxT) + sg(seq_log_ratio_B)[:, None]
    else:
        used_log_ratio_BxT = log_ratio_BxT
    ratio_BxT = jnp.exp(jnp.clip(used_log_ratio_BxT, -log_ratio_clamp, log_ratio_clamp))

    # PPO's min(r*A, clip(r)*A) binds on one side only: it caps r at 1 + clip_high when A > 0 and
    # floors it at 1 - clip_low when A < 0. Written with where, the bound is a constant, so the
    # gradient is exactly 0 where the clip binds and -A * r elsewhere (no half-gradients at ties).
    high_BxT = (ratio_BxT > 1.0 + clip_high) & (adv_Bx1 > 0)
    low_BxT = (ratio_BxT < 1.0 - clip_low) & (adv_Bx1 < 0)
    factor_BxT = jnp.where(high_BxT, 1.0 + clip_high, jnp.where(low_BxT, 1.0 - clip_low, ratio_BxT))
    if dual_clip is None:
        dual_BxT = jnp.zeros_like(valid_BxT)
    else:
        dual_BxT = (ratio_BxT > dual_clip) & (adv_Bx1 < 0)
        factor_BxT = jnp.where(dual_BxT, dual_clip, factor_BxT)
    per_token_BxT = -adv_Bx1 * factor_BxT

    if ref_logp_BxT is None:
        kl_BxT = jnp.zeros_like(per_token_BxT)
    else:
        ref_logp_BxT = jnp.where(valid_BxT, ref_logp_BxT.astype(jnp.float32), 0.0)
        kl_BxT = kl_penalty(logp_BxT, ref_logp_BxT, kl_kind)
        per_token_BxT = per_token_BxT + kl_coef * kl_BxT
    per_token_BxT = jnp.where(valid_BxT, per_token_BxT, 0.0)

    if aggregation == "seq_mean_token_mean":
        numerator = jnp.sum(per_token_BxT.sum(axis=1) / jnp.maximum(tokens_B, 1))
    elif aggregation == "token_mean":
        numerator = per_token_BxT.sum()
    else:
        numerator = per_token_BxT.sum() / max_len
    denominator = loss_denominator(valid_BxT, aggregation)
    norm = denominator if normalizer is None else normalizer
    loss = numerator / jnp.maximum(jnp.asarray(norm, jnp.float32), 1.0)

    aux = LossAux(
        loss_numerator=numerator,
        loss_denominator=denominator,
        valid_tokens=valid_tokens,
        clip_low_frac=token_mean(low_BxT),
        clip_high_frac=token_mean(high_BxT),
        dual_clip_frac=token_mean(dual_BxT),
        ratio_mean=token_mean(ratio_BxT),
        log_ratio_mean=token_mean(log_ratio_BxT),
        kl_mean=token_mean(kl_BxT),
    )
    return loss, jax.lax.stop_gradient(aux)
