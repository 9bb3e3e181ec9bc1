"""Forward throughput of a preset with random weights: tokens/s and model FLOPs utilisation.

    python -m r1jax.bench.forward --preset qwen2.5-0.5b --batch 8 --seq 2048 --dtype bfloat16
"""
import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax import sharding
from r1jax.model import ModelConfig, create_model

# Dense bf16 peak FLOP/s per device (fp32 on CPU is measured, not looked up).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v4": 275e12}


def forward_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward: 2 per parameter per token, plus attention scores and values."""
    params = cfg.num_params - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)
    attention = 2 * 2 * cfg.n_layers * seq * cfg.n_heads * cfg.head_dim  # QK^T and PV, causal ~ half of 2x
    return batch * seq * (2 * params + attention)


def _peak(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="toy")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--attn", default="xla", choices=["xla", "cudnn", "reference"])
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)

    cfg = ModelConfig.preset(args.preset).replace(dtype=args.dtype, attn_impl=args.attn,
                                                  param_dtype="bfloat16" if args.dtype == "bfloat16" else "float32")
    mesh = sharding.MeshConfig().make()
    model = create_model(cfg, mesh=mesh)
    graphdef, state = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(args.seq), tokens.shape)

    @jax.jit
    def forward(state, tokens):
        # The hidden states and the last position's logits: what a forward pass costs
        # without a BxTxV fp32 tensor dominating memory traffic.
        model = nnx.merge(graphdef, state)
        h, _ = model.hidden(tokens, positions)
        return model.logits(h[:, -1:])

    jax.block_until_ready(forward(state, tokens))
    start = time.perf_counter()
    for _ in range(args.iters):
        out = forward(state, tokens)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / args.iters
    tokens_per_s = args.batch * args.seq / seconds
    flops = forward_flops(cfg, args.batch, args.seq) / seconds
    device = jax.devices()[0]
    peak = _peak(device)
    print(f"{args.preset} forward, batch {args.batch} x {args.seq}, dtype {jnp.dtype(cfg.compute_dtype).name}, "
          f"{len(jax.devices())} x {device.device_kind}")
    print(f"  {seconds * 1e3:.1f} ms/forward  {tokens_per_s:,.0f} tokens/s  {flops / 1e12:.2f} TFLOP/s"
          + (f"  MFU {flops / (peak * len(jax.devices())):.1%}" if peak else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
