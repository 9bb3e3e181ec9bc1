"""GRPO loss math: group advantages, per-token KL estimators, the clipped surrogate (PPO or CISPO),
and DAPO's overlong penalty and dynamic-sampling helpers.

Shapes: B rows (P prompts x G completions, each group contiguous), T completion tokens.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

SCALES = ("group", "batch", "none")
KL_KINDS = ("k1", "k2", "k3")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
IMPORTANCE_LEVELS = ("token", "sequence")
LOSS_TYPES = ("ppo", "cispo")

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


def tis_weights(old_logp_BxT, sampler_logp_BxT, cap, *, mask_BxT=None):
    """Truncated importance sampling: per token min(pi_old / pi_sampler, cap), stop-gradient.

    Corrects for the sampler's log-probs differing from the trainer's (bf16, top-k/top-p) when
    old_logp is recomputed by the trainer; pass the result as grpo_loss's is_weights_BxT. As verl's
    token-level rollout correction (rollout_is="token", rollout_is_threshold=cap): the log-ratio
    is clamped to +-LOG_RATIO_CLAMP before exp; masked positions (may hold junk) get weight 0.
    """
    if isinstance(cap, (int, float)) and not cap > 0:
        raise ValueError(f"cap={cap}; it must be positive")
    log_w_BxT = old_logp_BxT.astype(jnp.float32) - sampler_logp_BxT.astype(jnp.float32)
    w_BxT = jnp.minimum(jnp.exp(jnp.clip(log_w_BxT, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), cap)
    if mask_BxT is not None:
        w_BxT = jnp.where(jnp.asarray(mask_BxT).astype(bool), w_BxT, 0.0)
    return jax.lax.stop_gradient(w_BxT)


class LossAux(NamedTuple):
    """What grpo_loss returns beside the loss; every field a scalar.

    loss_numerator, loss_denominator: see grpo_loss's accumulation contract.
    valid_tokens: this call's count of unmasked tokens. Every *_frac and *_mean is a mean over those
    tokens, so weighting by valid_tokens combines microbatches into the full batch's value exactly.
    ppo: clip_low_frac: share of tokens where the lower clip binds (ratio < 1 - clip_low and
    adv < 0); clip_high_frac: where the upper clip binds (ratio > 1 + clip_high and adv > 0);
    dual_clip_frac: where the dual clip binds (ratio > dual_clip and adv < 0). Where any binds, the
    token's surrogate gradient is exactly zero.
    cispo: clip_low_frac / clip_high_frac: where the IS weight was clipped (ratio < 1 - clip_low,
    ratio > 1 + clip_high, whatever adv's sign); those tokens keep their gradient. dual_clip_frac 0.
    ratio_mean: mean importance ratio before clipping (after log_ratio_clamp and, for
    importance="sequence", the row mean); log_ratio_mean: mean per-token logp - old_logp (drift
    from the sampling policy);
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
    loss_type="ppo",
    is_weights_BxT=None,
):
    """Clipped GRPO surrogate plus kl_coef * KL to the reference, aggregated over valid tokens.

    Per token: ratio = exp(clip(logp - old_logp, +-log_ratio_clamp)); loss = -min(ratio * A,
    clip(ratio, 1 - clip_low, 1 + clip_high) * A) + kl_coef * kl_penalty(logp, ref_logp, kl_kind).
    dual_clip=c (> 1, verl's clip_ratio_c) also caps a negative-advantage token's loss at -c * A.
    loss_type="cispo" (MiniMax-M1) replaces the surrogate with -sg(clip(ratio, 1 - clip_low,
    1 + clip_high)) * A * logp: the clipped IS weight is a constant, so every token keeps a
    gradient (-weight * A / N), where PPO zeroes clipped tokens' gradients. Its value is not PPO's
    (it holds logp); only its gradient is comparable. The bounds act whatever A's sign, as in
    verl's policy_loss "cispo" (clip_ratio_low/high). MiniMax-M1 set no lower bound: clip_low=1.0
    (bound 0). TRL's loss_type="cispo" caps the weight at epsilon_high (absolute; 5.0 recommended)
    with no lower bound: clip_low=1.0, clip_high=epsilon_high - 1. With importance="sequence" the
    weight is the clipped sequence ratio (TRL's sequence-level CISPO). No dual_clip for cispo.
    is_weights_BxT (e.g. tis_weights) multiply each token's surrogate term, not the KL term, as
    verl's rollout_is_weights and TRL's vLLM importance-sampling correction do.
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
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    if aggregation == "seq_mean_token_sum_norm" and max_len is None:
        raise ValueError('aggregation="seq_mean_token_sum_norm" needs max_len')
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip={dual_clip}; it must exceed 1")
    if dual_clip is not None and loss_type == "cispo":
        raise ValueError('dual_clip has no meaning for loss_type="cispo" (no gradient is cut)')
    if ref_logp_BxT is None and not (isinstance(kl_coef, (int, float)) and kl_coef == 0):
        raise ValueError("ref_logp_BxT=None needs kl_coef=0")
    shape = jnp.shape(mask_BxT)
    others = [old_logp_BxT] + [x for x in (ref_logp_BxT, is_weights_BxT) if x is not None]
    if len(shape) != 2 or any(jnp.shape(x) != shape for x in [logp_BxT, *others]):
        raise ValueError(f"logp, old_logp, ref_logp, is_weights and mask must share one (B, T) "
                         f"shape; mask is {shape}")
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

    high_BxT = ratio_BxT > 1.0 + clip_high
    low_BxT = ratio_BxT < 1.0 - clip_low
    dual_BxT = jnp.zeros_like(valid_BxT)
    if loss_type == "cispo":
        weight_BxT = jnp.where(high_BxT, 1.0 + clip_high,
                               jnp.where(low_BxT, 1.0 - clip_low, ratio_BxT))
        per_token_BxT = -adv_Bx1 * jax.lax.stop_gradient(weight_BxT) * logp_BxT
    else:
        # PPO's min(r*A, clip(r)*A) binds on one side only: it caps r at 1 + clip_high when A > 0
        # and floors it at 1 - clip_low when A < 0. Written with where, the bound is a constant, so
        # the gradient is exactly 0 where the clip binds and -A * r elsewhere (no half-gradients).
        high_BxT = high_BxT & (adv_Bx1 > 0)
        low_BxT = low_BxT & (adv_Bx1 < 0)
        factor_BxT = jnp.where(high_BxT, 1.0 + clip_high,
                               jnp.where(low_BxT, 1.0 - clip_low, ratio_BxT))
        if dual_clip is not None:
            dual_BxT = (ratio_BxT > dual_clip) & (adv_Bx1 < 0)
            factor_BxT = jnp.where(dual_BxT, dual_clip, factor_BxT)
        per_token_BxT = -adv_Bx1 * factor_BxT
    if is_weights_BxT is not None:
        is_weights_BxT = jnp.where(valid_BxT, is_weights_BxT.astype(jnp.float32), 0.0)
        per_token_BxT = per_token_BxT * jax.lax.stop_gradient(is_weights_BxT)

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


# ---------------------------------------------------------------- DAPO reward shaping and sampling


def overlong_penalty(lengths_B, max_len, cache_len, *, penalty_factor=1.0):
    """DAPO's soft overlong punishment, added to the reward: 0 up to max_len - cache_len tokens,
    then linear down to -penalty_factor at max_len, and -penalty_factor beyond it.

    lengths_B counts completion tokens as the loss mask does (verl counts the response's attention
    mask, EOS included); max_len is the generation budget (max_new_tokens), cache_len DAPO's L_cache
    (verl's overlong_buffer.len, NeMo-RL's overlong_buffer_length). Equal to verl's and NeMo-RL's
    min(-(L - (max_len - cache_len)) / cache_len * penalty_factor, 0) for every L <= max_len; they
    never see L > max_len, where the paper's (and this) penalty stays at -1 (times the factor).
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"cache_len={cache_len}; need 0 < cache_len <= max_len={max_len}")
    excess_B = jnp.asarray(lengths_B, jnp.float32) - (max_len - cache_len)
    return -penalty_factor * jnp.clip(excess_B / cache_len, 0.0, 1.0)


def informative_groups(rewards_PxG, *, atol=0.0):
    """DAPO dynamic sampling's filter: True for groups whose rewards are not all equal (max - min >
    atol); the others get zero advantage and teach nothing.

    verl (filter_groups, std > 0) and NeMo-RL (std > 0) filter the same way; max == min is exact
    where a float std of equal rewards can come out as rounding noise. Unlike verl, a group of one
    is dropped: its r1jax advantage is 0. Filter on the task reward (verl's DAPO recipe uses
    filter_groups.metric=acc; NeMo-RL the reward before overlong shaping), not the length-shaped
    total, or a length penalty alone would make a group look informative.
    """
    rewards_PxG = jnp.asarray(rewards_PxG, jnp.float32)
    if rewards_PxG.ndim != 2:
        raise ValueError(f"rewards of shape {rewards_PxG.shape}; expected (P, G)")
    return rewards_PxG.max(axis=1) - rewards_PxG.min(axis=1) > atol


def _concat(a, b):
    # The array's own namespace: host (NumPy) rollouts stay on the host, jax arrays stay jax.
    return a.__array_namespace__().concat([a, b])


def fill_batch(kept, new, target, *, group_size=1):
    """One round of DAPO dynamic sampling: append new's groups to kept, cut at target groups.

    kept (None at first) and new are pytrees of arrays (NumPy or jax) whose leading axis holds
    whole groups of group_size contiguous rows: a generation batch's informative rows, e.g.
    jax.tree.map(lambda x: x[jnp.repeat(keep_P, G)], rollout_rows). Returns (batch, overflow):
    batch holds the first target groups (earlier rounds first) and is full once its leading size is
    target * group_size; overflow holds the rest. verl (batch[:train_batch_size * n]) and NeMo-RL
    discard the overflow rather than carry it to the next step: so should the caller (NeMo-RL logs
    its size as dynamic_sampling_num_discarded_valid_samples). Generating until full, with a cap on
    rounds (verl's max_num_gen_batches), is the caller's loop.
    """
    joined = new if kept is None else jax.tree.map(_concat, kept, new)
    sizes = {len(x) for x in jax.tree.leaves(joined)}
    if len(sizes) > 1 or group_size < 1 or any(n % group_size for n in sizes):
        raise ValueError(f"leading sizes {sorted(sizes)} are not one whole number of groups of "
                         f"{group_size}")
    rows = target * group_size
    return jax.tree.map(lambda x: x[:rows], joined), jax.tree.map(lambda x: x[rows:], joined)
