"""The GRPO variants as options of the RL stages, on hand-made rollouts: DAPO dynamic sampling, overlong
reward shaping in tokens, the CISPO loss and truncated importance sampling reaching the update."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1jax import groups as groups_mod
from r1jax import grpo, rl, rollout, train
from r1jax.rewards import Reward, RewardSet
from test_faults import _tiny_state

G = 2


def _groups(tag: str, task_rewards_PxG) -> groups_mod.Groups:
    """Hand-made groups whose rows are recognisable: row r of group p holds the token 10 * p + r."""
    task_PxG = np.asarray(task_rewards_PxG, np.float32)
    P = len(task_PxG)
    rows = np.arange(P * G)
    tokens = np.repeat(10 * (rows // G) + rows % G, 3).reshape(P * G, 3).astype(np.int32)
    return groups_mod.Groups(
        records=[{"prompt": f"{tag}{p}"} for p in range(P)],
        prompt_tokens_BxTp=np.ones((P * G, 2), np.int32), prompt_mask_BxTp=np.ones((P * G, 2), bool),
        tokens_BxT=tokens, mask_BxT=np.ones((P * G, 3), bool), logp_BxT=np.zeros((P * G, 3), np.float32),
        truncated_B=np.zeros(P * G, bool), texts=[f"{tag}{r}" for r in rows], task_rewards_B=task_PxG.reshape(-1),
        rewards_B=task_PxG.reshape(-1), scores={"accuracy": task_PxG.reshape(-1)},
        routed={"accuracy": np.ones(P * G, bool)}, counts={"accuracy/errors": 1.0})


def _collect(monkeypatch, rounds: list[groups_mod.Groups], **cfg):
    calls, sampled = [2], []  # prompts drawn per round: the first round's two are drawn by the caller

    def fake_sample_groups(model, drawn, key, cfg_, scfg, tok, rewards, step, poll, on_sampled=None):
        sampled.append(on_sampled)
        return rounds[len(sampled) - 1]

    def draw(n):
        calls.append(n)
        return [], [], 1  # one prompt skipped as too long per draw

    monkeypatch.setattr(groups_mod, "sample_groups", fake_sample_groups)
    config = rl.RLConfig(prompts_per_step=2, group_size=G, dynamic_sampling=True, **cfg)
    hook = object()
    groups, stats = groups_mod.collect_step(None, ([], [], 1), draw, jax.random.key(0), config, None, None, None, 0,
                                            None, hook)
    assert sampled == [hook] * len(sampled)  # every round reports its tokens
    return groups, stats, calls


def test_dynamic_sampling_drops_equal_groups_and_samples_more_until_full(monkeypatch):
    # Round 1: group a0 is all-equal (dropped), a1 differs (kept). Round 2: b0 differs (kept, batch full), b1 too
    # but it is past the target and discarded (verl and NeMo-RL discard the overflow too).
    groups, stats, calls = _collect(monkeypatch, [_groups("a", [[1, 1], [0, 1]]), _groups("b", [[1, 0], [0, 1]])])
    assert calls == [2, 2]
    assert [r["prompt"] for r in groups.records] == ["a1", "b0"]
    assert groups.texts == ["a2", "a3", "b0", "b1"]
    np.testing.assert_array_equal(groups.task_rewards_B, [0, 1, 1, 0])
    np.testing.assert_array_equal(groups.tokens_BxT[:, 0], [10, 11, 0, 1])
    assert stats == {"prompts_too_long": 2, "dynamic_sampling_rounds": 2, "dynamic_sampling_dropped_groups": 1,
                     "dynamic_sampling_short_groups": 0, "time_sample_s": 0.0, "time_reward_s": 0.0}
    assert groups.counts == {"accuracy/errors": 2.0}  # the rewards' counts add over every round sampled


def test_dynamic_sampling_tops_up_with_dropped_groups_after_the_last_round(monkeypatch):
    # Three rounds allowed; only c1 is informative: the batch keeps its shape with the first dropped group
    # (zero advantage), and the shortfall is counted.
    rounds = [_groups("a", [[1, 1], [0, 0]]), _groups("b", [[0, 0], [1, 1]]), _groups("c", [[1, 1], [1, 0]])]
    groups, stats, calls = _collect(monkeypatch, rounds, max_sampling_rounds=3)
    assert len(calls) == 3
    assert [r["prompt"] for r in groups.records] == ["c1", "a0"]
    assert stats["dynamic_sampling_short_groups"] == 1 and stats["dynamic_sampling_dropped_groups"] == 5
    adv = np.asarray(rl.grpo.group_advantages(groups.rewards_B, G))
    assert adv[2:].tolist() == [0.0, 0.0] and adv[0] > 0 > adv[1]


def test_without_dynamic_sampling_one_round_is_the_batch(monkeypatch):
    calls = []
    monkeypatch.setattr(groups_mod, "sample_groups", lambda *a: (calls.append(1), _groups("a", [[1, 1], [0, 1]]))[1])
    config = rl.RLConfig(prompts_per_step=2, group_size=G)
    groups, stats = groups_mod.collect_step(None, ([], [], 0), None, jax.random.key(0), config, None, None, None, 0,
                                            None)
    assert calls == [1] and [r["prompt"] for r in groups.records] == ["a0", "a1"]
    assert stats == {"prompts_too_long": 0, "time_sample_s": 0.0, "time_reward_s": 0.0}


class _Tok:
    stop_ids = (2,)
    pad_id = 0

    def encode_batch(self, texts, add_bos=False):
        return [[1, 5, 6] for _ in texts]

    def decode_batch(self, rows):
        return [" ".join(map(str, r)) for r in rows]


def test_overlong_shaping_penalises_the_last_tokens_before_the_limit(monkeypatch):
    # max_new_tokens 8, buffer 4: no penalty up to 4 tokens, then linear to -1 at 8 (DAPO, in tokens).
    lengths = np.array([2, 4, 5, 7, 8, 8])
    T = 8
    mask = np.arange(T)[None, :] < lengths[:, None]
    out = types.SimpleNamespace(prompt_tokens_BxT=np.ones((6, 3), np.int32), prompt_mask_BxT=np.ones((6, 3), bool),
                                tokens_BxT=np.where(mask, 7, 0).astype(np.int32), mask_BxT=mask,
                                logp_BxT=np.zeros((6, T), np.float32), truncated_B=lengths == T)
    monkeypatch.setattr(rl.sampler, "generate", lambda *a, **k: out)
    records = [{"prompt": f"q{i}", "answer": "1"} for i in range(3)]
    stream = iter(records)
    cfg = rl.RLConfig(prompts_per_step=3, group_size=2, max_new_tokens=T, overlong_buffer=4, overlong_penalty=0.5)
    rewards = RewardSet([Reward("one", lambda c, e: np.ones(len(c)))])
    drawn = rollout.take_prompts(lambda k: [next(stream) for _ in range(k)], 3, str, _Tok(), cfg.max_prompt_len)
    groups = groups_mod.sample_groups(None, drawn, jax.random.key(0), cfg, rl.sampler.SamplerConfig(), _Tok(),
                                      rewards, 0, None)
    assert drawn[2] == 0 and [r["prompt"] for r in groups.records] == ["q0", "q1", "q2"]
    np.testing.assert_array_equal(groups.task_rewards_B, np.ones(6))
    np.testing.assert_allclose(groups.rewards_B, 1 - 0.5 * np.array([0, 0, 0.25, 0.75, 1, 1]), atol=1e-7)
    assert groups.texts[0] == "7 7"


def test_overlong_settings_are_checked():
    with pytest.raises(ValueError, match="overlong_buffer"):
        rl.RLConfig(max_new_tokens=8, overlong_buffer=9)
    with pytest.raises(ValueError, match="max_sampling_rounds"):
        rl.RLConfig(max_sampling_rounds=0)


def test_cispo_reaches_the_update():
    assert rl.RLConfig(loss_type="cispo").hyper().loss_type == "cispo"
    _, state = _tiny_state(optax.sgd(0.0))
    B, Tp, T = 8, 4, 3
    prompt, completion = jnp.ones((B, Tp), jnp.int32), jnp.full((B, T), 5, jnp.int32)
    mask_p, mask = jnp.ones((B, Tp), bool), jnp.ones((B, T), bool)
    logp = train.rollout_logprobs(state.graphdef, state.params, prompt, mask_p, completion, mask, temperature=1.0)
    # Every ratio is e^2 and every advantage -1: CISPO's token term is -sg(clip(e^2, 0.8, 1.2)) * A * logp =
    # 1.2 * logp (PPO's would be e^2), so the loss is 1.2 times the mean log-prob.
    batch = train.RLBatch(prompt, mask_p, completion, mask, logp - 2.0, None, -jnp.ones(B))
    _, metrics = train.rl_update(jax.tree.map(jnp.copy, state), batch, jax.random.key(0),
                                 train.RLHyper(loss_type="cispo"))
    np.testing.assert_allclose(float(metrics["loss"]), 1.2 * float(jnp.mean(logp)), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), np.exp(2), rtol=1e-5)


def test_tis_weights_reach_the_update_and_top_p_needs_them():
    _, state = _tiny_state(optax.sgd(0.0))
    B, Tp, T = 8, 4, 3
    prompt, completion = jnp.ones((B, Tp), jnp.int32), jnp.full((B, T), 5, jnp.int32)
    mask_p, mask = jnp.ones((B, Tp), bool), jnp.ones((B, T), bool)
    logp = train.rollout_logprobs(state.graphdef, state.params, prompt, mask_p, completion, mask, temperature=1.0)
    # Ratio 1, advantage -1: each token's PPO term is 1; a weight of 0.25 makes the loss 0.25.
    weights = jnp.full((B, T), 0.25)
    batch = train.RLBatch(prompt, mask_p, completion, mask, logp, None, -jnp.ones(B), weights)
    _, metrics = train.rl_update(jax.tree.map(jnp.copy, state), batch, jax.random.key(0), train.RLHyper())
    np.testing.assert_allclose(float(metrics["loss"]), 0.25, rtol=1e-6)
    # Sampling RL rollouts with top_p/top_k without the correction is refused; the correction needs the
    # trainer's recomputed old log-probs.
    with pytest.raises(ValueError, match="biases the ratio"):
        rl.RLConfig(top_p=0.9)
    with pytest.raises(ValueError, match="recompute_old_logp"):
        rl.RLConfig(top_k=20, tis_cap=2.0)
    rl.RLConfig(top_p=0.9, recompute_old_logp=True, tis_cap=2.0)


def test_logp_gap_and_tis_metrics():
    old = np.log(np.array([[0.5, 0.2, 0.1], [0.4, 0.3, 0.9]]))
    sampler_logp = np.log(np.array([[0.5, 0.4, 0.01], [0.8, 0.3, 0.9]]))
    mask = np.array([[True, True, True], [True, True, False]])
    w = grpo.tis_weights(jnp.asarray(old), jnp.asarray(sampler_logp), 2.0, mask_BxT=jnp.asarray(mask))
    got = rl._logp_gap(jnp.asarray(old), jnp.asarray(sampler_logp), jnp.asarray(mask), w, 2.0)
    gaps = np.abs(old - sampler_logp)[mask]
    np.testing.assert_allclose(got["sampler_logp_gap_mean"], gaps.mean(), rtol=1e-6)
    np.testing.assert_allclose(got["sampler_logp_gap_max"], np.log(10), rtol=1e-6)
    # weights: 1, 0.5, min(10, 2) = 2, 0.5, 1 over the five valid tokens
    np.testing.assert_allclose(got["tis_weight_mean"], 5.0 / 5, rtol=1e-6)
    np.testing.assert_allclose(got["tis_capped_frac"], 1 / 5, rtol=1e-6)
