"""Tests for r1jax.grpo: hand-worked values, PPO and CISPO gradients, accumulation, a NumPy
reference, DAPO's overlong penalty and dynamic-sampling helpers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, PartitionSpec

from r1jax import grpo

# Local (not a loaded profile) so no other test file's hypothesis settings change.
SETTINGS = settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
AGGREGATIONS = grpo.AGGREGATIONS
LN = math.log
# Deterministic tests go through jit (one compile per shape and option set), which also shows the
# loss jit-able with every option. Hypothesis tests run eagerly on one fixed (B, T) = (4, 5) shape
# and vary rows and lengths through the mask: XLA's per-op cache then makes each example cheap.
STATIC = ("clip_low", "clip_high", "kl_coef", "kl_kind", "aggregation", "max_len", "dual_clip",
          "importance", "loss_type")
loss_jit = jax.jit(grpo.grpo_loss, static_argnames=STATIC)
loss_and_grad_jit = jax.jit(jax.value_and_grad(grpo.grpo_loss, has_aux=True),
                            static_argnames=STATIC)
B, T = 4, 5


def close(actual, expected, tol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


# ---------------------------------------------------------------- NumPy reference (float64)


def np_group_advantages(rewards, group_size, scale, eps):
    r_PxG = np.asarray(rewards, np.float64).reshape(-1, group_size)
    centred = r_PxG - r_PxG.mean(axis=1, keepdims=True)
    if scale == "group":
        adv = centred / (r_PxG.std(axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        adv = centred / (r_PxG.std(ddof=1) + eps)
    else:
        adv = centred
    adv[r_PxG.max(axis=1) == r_PxG.min(axis=1)] = 0.0
    return adv.reshape(-1)


def np_grpo_loss(logp, old, ref, adv, mask, *, clip_low, clip_high, kl_coef, kl_kind,
                 aggregation, max_len, dual_clip, importance, loss_type):
    """Textbook PPO/GRPO, row by row, over the valid tokens only; empty rows are skipped."""
    rows = []
    for i in range(mask.shape[0]):
        idx = np.flatnonzero(mask[i])
        if idx.size == 0:
            continue
        lp = logp[i, idx].astype(np.float64)
        log_r = lp - old[i, idx].astype(np.float64)
        if importance == "sequence":
            log_r = np.full_like(log_r, log_r.mean())
        r = np.exp(np.clip(log_r, -20, 20))
        a = float(adv[i])
        if loss_type == "cispo":  # the clipped IS weight times A times logp (its value, not grad)
            losses = -np.clip(r, 1 - clip_low, 1 + clip_high) * a * lp
        else:
            losses = -np.minimum(r * a, np.clip(r, 1 - clip_low, 1 + clip_high) * a)
        if dual_clip is not None and a < 0:
            losses = np.minimum(losses, -dual_clip * a)
        if ref is not None:
            x = ref[i, idx].astype(np.float64) - lp  # log(pi_ref / pi)
            xc = np.clip(x, -20, 20)
            kl = {"k1": -x, "k2": 0.5 * x**2, "k3": np.exp(xc) - xc - 1}[kl_kind]
            losses = losses + kl_coef * kl
        rows.append(losses)
    if not rows:
        return 0.0
    if aggregation == "token_mean":
        return np.concatenate(rows).sum() / sum(len(x) for x in rows)
    if aggregation == "seq_mean_token_mean":
        return np.mean([x.mean() for x in rows])
    return np.mean([x.sum() / max_len for x in rows])


# ---------------------------------------------------------------- group advantages


def test_group_advantages_hand_values():
    # group 1 = [1, 0, 0, 0]: mean 0.25; sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    # group 2 = [1, 1, 1, 1]: no spread -> exactly 0.
    rewards_B = jnp.array([1.0, 0, 0, 0, 1, 1, 1, 1])
    adv_B = grpo.group_advantages(rewards_B, 4)
    low = -0.25 / 0.500001
    close(adv_B, [0.75 / 0.500001, low, low, low, 0, 0, 0, 0])
    # Dr. GRPO: only the group mean comes off.
    adv_B = grpo.group_advantages(rewards_B, 4, scale="none")
    close(adv_B, [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    # batch: mean 5/8; squared deviations 5 * 0.375^2 + 3 * 0.625^2 = 1.875; std = sqrt(1.875 / 7)
    # = 0.51754917; the group mean is still subtracted: 0.75 / (0.51754917 + 1e-6) = 1.44913487.
    adv_B = grpo.group_advantages(rewards_B, 4, scale="batch")
    close(adv_B, [1.44913487, -0.48304496, -0.48304496, -0.48304496, 0, 0, 0, 0])
    assert float(grpo.zero_spread_fraction(rewards_B, 4)) == 0.5


def test_group_advantages_eps_is_added_to_the_std():
    # [0, 2]: mean 1, sample std sqrt(2); eps = 0.5 -> +-1 / (1.41421356 + 0.5) = +-0.52240775.
    adv_B = grpo.group_advantages(jnp.array([0.0, 2.0]), 2, eps=0.5)
    close(adv_B, [-0.52240775, 0.52240775])


@pytest.mark.parametrize("scale", grpo.SCALES)
def test_zero_spread_groups_get_exactly_zero(scale):
    # 0.1 * 3 / 3 != 0.1 in float32, so a naive (r - mean) / (std + eps) gives rounding noise here.
    rewards_B = jnp.array([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.0, 1.0, 1.0])
    adv_B = grpo.group_advantages(rewards_B, 3, scale=scale)
    assert np.all(np.asarray(adv_B[:6]) == 0.0)
    assert np.all(np.asarray(adv_B[6:]) != 0.0)
    close(grpo.zero_spread_fraction(rewards_B, 3), 2 / 3)


def test_group_of_one_gives_zero_not_nan():
    adv_B = grpo.group_advantages(jnp.array([0.3, 1.0, -2.0]), 1)
    assert np.all(np.asarray(adv_B) == 0.0)
    assert float(grpo.zero_spread_fraction(jnp.array([0.3, 1.0]), 1)) == 1.0


@SETTINGS
@given(
    st.sampled_from([2, 3, 4, 6]),
    st.lists(st.integers(-8, 8).map(lambda k: k / 4), min_size=12, max_size=12),
    st.sampled_from(grpo.SCALES),
)
def test_group_advantages_match_numpy(group_size, rewards, scale):
    # Rule rewards are discrete: a grid of quarters keeps ties (zero-spread groups) common.
    rewards = np.array(rewards, np.float32)
    adv_B = grpo.group_advantages(jnp.asarray(rewards), group_size, scale=scale)
    close(adv_B, np_group_advantages(rewards, group_size, scale, 1e-6), tol=1e-5)
    spread = rewards.reshape(-1, group_size)
    close(grpo.zero_spread_fraction(jnp.asarray(rewards), group_size),
          np.mean(spread.max(1) == spread.min(1)))


def test_group_advantages_jit():
    f = jax.jit(grpo.group_advantages, static_argnames=("group_size", "scale"))
    rewards_B = jnp.array([1.0, 0.0, 0.5, 0.5])
    close(f(rewards_B, group_size=2, scale="group"), grpo.group_advantages(rewards_B, 2))


# ---------------------------------------------------------------- KL estimators

# logp - ref = [0, -0.5, 0.5, -1]; x = log(pi_ref / pi) = [0, 0.5, -0.5, 1].
KL_LOGP = [[-1.0, -2.0, -0.5, -3.0]]
KL_REF = [[-1.0, -1.5, -1.0, -2.0]]
KL_HAND = {
    "k1": [0.0, -0.5, 0.5, -1.0],
    "k2": [0.0, 0.125, 0.125, 0.5],  # 0.5 * x^2
    # e^x - x - 1: e^0.5 - 1.5 = 0.14872127; e^-0.5 - 0.5 = 0.10653066; e - 2 = 0.71828183
    "k3": [0.0, 0.14872127, 0.10653066, 0.71828183],
}


@pytest.mark.parametrize("kind", grpo.KL_KINDS)
def test_kl_penalty_hand_values(kind):
    close(grpo.kl_penalty(jnp.array(KL_LOGP), jnp.array(KL_REF), kind), [KL_HAND[kind]])


@pytest.mark.parametrize("kind", grpo.KL_KINDS)
def test_loss_adds_kl_coef_times_kl(kind):
    # Ratio 1 and zero advantage leave only 0.5 * kl; token means of the rows above:
    # k1 -1 / 4 = -0.25; k2 0.75 / 4 = 0.1875; k3 0.97353376 / 4 = 0.24338344.
    expected = {"k1": -0.25, "k2": 0.1875, "k3": 0.24338344}[kind]
    logp = jnp.array(KL_LOGP)
    loss, aux = loss_jit(logp, logp, jnp.array(KL_REF), jnp.zeros(1), jnp.ones((1, 4)),
                         kl_coef=0.5, kl_kind=kind, aggregation="token_mean")
    close(loss, 0.5 * expected)
    close(aux.kl_mean, expected)


@SETTINGS
@given(
    st.lists(st.floats(-30, 0, width=32), min_size=16, max_size=16),
    st.lists(st.floats(-30, 30, width=32), min_size=16, max_size=16),
)
def test_k3_is_zero_at_equality_and_nonnegative(logp, shift):
    logp_1xT = jnp.array([logp], jnp.float32)
    ref_1xT = logp_1xT + jnp.array([shift], jnp.float32)
    assert np.all(np.asarray(grpo.kl_penalty(logp_1xT, logp_1xT, "k3")) == 0.0)
    kl_1xT = np.asarray(grpo.kl_penalty(logp_1xT, ref_1xT, "k3"))
    assert np.all(kl_1xT >= 0.0) and np.all(np.isfinite(kl_1xT))
    assert np.all(np.asarray(grpo.kl_penalty(logp_1xT, ref_1xT, "k2")) >= 0.0)


def test_k3_clamp_keeps_value_and_gradient_finite():
    logp = jnp.array([[-200.0, 0.0, -1.0]])
    ref = jnp.array([[0.0, -200.0, -1.0 + 1e-4]])
    kl, grad = jax.value_and_grad(lambda lp: grpo.kl_penalty(lp, ref, "k3").sum())(logp)
    assert np.all(np.isfinite(np.asarray(kl))) and np.all(np.isfinite(np.asarray(grad)))
    # log(pi_ref / pi) = +200 and -200 are clamped to +-20: e^20 - 21 and e^-20 + 19.
    close(grpo.kl_penalty(logp, ref, "k3")[0, :2], [math.exp(20) - 21, math.exp(-20) + 19])
    close(grad[0, :2], [0.0, 0.0])


# ---------------------------------------------------------------- hand-worked loss values

# B=2, T=3, old_logp = -1; ratios row 0 [1, 1.5, 0.5] with A = +1, row 1 [0.5, 1.5, (masked)]
# with A = -2; clip 0.2; k1 KL with coef 0.1, logp - ref = row 0 [0.5, 0, -1], row 1 [1, 0.5].
#   row 0 (A > 0): clip caps 1.5 at 1.2, 0.5 stays; -A * r = [-1, -1.2, -0.5]
#                  + 0.1 * kl [0.05, 0, -0.1] = [-0.95, -1.2, -0.6]; sum -2.75, mean -0.91666667
#   row 1 (A < 0): clip floors 0.5 at 0.8, 1.5 stays; -A * r = [1.6, 3.0]
#                  + 0.1 * kl [0.1, 0.05] = [1.7, 3.05]; sum 4.75, mean 2.375
#   seq_mean_token_mean: (-0.91666667 + 2.375) / 2 = 0.72916667 (numerator 1.45833333, 2 rows)
#   token_mean:          (-2.75 + 4.75) / 5 = 0.4 (numerator 2, 5 tokens)
#   seq_mean_token_sum_norm, max_len 5: (-2.75 / 5 + 4.75 / 5) / 2 = 0.2 (numerator 0.4, 2 rows)
# aux: clip_low 1/5, clip_high 1/5, ratio_mean (1 + 1.5 + 0.5 + 0.5 + 1.5) / 5 = 1,
#      log_ratio_mean 2 * ln(0.75) / 5 = -0.11507283, kl_mean (0.5 + 0 - 1 + 1 + 0.5) / 5 = 0.2.
HAND_RATIO = [[1.0, 1.5, 0.5], [0.5, 1.5, 1.0]]
HAND_KL = [[0.5, 0.0, -1.0], [1.0, 0.5, 0.0]]
HAND_MASK = [[1, 1, 1], [1, 1, 0]]
HAND_ADV = [1.0, -2.0]
HAND_EXPECTED = {
    "seq_mean_token_mean": (0.72916667, 1.45833333, 2),
    "token_mean": (0.4, 2.0, 5),
    "seq_mean_token_sum_norm": (0.2, 0.4, 2),
}


def hand_inputs():
    old = jnp.full((2, 3), -1.0)
    logp = old + jnp.log(jnp.array(HAND_RATIO))
    return logp, old, logp - jnp.array(HAND_KL), jnp.array(HAND_ADV), jnp.array(HAND_MASK)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_loss_hand_values(aggregation):
    loss, aux = loss_jit(*hand_inputs(), kl_coef=0.1, kl_kind="k1", aggregation=aggregation,
                         max_len=5)
    expected_loss, numerator, denominator = HAND_EXPECTED[aggregation]
    close(loss, expected_loss)
    close(aux.loss_numerator, numerator)
    assert int(aux.loss_denominator) == denominator
    assert int(aux.valid_tokens) == 5
    close([aux.clip_low_frac, aux.clip_high_frac, aux.dual_clip_frac], [0.2, 0.2, 0.0])
    close([aux.ratio_mean, aux.log_ratio_mean, aux.kl_mean], [1.0, 2 * LN(0.75) / 5, 0.2])


def test_dual_clip_hand_values():
    # A = -1, ratios [4, 2, 0.5], dual_clip 3: losses -A * [min(4, 3), 2, max(0.5, 0.8)]
    # = [3, 2, 0.8]
    # -> token mean 5.8 / 3; without the dual clip [4, 2, 0.8] -> 6.8 / 3.
    old = jnp.zeros((1, 3))
    logp = jnp.log(jnp.array([[4.0, 2.0, 0.5]]))
    args = (logp, old, None, jnp.array([-1.0]), jnp.ones((1, 3)))
    loss, aux = loss_jit(*args, aggregation="token_mean", dual_clip=3.0)
    close(loss, 5.8 / 3)
    close([aux.dual_clip_frac, aux.clip_low_frac, aux.clip_high_frac], [1 / 3, 1 / 3, 0.0])
    close(loss_jit(*args, aggregation="token_mean")[0], 6.8 / 3)


def test_sequence_importance_hand_values():
    # GSPO: row log-ratios [0.3, -0.1, (masked)] -> sequence log-ratio 0.1, ratio e^0.1 = 1.10517092
    # for both valid tokens; A = +1, seq_mean_token_mean: loss -1.10517092. The gradient reaches
    # each token through its own logp: d/dlogp_t = -A * s / n_valid = -1.10517092 / 2.
    old = jnp.zeros((1, 3))
    logp = jnp.array([[0.3, -0.1, 0.7]])
    mask = jnp.array([[1, 1, 0]])

    adv = jnp.array([1.0])
    (loss, aux), grad = loss_and_grad_jit(logp, old, None, adv, mask, importance="sequence")
    close(loss, -1.10517092)
    close(aux.ratio_mean, 1.10517092)
    close(grad, [[-1.10517092 / 2, -1.10517092 / 2, 0.0]])
    # Mean log-ratio 0.3 -> ratio 1.34986 > 1.2 with A > 0: the whole row is clipped, gradient 0.
    (loss, aux), grad = loss_and_grad_jit(logp + 0.2, old, None, adv, mask, importance="sequence")
    close(loss, -1.2)
    close(aux.clip_high_frac, 1.0)
    assert np.all(np.asarray(grad) == 0.0)


# ---------------------------------------------------------------- PPO clip regions and gradients


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gradient_matches_ppo_definition(aggregation):
    # One token per row: both advantage signs x ratio below 1 - clip_low, inside, and above
    # 1 + clip_high (asymmetric: DAPO's clip-higher). d loss / d logp = -A * r / N where the clip
    # is idle, exactly 0 where it binds: A > 0 with r > 1 + clip_high, A < 0 with r < 1 - clip_low.
    ratio = np.array([0.5, 1.1, 1.5, 0.5, 1.1, 1.5], np.float32)
    adv = np.array([1.5, 1.5, 1.5, -1.5, -1.5, -1.5], np.float32)
    binds = np.array([False, False, True, True, False, False])
    old = jnp.full((6, 1), -2.0)
    logp = old + jnp.log(jnp.asarray(ratio))[:, None]

    (loss, aux), grad = loss_and_grad_jit(logp, old, None, jnp.asarray(adv), jnp.ones((6, 1)),
                                          clip_low=0.2, clip_high=0.28, aggregation=aggregation,
                                          max_len=1)
    ratio = np.exp(np.asarray(logp - old))[:, 0]
    expected_grad = np.where(binds, 0.0, -adv * ratio / 6)
    close(grad[:, 0], expected_grad)
    assert np.all(np.asarray(grad)[binds] == 0.0)
    assert np.all(np.asarray(grad)[~binds] != 0.0)
    clipped = np.where(adv > 0, np.minimum(ratio, 1.28), np.maximum(ratio, 0.8))
    close(loss, np.mean(-adv * clipped))
    close([aux.clip_low_frac, aux.clip_high_frac], [1 / 6, 1 / 6])


def test_dual_clip_gradient():
    # A < 0: ratio 4 > dual_clip 3 is capped (gradient 0); ratio 2 is not (gradient -A * r / N).
    old = jnp.zeros((2, 1))
    logp = jnp.log(jnp.array([[4.0], [2.0]]))
    _, grad = loss_and_grad_jit(logp, old, None, jnp.array([-1.0, -1.0]), jnp.ones((2, 1)),
                                aggregation="token_mean", dual_clip=3.0)
    assert float(grad[0, 0]) == 0.0
    close(grad[1, 0], 1.0 * 2.0 / 2)


# ---------------------------------------------------------------- CISPO and IS weights

# 1x3, logp = [-1, -2, -3], ratios [1.5, 1.0, 0.5] (old = logp - log ratio), clip 0.2 / 0.28:
# IS weights clip(r, 0.8, 1.28) = [1.28, 1.0, 0.8], whatever A's sign.
CISPO_LOGP = [[-1.0, -2.0, -3.0]]
CISPO_RATIO = [[1.5, 1.0, 0.5]]


def cispo_inputs():
    logp = jnp.array(CISPO_LOGP)
    return logp, logp - jnp.log(jnp.array(CISPO_RATIO))


# Normaliser N by aggregation for one row of 3 valid tokens: the token count, or (one row) its
# token mean, or Dr. GRPO's max_len = 5.
CISPO_N = {"token_mean": 3, "seq_mean_token_mean": 3, "seq_mean_token_sum_norm": 5}


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_cispo_hand_values_and_gradients(aggregation):
    logp, old = cispo_inputs()
    n = CISPO_N[aggregation]
    opts = dict(clip_low=0.2, clip_high=0.28, aggregation=aggregation, max_len=5)
    # A = +2: -w * A * logp = [1.28 * 2 * 1, 1 * 2 * 2, 0.8 * 2 * 3] = [2.56, 4.0, 4.8], sum 11.36.
    # d/dlogp = -w * A / N = [-2.56, -2.0, -1.6] / N: the two clipped tokens keep -clip * A / N.
    (loss, aux), grad = loss_and_grad_jit(logp, old, None, jnp.array([2.0]), jnp.ones((1, 3)),
                                          loss_type="cispo", **opts)
    close(loss, 11.36 / n)
    close(grad, [[-2.56 / n, -2.0 / n, -1.6 / n]])
    # The IS weight was clipped above on token 0 and below on token 2, though A > 0.
    close([aux.clip_high_frac, aux.clip_low_frac, aux.dual_clip_frac], [1 / 3, 1 / 3, 0.0])
    close([aux.ratio_mean, aux.log_ratio_mean], [1.0, LN(0.75) / 3])
    # PPO on the same tokens: token 0 (r 1.5 > 1.28, A > 0) gets exactly no gradient; token 2
    # (r 0.5, A > 0) is not clipped by PPO: -A * r / N = -1 / N; loss -A * [1.28, 1, 0.5] / N.
    (ppo_loss, ppo_aux), ppo_grad = loss_and_grad_jit(
        logp, old, None, jnp.array([2.0]), jnp.ones((1, 3)), loss_type="ppo", **opts)
    close(ppo_loss, -5.56 / n)
    close(ppo_grad, [[0.0, -2.0 / n, -1.0 / n]])
    close([ppo_aux.clip_high_frac, ppo_aux.clip_low_frac], [1 / 3, 0.0])
    # A = -1: -w * A * logp = w * logp = [-1.28, -2.0, -2.4], sum -5.68; d/dlogp = w / N.
    (loss, aux), grad = loss_and_grad_jit(logp, old, None, jnp.array([-1.0]), jnp.ones((1, 3)),
                                          loss_type="cispo", **opts)
    close(loss, -5.68 / n)
    close(grad, [[1.28 / n, 1.0 / n, 0.8 / n]])
    close([aux.clip_high_frac, aux.clip_low_frac], [1 / 3, 1 / 3])


def test_cispo_kl_term_adds_as_for_ppo():
    # k1 KL = logp - ref = [0.5, 0, -1] with coef 0.1, token mean: loss += 0.1 * -0.5 / 3, so
    # 11.36 / 3 - 0.01666667 = 3.77; d k1 / d logp = 1, so each gradient gains 0.1 / 3:
    # [-2.56 / 3 + 0.1 / 3, -2 / 3 + 0.1 / 3, -1.6 / 3 + 0.1 / 3] = [-0.82, -0.63333333, -0.5].
    logp, old = cispo_inputs()
    ref = logp - jnp.array([[0.5, 0.0, -1.0]])
    (loss, aux), grad = loss_and_grad_jit(logp, old, ref, jnp.array([2.0]), jnp.ones((1, 3)),
                                          clip_low=0.2, clip_high=0.28, kl_coef=0.1,
                                          kl_kind="k1", aggregation="token_mean",
                                          loss_type="cispo")
    close(loss, 3.77)
    close(grad, [[-0.82, -0.63333333, -0.5]])
    close(aux.kl_mean, -0.5 / 3)


def test_cispo_trl_mapping_upper_cap_only():
    # TRL's loss_type="cispo" with epsilon_high=5 is clamp(r, max=5): clip_low=1 (lower bound 0),
    # clip_high=4. Ratios [6, 0.01, 2], logp -1, A = 1: weights [5, 0.01, 2]; -w * A * logp = w,
    # token mean 7.01 / 3 = 2.33666667; d/dlogp = -w / 3.
    logp = jnp.full((1, 3), -1.0)
    old = logp - jnp.log(jnp.array([[6.0, 0.01, 2.0]]))
    (loss, aux), grad = loss_and_grad_jit(logp, old, None, jnp.ones(1), jnp.ones((1, 3)),
                                          clip_low=1.0, clip_high=4.0, aggregation="token_mean",
                                          loss_type="cispo")
    close(loss, 2.33666667)
    close(grad, [[-5 / 3, -0.01 / 3, -2 / 3]])
    close([aux.clip_high_frac, aux.clip_low_frac], [1 / 3, 0.0])


def test_is_weights_scale_the_surrogate_not_the_kl():
    # Ratio 1, A = 1, weights [0.5, 2, (masked: NaN)], k1 KL 1 per token with coef 0.1:
    # per token -A * w + 0.1 * 1 = [-0.4, -1.9]; token mean -1.15. d/dlogp = -A * w / 2 + 0.1 / 2
    # = [-0.2, -0.95] (the weights carry no gradient), 0 on the masked token.
    logp = jnp.full((1, 3), -1.0)
    mask = jnp.array([[1, 1, 0]])
    weights = jnp.array([[0.5, 2.0, jnp.nan]])
    (loss, _), grad = loss_and_grad_jit(logp, logp, logp - 1.0, jnp.ones(1), mask, kl_coef=0.1,
                                        kl_kind="k1", aggregation="token_mean",
                                        is_weights_BxT=weights)
    close(loss, -1.15)
    close(grad, [[-0.2, -0.95, 0.0]])


def test_tis_weights_hand_values():
    # old - sampler = [ln 2, -ln 2, ln 10, junk (masked)], cap 3: [2, 0.5, min(10, 3) = 3, 0].
    old = jnp.array([[-1.0, -1.0, -1.0, -jnp.inf]])
    sampler = jnp.array([[-1 - LN(2), -1 + LN(2), -1 - LN(10), -jnp.inf]])
    mask = jnp.array([[1, 1, 1, 0]])
    close(grpo.tis_weights(old, sampler, 3.0, mask_BxT=mask), [[2.0, 0.5, 3.0, 0.0]])
    close(grpo.tis_weights(old[:, :3], sampler[:, :3], 1.0), [[1.0, 0.5, 1.0]])
    # Stop-gradient: the weights change the measure, not the objective.
    grad = jax.grad(lambda o: grpo.tis_weights(o, sampler, 3.0, mask_BxT=mask).sum())(old)
    assert np.all(np.asarray(grad) == 0.0)
    with pytest.raises(ValueError):
        grpo.tis_weights(old, sampler, 0.0)


# ---------------------------------------------------------------- invariants (hypothesis)


def boolean_matrix():
    # Rows of any length, empty rows included, inside the fixed (B, T) shape.
    return st.lists(st.booleans(), min_size=B * T, max_size=B * T).map(
        lambda x: np.array(x).reshape(B, T))


def float_list(lo, hi, size):
    return st.lists(st.floats(lo, hi, width=32), min_size=size, max_size=size).map(
        lambda x: np.array(x, np.float32))


@SETTINGS
@given(boolean_matrix(), float_list(-3, 3, B), st.sampled_from(AGGREGATIONS),
       st.sampled_from([T, 8]))
def test_ratio_one_loss_is_minus_aggregated_advantage(mask, adv, aggregation, max_len):
    logp = jnp.asarray(np.linspace(-3, -0.1, B * T, dtype=np.float32).reshape(B, T))
    loss, aux = grpo.grpo_loss(logp, logp, None, jnp.asarray(adv), jnp.asarray(mask),
                               aggregation=aggregation, max_len=max_len)
    n_B = mask.sum(axis=1)
    rows = n_B > 0
    if not rows.any():
        expected = 0.0
    elif aggregation == "token_mean":
        expected = -(adv * n_B).sum() / n_B.sum()
    elif aggregation == "seq_mean_token_mean":
        expected = -adv[rows].mean()
    else:
        expected = -(adv * n_B / max_len)[rows].mean()
    close(loss, expected)
    assert float(aux.clip_low_frac) == 0.0 and float(aux.clip_high_frac) == 0.0
    close(aux.ratio_mean, float(rows.any()))


@st.composite
def loss_inputs(draw):
    def matrix(lo, hi):
        return draw(float_list(lo, hi, B * T)).reshape(B, T)

    logp = matrix(-6, 0)
    # Log-ratios that land in every clip region: below 1 - 0.2, inside, between 1.2 and 1.28 (where
    # only the symmetric clip binds), above 1.28, and past the dual clip at 3.
    regions = st.sampled_from([LN(0.5), LN(0.9), LN(1.1), LN(1.24), LN(1.5), LN(3.5)])
    log_ratio = st.one_of(st.floats(-1.5, 1.5, width=32), regions)
    old = logp - np.array(draw(st.lists(log_ratio, min_size=B * T, max_size=B * T)),
                          np.float32).reshape(B, T)
    kl_coef = draw(st.sampled_from([0.0, 0.1]))
    ref = None if kl_coef == 0 and draw(st.booleans()) else logp + matrix(-3, 3)
    adv = draw(float_list(-3, 3, B))
    mask = draw(boolean_matrix())
    loss_type = draw(st.sampled_from(grpo.LOSS_TYPES))
    options = dict(
        clip_low=0.2,
        clip_high=draw(st.sampled_from([0.2, 0.28])),
        kl_coef=kl_coef,
        kl_kind=draw(st.sampled_from(grpo.KL_KINDS)),
        aggregation=draw(st.sampled_from(AGGREGATIONS)),
        max_len=draw(st.sampled_from([T, 8])),
        dual_clip=None if loss_type == "cispo" else draw(st.sampled_from([None, 3.0])),
        importance=draw(st.sampled_from(grpo.IMPORTANCE_LEVELS)),
        loss_type=loss_type,
    )
    return (logp, old, ref, adv, mask), options


@SETTINGS
@given(loss_inputs())
def test_loss_matches_numpy_reference(inputs_and_options):
    (logp, old, ref, adv, mask), options = inputs_and_options
    # Masked positions hold junk; neither implementation may let it through.
    nan = np.where(mask, 0.0, np.nan).astype(np.float32)
    inf = np.where(mask, 0.0, np.inf).astype(np.float32)
    loss, aux = grpo.grpo_loss(
        jnp.asarray(logp + nan), jnp.asarray(old + inf),
        None if ref is None else jnp.asarray(ref - inf), jnp.asarray(adv), jnp.asarray(mask),
        **options)
    expected = np_grpo_loss(logp, old, ref, adv, mask, **options)
    close(loss, expected, tol=1e-5)
    assert np.isfinite(float(aux.ratio_mean)) and np.isfinite(float(aux.kl_mean))


# ---------------------------------------------------------------- accumulation and empty rows


def accumulation_inputs(seed, batch):
    rng = np.random.default_rng(seed)
    logp = rng.uniform(-4, -0.05, (batch, T)).astype(np.float32)
    old = (logp + rng.uniform(-0.6, 0.6, (batch, T))).astype(np.float32)
    ref = (logp + rng.uniform(-0.5, 0.5, (batch, T))).astype(np.float32)
    adv = rng.normal(size=batch).astype(np.float32)
    lengths = rng.integers(1, T + 1, batch)
    lengths[1] = 0  # one empty row
    mask = np.arange(T)[None, :] < lengths[:, None]
    return [jnp.asarray(x) for x in (logp, old, ref, adv, mask)]


def loss_and_grad(logp, old, ref, adv, mask, options, normalizer=None):
    loss_fn = lambda lp: grpo.grpo_loss(lp, old, ref, adv, mask, normalizer=normalizer, **options)
    return jax.value_and_grad(loss_fn, has_aux=True)(logp)


@pytest.mark.parametrize("importance, loss_type",
                         [("token", "ppo"), ("sequence", "ppo"), ("token", "cispo")])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_microbatches_reproduce_full_batch_loss_and_gradient(aggregation, importance, loss_type):
    inputs = accumulation_inputs(seed=0, batch=2 * B)
    options = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05, kl_kind="k3",
                   aggregation=aggregation, max_len=8, importance=importance, loss_type=loss_type,
                   dual_clip=3.0 if loss_type == "ppo" else None)
    (full_loss, full_aux), full_grad = loss_and_grad(*inputs, options)
    # The trainer knows every mask before any forward pass, so it can sum the normaliser up front.
    normalizer = grpo.loss_denominator(inputs[-1], aggregation)
    assert int(normalizer) == int(full_aux.loss_denominator)
    parts = [loss_and_grad(*[x[lo:lo + B] for x in inputs], options, normalizer) for lo in (0, B)]
    close(sum(loss for (loss, _), _ in parts), full_loss)
    close(jnp.concatenate([grad for _, grad in parts]), full_grad)
    # The aux pieces add up too: numerators and denominators sum, token means weight by tokens.
    numerator = sum(aux.loss_numerator for (_, aux), _ in parts)
    denominator = sum(aux.loss_denominator for (_, aux), _ in parts)
    assert int(denominator) == int(normalizer)
    close(numerator / denominator, full_loss)
    tokens = sum(aux.valid_tokens for (_, aux), _ in parts)
    for field in ("kl_mean", "ratio_mean", "clip_low_frac", "clip_high_frac"):
        weighted = sum(getattr(aux, field) * aux.valid_tokens for (_, aux), _ in parts) / tokens
        close(weighted, getattr(full_aux, field))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_processes_psum_reproduce_full_batch(aggregation):
    # Each of 8 devices (stand-ins for processes) holds one row, computes its loss with the psum'd
    # global normaliser; the psum of the losses and the per-device gradients equal the full batch's.
    inputs = accumulation_inputs(seed=1, batch=2 * B)
    options = dict(kl_coef=0.05, aggregation=aggregation, max_len=8)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    rows = PartitionSpec("data")

    def local(logp, old, ref, adv, mask):
        normalizer = jax.lax.psum(grpo.loss_denominator(mask, aggregation), "data")
        (loss, _), grad = loss_and_grad(logp, old, ref, adv, mask, options, normalizer)
        return jax.lax.psum(loss, "data"), grad

    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(rows,) * 5,
                                    out_specs=(PartitionSpec(), rows)))
    loss, grad = sharded(*inputs)
    (full_loss, _), full_grad = loss_and_grad(*inputs, options)
    close(loss, full_loss)
    close(grad, full_grad)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_empty_rows_are_as_if_absent(aggregation):
    inputs = accumulation_inputs(seed=2, batch=B)
    options = dict(kl_coef=0.05, aggregation=aggregation, max_len=8)
    (loss, _), grad = loss_and_grad(*inputs, options)
    # Pad with all-masked rows full of junk, as filling a device mesh would.
    logp, old, ref, adv, mask = inputs
    pad = lambda x, value: jnp.concatenate([x, jnp.full(x.shape, value, x.dtype)])
    padded = (pad(logp, -jnp.inf), pad(old, jnp.nan), pad(ref, jnp.inf), pad(adv, 5.0),
              pad(mask, False))
    (padded_loss, _), padded_grad = loss_and_grad(*padded, options)
    close(padded_loss, loss)
    close(padded_grad[:B], grad)
    assert np.all(np.asarray(padded_grad[B:]) == 0.0)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_fully_masked_batch_gives_zero_not_nan(aggregation):
    logp = jnp.full((B, T), -jnp.inf)
    options = dict(kl_coef=0.1, aggregation=aggregation, max_len=T)
    mask = jnp.zeros((B, T), bool)
    (loss, aux), grad = loss_and_grad(logp, logp, logp, jnp.ones(B), mask, options)
    assert float(loss) == 0.0 and int(aux.loss_denominator) == 0
    assert np.all(np.asarray(grad) == 0.0)
    assert all(np.isfinite(np.asarray(x)) for x in aux)


# ---------------------------------------------------------------- jit, dtypes, misuse


def test_jit_with_traced_normalizer_and_kl_coef():
    logp, old, ref, adv, mask = hand_inputs()
    f = jax.jit(grpo.grpo_loss, static_argnames=("aggregation", "kl_kind", "max_len"))
    loss, _ = f(logp, old, ref, adv, mask, kl_coef=jnp.float32(0.1), kl_kind="k1",
                aggregation="token_mean", normalizer=jnp.int32(10))
    close(loss, 2.0 / 10)


def test_bfloat16_inputs_give_float32_loss():
    logp, old, ref, adv, mask = hand_inputs()
    as_bf16 = [x.astype(jnp.bfloat16) for x in (logp, old, ref)]
    loss, _ = grpo.grpo_loss(*as_bf16, adv, mask, kl_coef=0.1)
    reference, _ = grpo.grpo_loss(*[x.astype(jnp.float32) for x in as_bf16], adv, mask, kl_coef=0.1)
    assert loss.dtype == jnp.float32
    close(loss, reference)


@pytest.mark.parametrize("bad", [
    dict(aggregation="seq_mean"),
    dict(kl_kind="k4"),
    dict(importance="group"),
    dict(aggregation="seq_mean_token_sum_norm"),  # no max_len
    dict(dual_clip=1.0),
    dict(kl_coef=0.1),  # ref_logp is None
    dict(loss_type="grpo"),
    dict(loss_type="cispo", dual_clip=3.0),
    dict(is_weights_BxT=jnp.ones((2, 2))),  # wrong shape
])
def test_misuse_raises(bad):
    logp, old, _, adv, mask = hand_inputs()
    with pytest.raises(ValueError):
        grpo.grpo_loss(logp, old, None, adv, mask, **bad)


def test_bad_shapes_and_options_raise():
    logp, old, ref, adv, mask = hand_inputs()
    with pytest.raises(ValueError):
        grpo.grpo_loss(logp, old[:, :2], ref, adv, mask)
    with pytest.raises(ValueError):
        grpo.grpo_loss(logp, old, ref, adv[:1], mask)
    with pytest.raises(ValueError):
        grpo.group_advantages(jnp.ones(5), 2)
    with pytest.raises(ValueError):
        grpo.group_advantages(jnp.ones(4), 2, scale="std")
    with pytest.raises(ValueError):
        grpo.kl_penalty(logp, ref, "k5")


# ---------------------------------------------------------------- DAPO: overlong penalty, sampling


def test_overlong_penalty_hand_values_at_the_boundaries():
    # max_len 10, cache 4: free up to 6 tokens, then -(L - 6) / 4 up to L = 10, and -1 beyond.
    lengths = [0, 5, 6, 7, 8, 9, 10, 11, 40]
    expected = [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
    close(grpo.overlong_penalty(jnp.array(lengths), 10, 4), expected)
    close(grpo.overlong_penalty(lengths, 10, 4, penalty_factor=0.5), np.multiply(expected, 0.5))
    # verl's and NeMo-RL's min(-(L - 6) / 4 * factor, 0) agrees wherever L <= max_len.
    verl = [min(-(n - 6) / 4 * 0.5, 0) for n in lengths[:7]]
    close(grpo.overlong_penalty(lengths[:7], 10, 4, penalty_factor=0.5), verl)
    # The whole budget as buffer: -L / 10 from the first token.
    close(grpo.overlong_penalty([0, 5, 10], 10, 10), [0.0, -0.5, -1.0])
    for cache_len in (0, 11):
        with pytest.raises(ValueError):
            grpo.overlong_penalty(jnp.array(lengths), 10, cache_len)


def test_informative_groups_hand_values():
    # Rows: mixed; all 1; all 0; 0.1 three times (max == min exactly, no std rounding noise);
    # a 1e-5 spread, informative at atol 0, not at atol 1e-3.
    rewards_PxG = jnp.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.1, 0.1, 0.1],
                             [0.5, 0.5, 0.50001]])
    assert np.asarray(grpo.informative_groups(rewards_PxG)).tolist() == [
        True, False, False, False, True]
    assert np.asarray(grpo.informative_groups(rewards_PxG, atol=1e-3)).tolist() == [
        True, False, False, False, False]
    # A group of one has zero advantage in r1jax: dropped (verl would keep it).
    assert not np.any(np.asarray(grpo.informative_groups(jnp.array([[1.0], [0.0]]))))
    with pytest.raises(ValueError):
        grpo.informative_groups(jnp.ones(4))


def test_fill_batch_accumulates_then_truncates_like_verl():
    # G = 2, target 3 prompts (6 rows). Round 1: groups a, b, c with b uninformative -> keep a, c
    # (4 rows), not full. Round 2: groups d, e, f with f uninformative -> keep d, e; the batch
    # takes a, c, d (first come first) and e is overflow, which verl and NeMo-RL discard.
    G = 2

    def round_rows(names, keep_P):
        rows = {"id": np.repeat(np.array(names), G), "reward": np.arange(len(names) * G) * 1.0,
                "adv": jnp.arange(len(names) * G, dtype=jnp.float32)}
        keep_B = jnp.repeat(jnp.asarray(keep_P), G)
        return jax.tree.map(lambda x: x[keep_B], rows)

    batch, overflow = grpo.fill_batch(None, round_rows(["a", "b", "c"], [True, False, True]), 3,
                                      group_size=G)
    assert batch["id"].tolist() == ["a", "a", "c", "c"]
    assert len(overflow["id"]) == 0
    batch, overflow = grpo.fill_batch(batch, round_rows(["d", "e", "f"], [True, True, False]), 3,
                                      group_size=G)
    assert batch["id"].tolist() == ["a", "a", "c", "c", "d", "d"]  # full: 3 * G rows
    assert batch["reward"].tolist() == [0.0, 1.0, 4.0, 5.0, 0.0, 1.0]
    close(batch["adv"], [0.0, 1.0, 4.0, 5.0, 0.0, 1.0])
    assert overflow["id"].tolist() == ["e", "e"]
    assert isinstance(batch["reward"], np.ndarray) and isinstance(batch["adv"], jax.Array)
    with pytest.raises(ValueError):  # a split group
        grpo.fill_batch(None, {"x": np.arange(3)}, 1, group_size=2)
    with pytest.raises(ValueError):  # leaves of different lengths
        grpo.fill_batch(None, {"x": np.arange(2), "y": np.arange(4)}, 1, group_size=2)
