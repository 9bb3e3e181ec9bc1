"""Model configurations: the transformer's sizes and options, and named presets of the families r1jax runs
(Llama 2/3, Qwen2/2.5, Qwen3, SmolLM2, the DeepSeek-R1 distills). Sizes from the models' Hugging Face config.json.
"""
import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's "llama3" frequency scaling of RoPE (long-context extension)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2/2.5
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k
    tie_embeddings: bool = False
    max_seq_len: int = 32768
    # "auto": bf16 compute on accelerators, fp32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots"] = "none"
    attn_impl: Literal["xla", "cudnn", "reference"] = "xla"
    # The layers as one `lax.scan` (one compiled layer: compile time flat in depth) or unrolled (XLA's CPU backend
    # ran a toy GRPO update 1.4x faster unrolled: a scan's backward copies every layer's residuals in and out
    # of stacked buffers).
    scan_layers: bool = True

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        for field, allowed in (
            ("dtype", ("auto", "float32", "bfloat16")),
            ("param_dtype", ("float32", "bfloat16")),
            ("remat", ("none", "full", "dots")),
            ("attn_impl", ("xla", "cudnn", "reference")),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field}={getattr(self, field)!r}; choose from {allowed}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers={self.scan_layers!r} must be true or false")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def compute_dtype(self) -> jnp.dtype:
        if self.dtype == "auto":
            return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        return jnp.dtype(self.dtype)

    @property
    def num_params(self) -> int:
        D, F, N, K, H = self.d_model, self.d_ff, self.n_heads, self.n_kv_heads, self.head_dim
        attn = D * (N + 2 * K) * H + N * H * D + (N + 2 * K) * H * self.qkv_bias + 2 * H * self.qk_norm
        block = attn + 3 * D * F + 2 * D
        return self.n_layers * block + self.vocab_size * D * (1 if self.tie_embeddings else 2) + D

    # Named presets. Sizes from the models' Hugging Face config.json files.
    @classmethod
    def toy(cls) -> "ModelConfig":
        """The embedded CPU default: trains in minutes on a laptop."""
        return cls("toy", vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                   head_dim=32, d_ff=384, rope_theta=10000.0, tie_embeddings=True, max_seq_len=512)

    @classmethod
    def toy_student(cls) -> "ModelConfig":
        """The distillation recipe's CPU student: a fifth of `toy`'s parameters at the same vocabulary."""
        return cls("toy-student", vocab_size=512, d_model=64, n_layers=3, n_heads=2, n_kv_heads=1,
                   head_dim=32, d_ff=192, rope_theta=10000.0, tie_embeddings=True, max_seq_len=512)

    @classmethod
    def _qwen2(cls, name, V, D, L, N, K, F, tie, theta=1e6, max_len=32768) -> "ModelConfig":
        return cls(name, vocab_size=V, d_model=D, n_layers=L, n_heads=N, n_kv_heads=K,
                   head_dim=D // N, d_ff=F, rope_theta=theta, qkv_bias=True,
                   tie_embeddings=tie, max_seq_len=max_len)

    @classmethod
    def qwen2_5_0_5b(cls):
        return cls._qwen2("qwen2.5-0.5b", 151936, 896, 24, 14, 2, 4864, tie=True)

    @classmethod
    def qwen2_5_1_5b(cls):
        return cls._qwen2("qwen2.5-1.5b", 151936, 1536, 28, 12, 2, 8960, tie=True)

    @classmethod
    def qwen2_5_7b(cls):
        return cls._qwen2("qwen2.5-7b", 152064, 3584, 28, 28, 4, 18944, tie=False)

    @classmethod
    def deepseek_r1_distill_qwen_1_5b(cls):
        return cls._qwen2("deepseek-r1-distill-qwen-1.5b", 151936, 1536, 28, 12, 2, 8960,
                          tie=False, theta=10000.0, max_len=131072)

    @classmethod
    def deepseek_r1_distill_qwen_7b(cls):
        return cls._qwen2("deepseek-r1-distill-qwen-7b", 152064, 3584, 28, 28, 4, 18944,
                          tie=False, theta=10000.0, max_len=131072)

    @classmethod
    def _qwen3(cls, name, D, L, N, F, tie) -> "ModelConfig":
        return cls(name, vocab_size=151936, d_model=D, n_layers=L, n_heads=N, n_kv_heads=8,
                   head_dim=128, d_ff=F, rope_theta=1e6, qk_norm=True, tie_embeddings=tie,
                   max_seq_len=40960)

    @classmethod
    def qwen3_0_6b(cls):
        return cls._qwen3("qwen3-0.6b", 1024, 28, 16, 3072, tie=True)

    @classmethod
    def qwen3_1_7b(cls):
        return cls._qwen3("qwen3-1.7b", 2048, 28, 16, 6144, tie=True)

    @classmethod
    def qwen3_8b(cls):
        return cls._qwen3("qwen3-8b", 4096, 36, 32, 12288, tie=False)

    @classmethod
    def _llama3(cls, name, D, L, N, F, tie) -> "ModelConfig":
        scaling = RopeScaling(factor=32.0 if tie else 8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position=8192)
        return cls(name, vocab_size=128256, d_model=D, n_layers=L, n_heads=N, n_kv_heads=8,
                   head_dim=D // N, d_ff=F, rope_theta=500000.0, rope_scaling=scaling,
                   norm_eps=1e-5, tie_embeddings=tie, max_seq_len=131072)

    @classmethod
    def llama3_2_1b(cls):
        return cls._llama3("llama3.2-1b", 2048, 16, 32, 8192, tie=True)

    @classmethod
    def llama3_1_8b(cls):
        return cls._llama3("llama3.1-8b", 4096, 32, 32, 14336, tie=False)

    @classmethod
    def smollm2_135m(cls):
        return cls("smollm2-135m", vocab_size=49152, d_model=576, n_layers=30, n_heads=9,
                   n_kv_heads=3, head_dim=64, d_ff=1536, rope_theta=100000.0, norm_eps=1e-5,
                   tie_embeddings=True, max_seq_len=8192)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
        return getattr(cls, PRESETS[name])()


PRESETS = {
    "toy": "toy",
    "toy-student": "toy_student",
    "qwen2.5-0.5b": "qwen2_5_0_5b",
    "qwen2.5-1.5b": "qwen2_5_1_5b",
    "qwen2.5-7b": "qwen2_5_7b",
    "qwen3-0.6b": "qwen3_0_6b",
    "qwen3-1.7b": "qwen3_1_7b",
    "qwen3-8b": "qwen3_8b",
    "llama3.2-1b": "llama3_2_1b",
    "llama3.1-8b": "llama3_1_8b",
    "deepseek-r1-distill-qwen-1.5b": "deepseek_r1_distill_qwen_1_5b",
    "deepseek-r1-distill-qwen-7b": "deepseek_r1_distill_qwen_7b",
    "smollm2-135m": "smollm2_135m",
}
