"""Sharded forward equals single-device forward; parameters sit where the rules say."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from r1jax import sharding
from r1jax.model import ModelConfig, create_model, positions_from_mask

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]


def _cfg():
    # Sizes chosen so every sharded dim divides 8: nothing silently falls back.
    return ModelConfig.toy().replace(vocab_size=128, n_heads=8, n_kv_heads=8, head_dim=16,
                                     d_ff=256, qkv_bias=True, qk_norm=True)


def _batch():
    tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, 128)
    lengths = jnp.array([16, 9, 16, 4, 12, 16, 1, 7])
    mask = jnp.arange(16)[None] >= (16 - lengths)[:, None]
    return tokens, mask


def _logits(model, tokens, mask):
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, positions_from_mask(m), m)[0])
    return fwd(state, tokens, mask)


@pytest.fixture(scope="module")
def single_logits():
    mesh = sharding.MeshConfig().make(jax.devices()[:1])
    model = create_model(_cfg(), mesh=mesh, seed=3)
    return np.asarray(_logits(model, *_batch()))


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("rules", ["train", "sample"])
def test_sharded_forward_equals_single_device(shape, rules, single_logits):
    table = sharding.TRAIN_RULES if rules == "train" else sharding.SAMPLE_RULES
    mesh = sharding.MeshConfig(*shape).make()
    model = create_model(_cfg(), mesh=mesh, rules=table, seed=3)
    tokens, mask = _batch()
    in_sharding = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
    tokens, mask = jax.device_put(tokens, in_sharding), jax.device_put(mask, in_sharding)
    logits = _logits(model, tokens, mask)
    assert len(logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(logits)[np.asarray(mask)], single_logits[np.asarray(mask)],
                               atol=1e-5, rtol=0)


EXPECTED_TRAIN = {
    "embed": P("tensor", "fsdp"),
    "final_norm": P(None),
    "attn_norm": P(None, None),
    "mlp_norm": P(None, None),
    "wq": P(None, "fsdp", "tensor", None),
    "wk": P(None, "fsdp", "tensor", None),
    "wv": P(None, "fsdp", "tensor", None),
    "wo": P(None, "tensor", None, "fsdp"),
    "bq": P(None, "tensor", None),
    "bk": P(None, "tensor", None),
    "bv": P(None, "tensor", None),
    "q_norm": P(None, None),
    "k_norm": P(None, None),
    "w_gate": P(None, "fsdp", "tensor"),
    "w_up": P(None, "fsdp", "tensor"),
    "w_down": P(None, "tensor", "fsdp"),
}


def _flat_specs(model):
    specs = sharding.spec_tree(model)
    flat = {k: v for k, v in specs.items() if k != "layers"}
    flat.update(specs["layers"])
    return flat


def test_train_rules_shard_parameters_as_written():
    mesh = sharding.MeshConfig(2, 2, 2).make()
    model = create_model(_cfg(), mesh=mesh)
    assert _flat_specs(model) == EXPECTED_TRAIN


def test_sample_rules_replicate_over_fsdp():
    mesh = sharding.MeshConfig(2, 2, 2).make()
    model = create_model(_cfg(), mesh=mesh, rules=sharding.SAMPLE_RULES)
    expected = {k: P(*[None if a == "fsdp" else a for a in spec]) for k, spec in EXPECTED_TRAIN.items()}
    assert _flat_specs(model) == expected


def test_untied_head_and_reshard():
    mesh = sharding.MeshConfig(1, 2, 4).make()
    model = create_model(_cfg().replace(tie_embeddings=False), mesh=mesh)
    assert sharding.spec_tree(model)["lm_head"] == P("fsdp", "tensor")
    moved = sharding.reshard(model, mesh, sharding.SAMPLE_RULES)
    assert sharding.spec_tree(moved)["lm_head"] == P(None, "tensor")
    np.testing.assert_array_equal(np.asarray(moved.lm_head.get_value()), np.asarray(model.lm_head.get_value()))


def test_logical_to_spec_replicates_what_does_not_divide():
    mesh = sharding.MeshConfig(2, 2, 2).make()
    rules = sharding.TRAIN_RULES
    assert sharding.logical_to_spec(("batch", None), rules, (8, 3), mesh) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("batch", None), rules, (6, 3), mesh) == P("data", None)
    assert sharding.logical_to_spec(("batch", None), rules, (3, 3), mesh) == P(None, None)
    assert sharding.logical_to_spec(("kv_heads", "embed"), rules, (3, 4), mesh) == P(None, "fsdp")


def test_mesh_config():
    mesh = sharding.MeshConfig(data=-1, fsdp=2, tensor=2).make()
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    with pytest.raises(ValueError):
        sharding.MeshConfig(data=3, fsdp=1, tensor=1).make()
    with pytest.raises(ValueError):
        sharding.MeshConfig(data=-1, fsdp=-1)


def test_sharded_init_is_deterministic_across_meshes():
    a = create_model(_cfg(), mesh=sharding.MeshConfig(8, 1, 1).make(), seed=5)
    b = create_model(_cfg(), mesh=sharding.MeshConfig(1, 2, 4).make(), seed=5)
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
