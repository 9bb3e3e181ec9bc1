"""The GRPO update: inner epochs move the ratio off 1 and clip; accumulation is exact; it equals a
plain loop over shuffled minibatches, on one device or a mesh; it moves log-probs with the advantage."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from r1jax import grpo, sharding, train
from r1jax.model import ModelConfig, create_model


def _setup(lr=3e-2, mesh_shape=(8, 1, 1), tx=None):
    cfg = ModelConfig.toy().replace(vocab_size=64, n_layers=2, d_model=64, d_ff=128, head_dim=16)
    mesh = sharding.MeshConfig(*mesh_shape).make(jax.devices()[: int(np.prod(mesh_shape))])
    model = create_model(cfg, mesh=mesh, seed=1)
    tx = tx or train.make_optimizer(train.OptimConfig(lr=lr, grad_clip=1e9), 100)
    return cfg, train.create_train_state(model, tx)


def _batch(cfg, B=8, Tp=6, T=5, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    prompt = jax.random.randint(k[0], (B, Tp), 0, cfg.vocab_size)
    prompt_mask = jnp.arange(Tp)[None] >= jnp.array([0, 2, 0, 1, 3, 0, 0, 2])[:, None]
    completion = jax.random.randint(k[1], (B, T), 0, cfg.vocab_size)
    mask = jnp.arange(T)[None] < jnp.array([5, 3, 5, 1, 4, 5, 2, 5])[:, None]
    rewards = jax.random.bernoulli(k[2], 0.5, (B,)).astype(jnp.float32)
    adv = grpo.group_advantages(rewards, 4)
    return prompt, prompt_mask, completion, mask, adv


def _old_logp(state, prompt, prompt_mask, completion, mask):
    return train.rollout_logprobs(state.graphdef, state.params, prompt, prompt_mask, completion, mask,
                                  temperature=1.0)


def test_mu_above_one_moves_ratio_and_clips():
    cfg, state = _setup()
    prompt, prompt_mask, completion, mask, adv = _batch(cfg)
    old = _old_logp(state, prompt, prompt_mask, completion, mask)
    batch = train.RLBatch(prompt, prompt_mask, completion, mask, old, None, adv)
    hp = train.RLHyper(mu=3, minibatches=2, clip_low=0.05, clip_high=0.05)
    state, metrics = train.rl_update(state, batch, jax.random.key(0), hp)
    # The first minibatch sees the sampling policy exactly: ratio 1, zero gap.
    assert float(metrics["logp_gap_max"]) <= 1e-5
    # Later epochs see a moved policy: ratios leave 1 and the clip binds somewhere.
    assert abs(float(metrics["ratio_mean_last"]) - 1.0) > 1e-4
    assert float(metrics["clip_frac_last"]) > 0.0
    assert int(state.step) == 6


def test_microbatch_accumulation_equals_full_minibatch():
    results = []
    for micro in (1, 4):
        # Plain SGD with lr 1: the parameter change is the gradient itself (Adam would
        # amplify rounding noise in near-zero gradients to a full lr-sized step).
        cfg, state = _setup(tx=optax.sgd(1.0))
        prompt, prompt_mask, completion, mask, adv = _batch(cfg)
        old = _old_logp(state, prompt, prompt_mask, completion, mask) + 0.01  # ratio != 1
        batch = train.RLBatch(prompt, prompt_mask, completion, mask, old, None, adv)
        hp = train.RLHyper(mu=1, minibatches=1, microbatches=micro)
        new_state, metrics = train.rl_update(state, batch, jax.random.key(0), hp)
        results.append((new_state, metrics))
    (a, ma), (b, mb) = results
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(float(ma["grad_norm"]), float(mb["grad_norm"]), rtol=1e-5, atol=0)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)


def test_update_is_sharded_and_matches_single_device():
    # Plain SGD (with momentum, so the optimizer holds a parameter-shaped state to shard): the
    # update is linear in the gradients, so it carries their fp32 rounding only. Adam divides by
    # sqrt(v): a near-zero gradient's reduction-order noise becomes a full lr-sized step there.
    outs = []
    for shape in ((1, 1, 1), (2, 2, 2)):
        devices = jax.devices()[: int(np.prod(shape))]
        cfg = ModelConfig.toy().replace(vocab_size=64, n_layers=2, d_model=64, d_ff=128, head_dim=16)
        mesh = sharding.MeshConfig(*shape).make(devices)
        model = create_model(cfg, mesh=mesh, seed=1)
        state = train.create_train_state(model, optax.sgd(1.0, momentum=0.9))
        prompt, prompt_mask, completion, mask, adv = _batch(cfg)
        old = _old_logp(state, prompt, prompt_mask, completion, mask) + 0.05  # ratio != 1
        batch = train.RLBatch(prompt, prompt_mask, completion, mask, old, old - 0.1, adv)
        # Clip at R1's 10 so it never binds: a clipped token's gradient jumps to 0, and a ratio
        # within rounding of the boundary would make the comparison ill-conditioned.
        hp = train.RLHyper(kl_coef=0.1, minibatches=2, clip_low=10.0, clip_high=10.0)
        state, metrics = train.rl_update(state, batch, jax.random.key(0), hp)
        outs.append((state, metrics))
    (single, m1), (sharded, m8) = outs
    specs = jax.tree.map(lambda x: x.sharding.spec, nnx.to_pure_dict(sharded.params))
    assert specs["layers"]["w_gate"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    trace = nnx.to_pure_dict(sharded.opt_state[0].trace)  # momentum mirrors the parameters' shardings
    assert trace["layers"]["w_gate"].sharding.spec == specs["layers"]["w_gate"]
    assert float(m1["clip_frac_last"]) == float(m8["clip_frac_last"]) == 0.0
    # The first minibatch's ratios are exactly e^-0.05; the second saw the moved policy.
    assert abs(float(m1["ratio_mean"]) - np.exp(-0.05)) > 1e-3
    for key in ("loss", "kl", "entropy", "ratio_mean", "ratio_mean_last", "logp_gap_mean"):
        np.testing.assert_allclose(float(m8[key]), float(m1[key]), atol=1e-6, rtol=0, err_msg=key)
    np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5, atol=0)
    # lr 1: the parameters moved by 1.9 g1 + g2 (gradients up to ~1), 1000x the old Adam test's step.
    for x, y in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)


def _reference_rl_update(state, batch, key, hp, tx):
    """rl_update written out as a plain loop: per epoch a fresh permutation, contiguous
    minibatches of it, each one loss gradient over the whole minibatch, one optimizer step.
    Returns the parameters, each minibatch's loss, and its importance ratios on real tokens."""
    B = batch.adv_B.shape[0]
    size = B // hp.minibatches

    @jax.jit
    def loss_and_grad(params, mb):
        def loss_fn(params):
            logp_BxT, _ = train.completion_logprobs(
                nnx.merge(state.graphdef, params), mb.prompt_BxTp, mb.prompt_mask_BxTp, mb.completion_BxT,
                mb.completion_mask_BxT, temperature=hp.temperature)
            loss, _ = grpo.grpo_loss(
                logp_BxT, mb.old_logp_BxT, mb.ref_logp_BxT, mb.adv_B, mb.completion_mask_BxT,
                clip_low=hp.clip_low, clip_high=hp.clip_high, kl_coef=hp.kl_coef, kl_kind=hp.kl_kind,
                aggregation=hp.aggregation, max_len=hp.max_len, importance=hp.importance,
                normalizer=grpo.loss_denominator(mb.completion_mask_BxT, hp.aggregation))
            return loss, jnp.exp(logp_BxT - mb.old_logp_BxT)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    params, opt_state, losses, ratios = state.params, tx.init(state.params), [], []
    for epoch_key in jax.random.split(key, hp.mu):
        perm = jax.random.permutation(epoch_key, B)
        for m in range(hp.minibatches):
            mb = jax.tree.map(lambda x: x[perm[m * size:(m + 1) * size]], batch)
            (loss, ratio_BxT), grads = loss_and_grad(params, mb)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            losses.append(float(loss))
            ratios.append(np.asarray(ratio_BxT)[np.asarray(mb.completion_mask_BxT)])
    return params, losses, ratios


def test_rl_update_equals_reference_loop():
    tx = optax.sgd(0.2)  # linear in the gradients: the comparison carries fp32 rounding only
    cfg, state = _setup(tx=tx)
    prompt, prompt_mask, completion, mask, adv = _batch(cfg)
    old = _old_logp(state, prompt, prompt_mask, completion, mask) + 0.03
    batch = train.RLBatch(prompt, prompt_mask, completion, mask, old, old - 0.2, adv)
    hp = train.RLHyper(mu=2, minibatches=2, microbatches=2, clip_low=0.1, clip_high=0.1, kl_coef=0.1)
    key = jax.random.key(3)
    ref_params, ref_losses, ratios = _reference_rl_update(state, batch, key, hp, tx)
    # The epochs' shuffles differ, so a wrong permutation or split could not pass.
    perms = [np.asarray(jax.random.permutation(k, 8)) for k in jax.random.split(key, hp.mu)]
    assert not np.array_equal(np.sort(perms[0][:4]), np.sort(perms[1][:4]))
    # The clip binds on some tokens, and no ratio sits within 1e-4 of a clip boundary: a clipped
    # token's gradient is 0, so one within rounding of it would make the comparison ill-conditioned.
    ratios = np.concatenate(ratios)
    assert ((ratios < 0.9) | (ratios > 1.1)).any()
    assert np.abs(ratios[:, None] - np.array([0.9, 1.1])).min() > 1e-4

    state, metrics = train.rl_update(state, batch, key, hp)
    assert int(state.step) == 4
    # rl_update reports the minibatches' mean loss.
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(ref_losses), atol=1e-6, rtol=0)
    for x, y in zip(jax.tree.leaves(ref_params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5, rtol=0)


def test_update_raises_positive_and_lowers_negative_advantage_completions():
    cfg, state = _setup(lr=1e-2)  # Adam, as trained
    prompt, prompt_mask, completion, mask, _ = _batch(cfg)
    adv = grpo.group_advantages(jnp.array([1.0, 0, 0, 1, 0, 1, 0, 0]), 4)
    old = _old_logp(state, prompt, prompt_mask, completion, mask)
    batch = train.RLBatch(prompt, prompt_mask, completion, mask, old, None, adv)
    state, _ = train.rl_update(state, batch, jax.random.key(0), train.RLHyper())  # one optimizer step
    new = _old_logp(state, prompt, prompt_mask, completion, mask)
    # Each completion's mean token log-prob: up where A > 0, down where A < 0, by a clear margin
    # (here each moves by 0.3 or more).
    delta = np.asarray(jnp.sum(jnp.where(mask, new - old, 0.0), axis=1) / jnp.sum(mask, axis=1))
    adv = np.asarray(adv)
    assert (adv != 0).all()
    assert (delta[adv > 0] > 0.1).all() and (delta[adv < 0] < -0.1).all(), (adv, delta)


def _grouped_batch(cfg, P=4, G=4, Tp=7, T=5, seed=3):
    """P prompts (left-padded, lengths 7, 4, 2, 6) each repeated for its G rows, prompt-major; completions of
    several lengths (one empty)."""
    rng = np.random.default_rng(seed)
    prompt_P = rng.integers(0, cfg.vocab_size, (P, Tp))
    prompt_mask_P = np.arange(Tp)[None] >= (Tp - np.array([7, 4, 2, 6]))[:, None]
    prompt, prompt_mask = (jnp.asarray(np.repeat(x, G, axis=0)) for x in (prompt_P, prompt_mask_P))
    completion = jnp.asarray(rng.integers(0, cfg.vocab_size, (P * G, T)))
    mask = jnp.asarray(np.arange(T)[None] < rng.integers(0, T + 1, P * G)[:, None])
    return prompt, prompt_mask, completion, mask


def test_shared_prompt_forward_equals_the_full_rows():
    """Every prompt run once for its block of rows gives the log-probs and gradients of running it with each row,
    on one device and on a mesh whose devices each hold two rows (share 2 there, 4 on one device)."""
    for shape, shares in (((1, 1, 1), (2, 4)), ((4, 2, 1), (2,))):
        cfg, state = _setup(mesh_shape=shape)
        prompt, prompt_mask, completion, mask = _grouped_batch(cfg)

        def run(share):
            def f(params):
                logp, entropy = train.completion_logprobs(nnx.merge(state.graphdef, params), prompt, prompt_mask,
                                                          completion, mask, share=share)
                return jnp.sum(jnp.where(mask, logp * jnp.arange(1, 6), 0.0)), (logp, entropy)
            return jax.jit(jax.value_and_grad(f, has_aux=True))(state.params)

        (ref_loss, (ref_logp, ref_ent)), ref_grad = run(1)
        for share in shares:
            (loss, (logp, ent)), grad = run(share)
            m = np.asarray(mask)
            np.testing.assert_allclose(np.asarray(logp)[m], np.asarray(ref_logp)[m], atol=2e-5, rtol=0)
            np.testing.assert_allclose(np.asarray(ent)[m], np.asarray(ref_ent)[m], atol=2e-5, rtol=0)
            np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, atol=0)
            for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=0)


def test_shared_prompt_update_equals_the_unshared_one():
    """rl_update with prompt_share 4 (whole groups) takes the step of the unshared update: same loss, KL and
    gradient norm, and the reference log-probs agree."""
    outs = []
    for share in (1, 4):
        cfg, state = _setup(tx=optax.sgd(1.0))
        prompt, prompt_mask, completion, mask = _grouped_batch(cfg)
        adv = grpo.group_advantages(jnp.arange(16, dtype=jnp.float32) % 3, 4)
        old = train.rollout_logprobs(state.graphdef, state.params, prompt, prompt_mask, completion, mask,
                                     temperature=1.0, share=share)
        batch = train.RLBatch(prompt, prompt_mask, completion, mask, old + 0.02, old - 0.1, adv)
        hp = train.RLHyper(kl_coef=0.1, clip_low=10.0, clip_high=10.0, prompt_share=share)
        outs.append((old, train.rl_update(state, batch, jax.random.key(0), hp)[1]))
    (old1, m1), (old4, m4) = outs
    np.testing.assert_allclose(np.asarray(old4)[np.asarray(mask)], np.asarray(old1)[np.asarray(mask)], atol=2e-5)
    for key in ("loss", "kl", "entropy", "ratio_mean"):
        np.testing.assert_allclose(float(m4[key]), float(m1[key]), atol=2e-6, rtol=0, err_msg=key)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5, atol=0)


def test_prompt_share_never_straddles_a_group_or_a_device():
    assert train.prompt_share(8, 64) == 8  # whole groups on each device
    assert train.prompt_share(8, 2) == 2  # two rows per device: blocks of two
    assert train.prompt_share(16, 24) == 8
    assert train.prompt_share(5, 4) == 1
