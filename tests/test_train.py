"""The GRPO update: inner epochs move the ratio off 1 and clip; accumulation is exact."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from r1jax import grpo, sharding, train
from r1jax.model import ModelConfig, create_model


def _setup(lr=3e-2, mesh_shape=(8, 1, 1), tx=None):
    cfg = ModelConfig.toy().replace(vocab_size=64, n_layers=2, d_model=64, d_ff=128, head_dim=16)
    mesh = sharding.MeshConfig(*mesh_shape).make()
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
    outs = []
    for shape in ((1, 1, 1), (2, 2, 2)):
        devices = jax.devices()[: int(np.prod(shape))]
        cfg = ModelConfig.toy().replace(vocab_size=64, n_layers=2, d_model=64, d_ff=128, head_dim=16)
        mesh = sharding.MeshConfig(*shape).make(devices)
        model = create_model(cfg, mesh=mesh, seed=1)
        state = train.create_train_state(model, train.make_optimizer(train.OptimConfig(lr=1e-3), 10))
        prompt, prompt_mask, completion, mask, adv = _batch(cfg)
        old = _old_logp(state, prompt, prompt_mask, completion, mask)
        batch = train.RLBatch(prompt, prompt_mask, completion, mask, old, old - 0.1, adv)
        state, _ = train.rl_update(state, batch, jax.random.key(0), train.RLHyper(kl_coef=0.1, minibatches=2))
        outs.append(state)
    specs = jax.tree.map(lambda x: x.sharding.spec, nnx.to_pure_dict(outs[1].params))
    assert specs["layers"]["w_gate"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    for x, y in zip(jax.tree.leaves(outs[0].params), jax.tree.leaves(outs[1].params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)
