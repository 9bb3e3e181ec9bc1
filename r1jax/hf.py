"""Hugging Face folders in and out: config.json <-> ModelConfig, safetensors <-> sharded
parameters, read and written one tensor (one layer) at a time.

Shapes: L layers, D width, F MLP hidden, V vocab, N/K query/kv heads, H head dim.
"""
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from r1jax import sharding
from r1jax.model import ModelConfig, RopeScaling, Transformer
from r1jax.safetensors_io import SafetensorsFolder, write_safetensors

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_MAX_SHARD_BYTES = 5 * 2**30

# r1jax layer weight -> (HF tensor name, HF layout -> r1jax layout, r1jax -> HF).
# torch Linear stores (out, in); r1jax stores (in, out) with heads split out.
_Map = tuple[str, Callable, Callable]


def _layer_map(cfg: ModelConfig) -> dict[str, _Map]:
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    same = (lambda w: w, lambda w: w)
    pre = "model.layers.{}."
    table = {
        "attn_norm": (pre + "input_layernorm.weight", *same),
        "mlp_norm": (pre + "post_attention_layernorm.weight", *same),
        "wq": (pre + "self_attn.q_proj.weight", lambda w: w.T.reshape(D, N, H), lambda w: w.reshape(D, N * H).T),
        "wk": (pre + "self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, H), lambda w: w.reshape(D, K * H).T),
        "wv": (pre + "self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, H), lambda w: w.reshape(D, K * H).T),
        "wo": (pre + "self_attn.o_proj.weight", lambda w: w.T.reshape(N, H, D), lambda w: w.reshape(N * H, D).T),
        "w_gate": (pre + "mlp.gate_proj.weight", np.transpose, np.transpose),
        "w_up": (pre + "mlp.up_proj.weight", np.transpose, np.transpose),
        "w_down": (pre + "mlp.down_proj.weight", np.transpose, np.transpose),
    }
    if cfg.qkv_bias:
        table["bq"] = (pre + "self_attn.q_proj.bias", lambda b: b.reshape(N, H), lambda b: b.reshape(N * H))
        table["bk"] = (pre + "self_attn.k_proj.bias", lambda b: b.reshape(K, H), lambda b: b.reshape(K * H))
        table["bv"] = (pre + "self_attn.v_proj.bias", lambda b: b.reshape(K, H), lambda b: b.reshape(K * H))
    if cfg.qk_norm:
        table["q_norm"] = (pre + "self_attn.q_norm.weight", *same)
        table["k_norm"] = (pre + "self_attn.k_norm.weight", *same)
    return table


def _top_map(cfg: ModelConfig) -> dict[str, _Map]:
    same = (lambda w: w, lambda w: w)
    table = {"embed": ("model.embed_tokens.weight", *same), "final_norm": ("model.norm.weight", *same)}
    if not cfg.tie_embeddings:
        table["lm_head"] = ("lm_head.weight", np.transpose, np.transpose)
    return table


def config_from_hf(hf: dict, *, param_dtype: str = "float32") -> ModelConfig:
    """ModelConfig from a config.json dict (transformers 4 and 5 spellings)."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"unsupported architecture model_type={kind!r} "
                         f"({hf.get('architectures')}); r1jax supports {sorted(SUPPORTED)}")
    unsupported = []
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']}")
    if hf.get("mlp_bias"):
        unsupported.append("mlp_bias=true")
    if kind == "llama" and hf.get("attention_bias"):
        unsupported.append("attention_bias=true (o_proj bias)")
    if hf.get("use_sliding_window"):
        unsupported.append("use_sliding_window=true")
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    scaling_src = rope if rope.get("rope_type") == rope_type else legacy
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(scaling_src["factor"]),
            low_freq_factor=float(scaling_src["low_freq_factor"]),
            high_freq_factor=float(scaling_src["high_freq_factor"]),
            original_max_position=int(scaling_src["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        unsupported.append(f"rope_type={rope_type}")
    if unsupported:
        raise ValueError(f"unsupported {kind} options: {', '.join(unsupported)}")
    D, N = hf["hidden_size"], hf["num_attention_heads"]
    return ModelConfig(
        name=hf.get("_name_or_path") or kind,
        vocab_size=hf["vocab_size"],
        d_model=D,
        n_layers=hf["num_hidden_layers"],
        n_heads=N,
        n_kv_heads=hf.get("num_key_value_heads") or N,
        head_dim=hf.get("head_dim") or D // N,
        d_ff=hf["intermediate_size"],
        rope_theta=float(theta),
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=kind == "qwen2" or bool(hf.get("attention_bias")),
        qk_norm=kind == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 32768)),
        param_dtype=param_dtype,
    )


def config_to_hf(cfg: ModelConfig, *, torch_dtype: str) -> dict:
    """config.json for transformers 5 (rope_parameters) that older readers (vLLM,
    transformers 4: rope_theta / rope_scaling) also understand."""
    kind = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    legacy_scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        legacy_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                          "high_freq_factor": s.high_freq_factor,
                          "original_max_position_embeddings": s.original_max_position}
        rope = {**legacy_scaling, "rope_theta": cfg.rope_theta}
    out = {
        "architectures": [SUPPORTED[kind]],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": legacy_scaling,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": kind == "llama" and cfg.qkv_bias,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
    if kind == "llama":
        out["mlp_bias"] = False
    if kind != "llama":
        out["use_sliding_window"] = False
    return out


def _dtype_name(dtype: DTypeLike) -> str:
    """"bfloat16" from "bfloat16", np.dtype("bfloat16") or jnp.bfloat16 alike."""
    try:
        return jnp.dtype(dtype).name
    except TypeError as e:
        raise ValueError(f"dtype={dtype!r} is not a dtype; use e.g. 'float32' or jnp.bfloat16") from e


def load_hf(
    path: str,
    dtype: DTypeLike = "float32",
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules = sharding.TRAIN_RULES,
) -> tuple[ModelConfig, Transformer]:
    """Read a Hugging Face folder into a ModelConfig and a sharded Transformer.

    `dtype` is the parameter dtype ("float32" or "bfloat16", as a name or a dtype). Each
    parameter is assembled shard by shard with `make_array_from_callback`: a device's
    callback reads only the layers it holds from the memory-mapped files, so no full
    unsharded model is ever materialised.
    """
    dtype = _dtype_name(dtype)
    with open(os.path.join(path, "config.json")) as f:
        cfg = config_from_hf(json.load(f), param_dtype=dtype)
    tensors = SafetensorsFolder(path)
    layer_map, top_map = _layer_map(cfg), _top_map(cfg)
    wanted = [hf for hf, _, _ in top_map.values()] + [
        hf.format(i) for hf, _, _ in layer_map.values() for i in range(cfg.n_layers)
    ]
    missing = [name for name in wanted if name not in tensors]
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"{path}: missing tensors for {cfg.name}: {shown}")

    mesh = sharding.MeshConfig().make() if mesh is None else mesh
    act = sharding.ActivationSharding(mesh, rules)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), act_sharding=act)))
    shardings = sharding.state_shardings(abstract, mesh, rules)
    np_dtype = np.dtype(jnp.dtype(dtype))

    def build(key_path, var, target):
        name = key_path[-1].key
        stacked = key_path[0].key == "layers"
        hf_name, to_r1, _ = (layer_map if stacked else top_map)[name]

        def shard(index):
            if not stacked:
                return np.asarray(to_r1(tensors[hf_name]))[index].astype(np_dtype)
            rows = range(cfg.n_layers)[index[0]]
            return np.stack([np.asarray(to_r1(tensors[hf_name.format(i)]))[index[1:]] for i in rows]).astype(np_dtype)

        value = jax.make_array_from_callback(var.get_value().shape, target, shard)
        return var.replace(value=value)

    state = jax.tree_util.tree_map_with_path(build, abstract, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return cfg, nnx.merge(graphdef, state)


def save_hf(cfg: ModelConfig, model: Transformer, path: str, *, dtype: DTypeLike | None = None,
            tokenizer=None) -> None:
    """Write a folder transformers (and vLLM) load: config.json, safetensors (split
    at 5 GiB with an index), and the tokenizer's files when one is given.

    Every process takes part in gathering each tensor; only process 0 writes.
    """
    dtype = _dtype_name(dtype or cfg.param_dtype)
    np_dtype = np.dtype(jnp.dtype(dtype))
    layer_map, top_map = _layer_map(cfg), _top_map(cfg)
    top_values = {"embed": model.embed, "final_norm": model.final_norm}
    if not cfg.tie_embeddings:
        top_values["lm_head"] = model.lm_head

    specs, fetchers = [], {}
    for name, (hf_name, _, to_hf) in top_map.items():
        var = top_values[name]
        shape = np.asarray(to_hf(np.empty(var.get_value().shape, np.uint8))).shape
        specs.append((hf_name, shape, np_dtype))
        fetchers[hf_name] = lambda var=var, to_hf=to_hf: to_hf(sharding.host_array(var.get_value()))
    for i in range(cfg.n_layers):
        for name, (hf_tmpl, _, to_hf) in layer_map.items():
            var = model.layers[name]
            shape = np.asarray(to_hf(np.empty(var.get_value().shape[1:], np.uint8))).shape
            specs.append((hf_tmpl.format(i), shape, np_dtype))
            fetchers[hf_tmpl.format(i)] = lambda var=var, i=i, to_hf=to_hf: to_hf(sharding.host_array(var.get_value()[i]))

    files, current, size = [], [], 0
    for spec in specs:
        nbytes = int(np.prod(spec[1])) * np_dtype.itemsize
        if current and size + nbytes > _MAX_SHARD_BYTES:
            files.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    files.append(current)

    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
    names = ["model.safetensors"] if len(files) == 1 else [
        f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))
    ]
    for fname, group in zip(names, files):
        if writer:
            write_safetensors(os.path.join(path, fname), group, lambda n: fetchers[n](), {"format": "pt"})
        else:  # still join the collective gathers, in the same order
            for n, _, _ in group:
                fetchers[n]()
    if not writer:
        return
    if len(files) > 1:
        weight_map = {n: fname for fname, group in zip(names, files) for n, _, _ in group}
        total = sum(int(np.prod(s)) * np_dtype.itemsize for _, s, _ in specs)
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, torch_dtype=str(dtype)), f, indent=2)
    if tokenizer is not None:
        tokenizer.save(path)
