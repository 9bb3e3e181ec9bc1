"""kernels/: the ragged decode-attention kernel (Pallas, interpret mode on CPU) equals its jnp reference, and
the reference equals the dense masked attention the lockstep sampler uses; the gated MLP's hand-written backward
equals autodiff's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import cached_attention
from kernels.decode_attention import block_for, ragged_decode_attention, ragged_decode_reference
from kernels.mlp import gated_mlp, gated_mlp_reference
from r1jax import sharding


def _inputs(B, N, K, S, H, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for shape in ((B, N, H), (B, K, H, S), (B, K, S, H)))
    return q, k, v  # the cache's layout: keys (B, K, H, S), values (B, K, S, H)


@pytest.mark.parametrize("N,K,S,dtype", [(6, 2, 48, jnp.float32), (14, 2, 40, jnp.float32),
                                         (8, 8, 256, jnp.float32), (4, 1, 64, jnp.bfloat16)])
def test_pallas_equals_reference(N, K, S, dtype):
    """GQA groups of 3, 7 (padded to the kernel's 16), 1 and 4 query heads; caches of one block, of blocks
    smaller than 128 (40 = 5 x 8) and of two 128 blocks; lengths empty, one slot, a block edge, full."""
    q, k, v = _inputs(6, N, K, S, 16, dtype)
    block = block_for(S)
    lengths = jnp.asarray([0, 1, block - 1, block, S - 1, S], jnp.int32)
    got = np.asarray(ragged_decode_attention(q, k, v, lengths, impl="pallas"))
    want = np.asarray(ragged_decode_reference(q, k, v, lengths))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    assert (got[0] == 0).all()  # an empty row


def test_reference_ignores_slots_past_each_length_and_equals_dense_masked_attention():
    q, k, v = _inputs(3, 4, 2, 32, 8, jnp.float32)
    lengths = jnp.asarray([5, 32, 17], jnp.int32)
    out = np.asarray(ragged_decode_reference(q, k, v, lengths))
    past = np.arange(32)[None, None, :] >= np.asarray(lengths)[:, None, None]  # B x 1 x S
    k_noise, v_noise = np.where(past[:, :, None, :], 1e3, 0.0), np.where(past[:, :, :, None], 1e3, 0.0)
    np.testing.assert_array_equal(np.asarray(ragged_decode_reference(q, k + k_noise, v - v_noise, lengths)), out)
    mask_Bx1xS = (jnp.arange(32)[None, :] < lengths[:, None])[:, None, :]
    dense = cached_attention(q[:, None], k, v, mask_Bx1xS)[:, 0]
    np.testing.assert_allclose(out, np.asarray(dense), rtol=1e-6, atol=1e-6)


def test_block_for_divides_the_cache():
    assert [block_for(s) for s in (256, 136, 40, 7)] == [128, 8, 8, 1]
    with pytest.raises(ValueError, match="choose xla or pallas"):
        ragged_decode_attention(*_inputs(1, 2, 1, 8, 4, jnp.float32), jnp.ones((1,), jnp.int32), impl="cuda")


def _mlp_inputs(B=4, T=6, D=16, F=40, seed=1):
    rng = np.random.default_rng(seed)
    shapes = ((B, T, D), (D, F), (D, F), (F, D), (B, T, D))
    x, w_gate, w_up, w_down, probe = (jnp.asarray(rng.normal(size=s) * (0.3 if i else 1.0), jnp.float32)
                                      for i, s in enumerate(shapes))
    return (x, w_gate, w_up, w_down), probe


def test_gated_mlp_equals_its_reference_in_value_and_gradient():
    """The hand-written backward gives autodiff's gradients of every input (a random linear probe of the output:
    a well-conditioned scalar), at fp32 rounding."""
    args, probe = _mlp_inputs()
    np.testing.assert_array_equal(np.asarray(gated_mlp(*args)), np.asarray(gated_mlp_reference(*args)))

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) * probe)

    got = jax.grad(loss(gated_mlp), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(loss(gated_mlp_reference), argnums=(0, 1, 2, 3))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6 * float(jnp.abs(w).max()))


def test_gated_mlp_sharded_gives_the_single_device_gradients():
    """Under the training rules on a 2x2x2 mesh (rows over data/fsdp, the hidden over tensor) the gradients are
    the unsharded ones."""
    args, probe = _mlp_inputs(B=8, F=48)
    mesh = sharding.MeshConfig(2, 2, 2).make()
    act = sharding.ActivationSharding(mesh, sharding.TRAIN_RULES)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(gated_mlp(*a, act.constrain) * probe), argnums=(0, 1, 2, 3)))
    want = jax.grad(lambda *a: jnp.sum(gated_mlp_reference(*a) * probe), argnums=(0, 1, 2, 3))(*args)
    for g, w in zip(grad(*args), want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6 * float(jnp.abs(w).max()))
