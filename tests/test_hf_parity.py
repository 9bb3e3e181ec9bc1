"""Parity with transformers (torch CPU) on tiny random Llama, Qwen2 and Qwen3 models."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from r1jax import hf, sharding
from r1jax.model import positions_from_mask

TOL = 1e-4  # fp32 logits, max abs difference (issue bar)

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _tiny_hf(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**TINY, rope_theta=500000.0, rms_norm_eps=1e-5, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**TINY, tie_word_embeddings=True, rope_theta=1e6)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(**{**TINY, "num_attention_heads": 8}, head_dim=24, rope_theta=1e6)
        model = transformers.Qwen3ForCausalLM(cfg)
    # Random init leaves norms at 1 and biases at 0; perturb them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def hf_folder(request, tmp_path_factory):
    model = _tiny_hf(request.param)
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    return request.param, model, path


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, size=(3, 12))
    lengths = np.array([12, 7, 3])
    mask = np.arange(12)[None, :] >= (12 - lengths)[:, None]  # left padding
    return tokens, mask


def _jax_logits(model, tokens, mask):
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, mask):
        logits, _ = nnx.merge(graphdef, state)(tokens, positions_from_mask(mask), mask)
        return logits

    return np.asarray(forward(state, jnp.asarray(tokens), jnp.asarray(mask)))


def _torch_logits(model, tokens, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)))
    return out.logits.float().numpy()


def test_logits_match_transformers(hf_folder):
    kind, torch_model, path = hf_folder
    cfg, model = hf.load_hf(path)
    tokens, mask = _batch()
    ours = _jax_logits(model, tokens, np.ones_like(mask))
    ref = _torch_logits(torch_model, tokens, np.ones_like(mask))
    assert np.abs(ours - ref).max() <= TOL


def test_left_padded_logits_match_transformers(hf_folder):
    kind, torch_model, path = hf_folder
    _, model = hf.load_hf(path)
    tokens, mask = _batch()
    ours = _jax_logits(model, tokens, mask)
    # Reference: each row alone, unpadded, so padding handling is checked as well.
    for row in range(tokens.shape[0]):
        real = tokens[row][mask[row]][None]
        ref = _torch_logits(torch_model, real, np.ones_like(real))
        assert np.abs(ours[row][mask[row]] - ref[0]).max() <= TOL


def test_save_roundtrip_loads_in_transformers(hf_folder, tmp_path):
    kind, torch_model, path = hf_folder
    cfg, model = hf.load_hf(path)
    out = str(tmp_path / "saved")
    hf.save_hf(cfg, model, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(torch_model)
    tokens, mask = _batch()
    ref = _torch_logits(torch_model, tokens, mask)
    again = _torch_logits(reloaded, tokens, mask)
    assert np.abs(again - ref)[mask].max() <= TOL
    # And r1jax reads its own output back to the same parameters.
    _, model2 = hf.load_hf(out)
    a, b = nnx.state(model), nnx.state(model2)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_load_places_params_by_rules(hf_folder):
    _, _, path = hf_folder
    mesh = sharding.MeshConfig(data=1, fsdp=2, tensor=4).make()
    cfg, model = hf.load_hf(path, mesh=mesh)
    specs = sharding.spec_tree(model)
    assert specs["layers"]["w_gate"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert specs["layers"]["wq"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    # kv_heads=2 does not divide tensor=4: replicated rather than an error.
    assert specs["layers"]["wk"] == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    _, single = hf.load_hf(path, mesh=sharding.MeshConfig().make(jax.devices()[:1]))
    tokens, mask = _batch()
    np.testing.assert_allclose(_jax_logits(model, tokens, mask)[mask], _jax_logits(single, tokens, mask)[mask],
                               atol=1e-5, rtol=0)


def test_bf16_params_load(hf_folder):
    _, torch_model, path = hf_folder
    cfg, model = hf.load_hf(path, dtype="bfloat16")
    assert model.layers["wq"].get_value().dtype == jnp.bfloat16
    tokens, mask = _batch()
    ours = _jax_logits(model, tokens, mask)
    ref = _torch_logits(torch_model, tokens, mask)
    # bf16 weights (8 bits of mantissa) through fp32 compute: loose by construction.
    assert np.abs(ours - ref)[mask].max() < 0.1


def test_dtype_may_be_a_name_or_a_dtype(tmp_path):
    path = str(tmp_path / "qwen2")
    _tiny_hf("qwen2").save_pretrained(path)
    by_name = {name: nnx.state(hf.load_hf(path, dtype=name)[1]) for name in ("float32", "bfloat16")}
    for dtype, name in ((jnp.bfloat16, "bfloat16"), (np.dtype(jnp.bfloat16), "bfloat16"),
                        (jnp.float32, "float32"), (np.float32, "float32")):
        cfg, model = hf.load_hf(path, dtype=dtype)
        assert cfg.param_dtype == name and model.layers["wq"].get_value().dtype == jnp.dtype(name)
        for x, y in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(by_name[name])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    hf.save_hf(cfg, model, str(tmp_path / "saved"), dtype=jnp.bfloat16)
    with open(tmp_path / "saved" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    for bad in ("float16", "fp32", 3):
        with pytest.raises(ValueError):
            hf.load_hf(path, dtype=bad)


def test_missing_tensor_and_unknown_architecture_are_named(hf_folder, tmp_path):
    _, _, path = hf_folder
    cfg, model = hf.load_hf(path)
    out = str(tmp_path / "broken")
    hf.save_hf(cfg, model, out)
    # Drop one tensor by rewriting the file without it.
    from safetensors.numpy import load_file, save_file
    tensors = load_file(os.path.join(out, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, os.path.join(out, "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        hf.load_hf(out)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    config["model_type"] = "gpt2"
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="gpt2"):
        hf.load_hf(out)
