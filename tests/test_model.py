"""Model invariants: presets, causality, padding, remat, KV cache, lean log-probs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels.attention import attention
from r1jax import model as model_lib
from r1jax.model import PRESETS, KVCache, ModelConfig, Transformer, positions_from_mask

# Published sizes (parameter counts from the model cards / safetensors totals).
KNOWN_PARAMS = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,
    "qwen3-8b": 8_190_735_360,
    "llama3.2-1b": 1_235_814_400,
    "llama3.1-8b": 8_030_261_248,
    "deepseek-r1-distill-qwen-1.5b": 1_777_088_000,
    "smollm2-135m": 134_515_008,
}


def _count(module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module)))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_abstractly(name):
    cfg = ModelConfig.preset(name)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    assert _count(abstract) == cfg.num_params
    if name in KNOWN_PARAMS:
        assert cfg.num_params == KNOWN_PARAMS[name]


def test_unknown_preset_and_bad_config_are_rejected():
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("gpt-5")
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig.toy().replace(n_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        ModelConfig.toy().replace(remat="sometimes")


def _cfg(**changes):
    # qkv bias and qk norm on, so every optional branch runs.
    return ModelConfig.toy().replace(vocab_size=67, qkv_bias=True, qk_norm=True, **changes)


def _model(cfg, seed=0):
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    # Perturb norm scales and biases away from their 1/0 init so they matter.
    state = nnx.state(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, tokens, pos, mask, cache):
    return nnx.merge(graphdef, state)(tokens, pos, mask, cache)


def _forward(model, tokens, pos, mask=None, cache=None):
    """The model's forward, jitted: the 2-core CI machine cannot afford eager mode."""
    graphdef, state = nnx.split(model)
    return _jit_forward(graphdef, state, tokens, pos, mask, cache)


def _tokens(B=3, T=11, V=67, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, V)


def test_dtype_auto_is_fp32_on_cpu():
    assert ModelConfig.toy().compute_dtype == jnp.float32
    assert ModelConfig.toy().replace(dtype="bfloat16").compute_dtype == jnp.bfloat16


def test_causality():
    model = _model(_cfg())
    tokens = _tokens()
    pos = positions_from_mask(jnp.ones_like(tokens, bool))
    logits, _ = _forward(model, tokens, pos)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 67)
    logits2, _ = _forward(model, changed, pos)
    np.testing.assert_array_equal(np.asarray(logits[:, :7]), np.asarray(logits2[:, :7]))
    assert np.abs(np.asarray(logits[:, 7:] - logits2[:, 7:])).max() > 1e-3


def test_left_padding_matches_unpadded_rows():
    model = _model(_cfg())
    tokens = _tokens(B=3, T=10)
    lengths = np.array([10, 6, 1])
    mask = jnp.asarray(np.arange(10)[None] >= (10 - lengths)[:, None])
    logits, _ = _forward(model, tokens, positions_from_mask(mask), mask)
    assert not np.isnan(np.asarray(logits)).any()
    for row, n in enumerate(lengths):
        alone = tokens[row:row + 1, 10 - n:]
        ref, _ = _forward(model, alone, jnp.arange(n)[None])
        np.testing.assert_allclose(np.asarray(logits[row, 10 - n:]), np.asarray(ref[0]), atol=1e-5, rtol=0)


def test_positions_default_to_real_tokens_before_each_token():
    """`model(tokens)` means positions 0..T-1, as transformers' `model(input_ids)`; with a mask
    (and a cache) they count the real tokens before each one, as positions_from_mask does."""
    cfg = _cfg()
    model = _model(cfg)
    graphdef, state = nnx.split(model)
    tokens = _tokens(B=2, T=9)
    plain = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, tokens)
    explicit, _ = _forward(model, tokens, jnp.broadcast_to(jnp.arange(9), (2, 9)))
    np.testing.assert_allclose(np.asarray(plain), np.asarray(explicit), atol=1e-6, rtol=0)

    mask = jnp.asarray(np.arange(9)[None] >= np.array([[0], [3]]))  # row 1 left-padded
    pos = positions_from_mask(mask)
    explicit, _ = _forward(model, tokens, pos, mask)
    implicit, _ = _forward(model, tokens, None, mask)
    keep = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(implicit)[keep], np.asarray(explicit)[keep], atol=1e-6, rtol=0)
    # Prefill then one-token decode steps, positions left out: the cache's mask supplies them.
    logits, cache = _forward(model, tokens[:, :6], None, mask[:, :6], KVCache.init(cfg, batch=2, length=12))
    steps = [logits]
    for t in range(6, 9):
        step_logits, cache = _forward(model, tokens[:, t:t + 1], None, mask[:, t:t + 1], cache)
        steps.append(step_logits)
    cached = np.asarray(jnp.concatenate(steps, axis=1))
    np.testing.assert_allclose(cached[keep], np.asarray(explicit)[keep], atol=1e-5, rtol=0)


def _loss(model, tokens):
    pos = positions_from_mask(jnp.ones_like(tokens, bool))
    logits, _ = _forward(model, tokens, pos)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_equals_no_remat(policy):
    tokens = _tokens()
    plain, remat = _model(_cfg()), _model(_cfg(remat=policy))
    graphdef_p, state_p = nnx.split(plain)
    graphdef_r, state_r = nnx.split(remat)
    loss_p, grad_p = jax.jit(jax.value_and_grad(lambda s: _loss(nnx.merge(graphdef_p, s), tokens)))(state_p)
    loss_r, grad_r = jax.jit(jax.value_and_grad(lambda s: _loss(nnx.merge(graphdef_r, s), tokens)))(state_r)
    np.testing.assert_allclose(float(loss_p), float(loss_r), atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(grad_p), jax.tree.leaves(grad_r)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_unrolled_layers_equal_the_scan():
    tokens = _tokens()
    graphdef_s, state = nnx.split(_model(_cfg()))
    graphdef_u, _ = nnx.split(_model(_cfg(scan_layers=False)))
    loss_s, grad_s = jax.jit(jax.value_and_grad(lambda s: _loss(nnx.merge(graphdef_s, s), tokens)))(state)
    loss_u, grad_u = jax.jit(jax.value_and_grad(lambda s: _loss(nnx.merge(graphdef_u, s), tokens)))(state)
    np.testing.assert_allclose(float(loss_u), float(loss_s), atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(grad_s), jax.tree.leaves(grad_u)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature,chunk", [(1.0, 4), (0.7, 3), (1.3, 64)])
def test_lean_logprobs_equal_full_log_softmax(temperature, chunk, monkeypatch):
    model = _model(_cfg())
    tokens = _tokens(T=11)
    mask = jnp.ones_like(tokens, bool)
    pos = positions_from_mask(mask)
    targets = jnp.roll(tokens, -1, axis=1)

    graphdef, state = nnx.split(model)

    def full(state):
        logits, _ = nnx.merge(graphdef, state)(tokens, pos, mask)
        logp = jax.nn.log_softmax(logits / temperature)
        return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0], logp

    def lean(state):
        return nnx.merge(graphdef, state).token_logprobs(
            tokens, pos, mask, targets, temperature=temperature, chunk=chunk)

    ref, logp_full = jax.jit(full)(state)
    got, entropy = jax.jit(lean)(state)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)
    ref_entropy = -jnp.sum(jnp.exp(logp_full) * logp_full, axis=-1)
    np.testing.assert_allclose(np.asarray(entropy), np.asarray(ref_entropy), atol=1e-5, rtol=0)
    if chunk != 3:  # the gradient once, with a chunk that does not divide the length and a temperature
        return
    # Gradients agree too (the chunked head is rematerialised, not approximated); a
    # whole-model gradient is a block, so the fp32 block tolerance (1e-4) applies.
    g_ref = jax.jit(jax.grad(lambda s: full(s)[0].sum()))(state)
    g_got = jax.jit(jax.grad(lambda s: lean(s)[0].sum()))(state)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_got)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=0)
    # Each chunk's logits recomputed in the backward pass (large vocabularies) give the same gradient.
    monkeypatch.setattr(model_lib, "HEAD_REMAT_BYTES", 0)
    g_remat = jax.jit(jax.grad(lambda s: lean(s)[0].sum()))(state)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_kv_cache_prefill_then_decode_equals_full_forward():
    cfg = _cfg()
    model = _model(cfg)
    tokens = _tokens(B=2, T=9)
    mask = jnp.asarray(np.arange(9)[None] >= np.array([[0], [3]]))  # row 1 left-padded
    pos = positions_from_mask(mask)
    full, _ = _forward(model, tokens, pos, mask)
    cache = KVCache.init(cfg, batch=2, length=12)
    logits, cache = _forward(model, tokens[:, :6], pos[:, :6], mask[:, :6], cache)
    steps = [logits]
    for t in range(6, 9):
        step_logits, cache = _forward(model, tokens[:, t:t + 1], pos[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(step_logits)
    cached = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(np.asarray(cached)[np.asarray(mask)], np.asarray(full)[np.asarray(mask)],
                               atol=1e-5, rtol=0)
    assert int(cache.index) == 9
    assert KVCache.bytes_per_row(cfg, 12) == cache.nbytes // 2  # K and V of 2 rows


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_attention_impls_agree_and_fully_masked_rows_are_finite(impl):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 5, 4, 8))
    k = jax.random.normal(keys[1], (2, 7, 2, 8))
    v = jax.random.normal(keys[2], (2, 7, 2, 8))
    mask = jax.random.bernoulli(jax.random.key(3), 0.6, (2, 5, 7)).at[1, 0].set(False)
    out = attention(q, k, v, mask, impl=impl)
    assert np.isfinite(np.asarray(out)).all()
    # Reference by hand: repeat kv heads, masked softmax.
    k_rep, v_rep = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k_rep) / jnp.sqrt(8.0)
    scores = jnp.where(mask[:, None], scores, -1e30)
    ref = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, -1), v_rep)
    keep = np.asarray(mask.any(-1))
    np.testing.assert_allclose(np.asarray(out)[keep], np.asarray(ref)[keep], atol=1e-5, rtol=0)
