"""Training-step throughput and model FLOPs utilisation (MFU) of a preset with random weights: one optimizer step of
next-token cross-entropy over B full rows of S tokens (`train.sft_step`, AdamW, the layer layout the recipes use),
model FLOPs counted with attention, over the device's peak.

    python -m r1jax.bench.train_step --preset qwen2.5-0.5b --batch 8 --seq 4096 --dtype bfloat16 --remat full
    python -m r1jax.bench.train_step --preset smollm2-135m --vocab 4096 --batch 8 --seq 256     # the CPU figure

Peak FLOP/s: the spec sheet's dense bf16 figure on accelerators; on CPU, measured: the best of a large matmul in
the step's dtype on every core (so CPU MFU says how close the step comes to this machine's matmul speed).
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import sharding, train
from r1jax.bench.forward import PEAK_FLOPS
from r1jax.model import PRESETS, ModelConfig, create_model


def train_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3 forwards): 2 per weight per token (the head
    included, the embedding lookup not), and attention's scores and values, 2 * 2 * S * N * H per token and
    layer, halved by the causal mask."""
    weights = cfg.num_params - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)
    attention = 2 * cfg.n_layers * seq * cfg.n_heads * cfg.head_dim
    return 3 * batch * seq * (2 * weights + attention)


def measured_peak(dtype) -> tuple[float, str]:
    """The best FLOP/s of a 4096^3 matmul over a few runs, on every core this process may use."""
    a = jnp.ones((4096, 4096), dtype)
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * 4096 ** 3 / best, f"measured: 4096^3 {jnp.dtype(dtype).name} matmul, {os.cpu_count()} cores"


def peak_flops(device, dtype) -> tuple[float, str]:
    if device.platform == "cpu":
        return measured_peak(dtype)
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in device.device_kind.lower():
            return flops, f"spec sheet: {device.device_kind} dense bf16"
    raise SystemExit(f"no peak FLOP/s known for {device.device_kind!r}; add it to r1jax.bench.forward.PEAK_FLOPS")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m r1jax.bench.train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m", choices=list(PRESETS))
    p.add_argument("--vocab", type=int, default=0, help="replace the preset's vocabulary size (0: keep it)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype (default: float32 on CPU, bfloat16 elsewhere); weights stay float32")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    p.add_argument("--scan-layers", choices=("true", "false"),
                   help="the layers as one scan (default: unrolled on CPU, a scan elsewhere, as the recipes run)")
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps after a warm-up step")
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args(argv)

    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    scan = (args.scan_layers or ("false" if on_cpu else "true")) == "true"
    cfg = ModelConfig.preset(args.preset).replace(dtype=dtype, remat=args.remat, scan_layers=scan,
                                                  max_seq_len=max(args.seq, 1))
    if args.vocab:
        cfg = cfg.replace(vocab_size=args.vocab)
    mesh = sharding.MeshConfig(data=jax.device_count()).make()
    state = train.create_train_state(create_model(cfg, mesh=mesh), train.make_optimizer(train.OptimConfig(), 10))
    rng = np.random.default_rng(0)
    put = lambda x: sharding.put_rows(x, mesh, sharding.TRAIN_RULES)  # noqa: E731
    tokens = put(rng.integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32))
    ones = put(np.ones((args.batch, args.seq), bool))
    batch = train.SFTBatch(tokens, ones, ones)

    start = time.perf_counter()
    state, metrics = train.sft_step(state, batch, microbatches=args.microbatches)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = train.sft_step(state, batch, microbatches=args.microbatches)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    flops = train_flops(cfg, args.batch, args.seq)
    peak, how = peak_flops(device, dtype)
    mfu = flops / seconds / (peak * jax.device_count())
    print(f"training step on {jax.device_count()} x {device.device_kind}: {args.preset} "
          f"({cfg.num_params / 1e6:.1f}M params{', vocab ' + str(cfg.vocab_size) if args.vocab else ''}), "
          f"{args.batch} x {args.seq} tokens, {dtype} compute, remat {args.remat}, "
          f"{'scanned' if scan else 'unrolled'} layers, median of {args.steps} after a warm-up ({first:.1f} s)")
    print(f"  {seconds:.3f} s/step  {args.batch * args.seq / seconds:,.0f} tokens/s  {flops / seconds / 1e12:.3f} "
          f"TFLOP/s  MFU {mfu:.1%} of {peak / 1e12:.2f} TFLOP/s per device ({how})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(bench="train_step", device=device.device_kind, platform=device.platform,
                           devices=jax.device_count(), model=args.preset, vocab=cfg.vocab_size, batch=args.batch,
                           seq=args.seq, dtype=dtype, remat=args.remat, scan_layers=scan, step_s=seconds,
                           first_step_s=first, tokens_per_s=args.batch * args.seq / seconds, model_flops=flops,
                           peak_flops=peak, peak_source=how, mfu=mfu), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
