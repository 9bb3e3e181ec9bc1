"""Sampler throughput: tokens/s, time to first token, peak memory and the decode's memory-bandwidth roofline; on CPU
side by side with transformers' `generate` on the same weights. With `--mix long-tail`: completions of long-tailed
lengths (most short, a few to the limit, as R1's are), the lockstep batch against continuous batching.

Shapes: P prompts, G completions per prompt, B = P*G rows, T prompt length, N new tokens.
"""
import argparse
import json
import os
import resource
import statistics
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from r1jax import engine, hf, sampler, sharding
from r1jax.model import PRESETS, KVCache, ModelConfig, create_model

# Peak HBM bandwidth (bytes/s) by device_kind substring; first match wins. CPU is measured instead.
BANDWIDTH = (
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("H200", 4.8e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),
    ("TPU v5 lite", 8.1e11),
    ("TPU v5e", 8.1e11),
    ("TPU v5p", 2.765e12),
    ("TPU v6", 1.64e12),
    ("TPU v4", 1.2e12),
)


def cpu_bandwidth(nbytes: int = 1 << 28) -> float:
    """Best of five numpy copies of `nbytes` (one read and one write per byte)."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def device_bandwidth(device) -> tuple[float, str]:
    if device.platform == "cpu":
        return cpu_bandwidth(), "measured: numpy copy, one thread"
    for name, bw in BANDWIDTH:
        if name in device.device_kind:
            return bw, f"spec sheet for {device.device_kind}"
    raise SystemExit(f"no bandwidth known for {device.device_kind!r}; add it to BANDWIDTH")


def peak_memory() -> tuple[int, str]:
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"], "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process RSS high-water mark"


def pin_cores(n: int) -> None:
    """Run this process (both frameworks) on `n` of the cores it may use."""
    cores = sorted(os.sched_getaffinity(0))
    if n > len(cores):
        raise SystemExit(f"--threads {n}: this process may use {len(cores)} cores")
    os.sched_setaffinity(0, cores[:n])


def time_r1jax(model, prompts, cfg: sampler.SamplerConfig, repeats: int) -> dict:
    key = jax.random.key(0)
    sampler.decode(*sampler.prefill(model, prompts, key, cfg), cfg).tokens_BxT.block_until_ready()  # compile
    ttft, decode = [], []
    for i in range(repeats):
        start = time.perf_counter()
        graphdef, state, ds, cache = sampler.prefill(model, prompts, jax.random.fold_in(key, i + 1), cfg)
        jax.block_until_ready((ds, cache))
        mid = time.perf_counter()
        rollout = sampler.decode(graphdef, state, ds, cache, cfg)
        rollout.tokens_BxT.block_until_ready()
        ttft.append(mid - start)
        decode.append(time.perf_counter() - mid)
    generated = int(np.asarray(rollout.mask_BxT).sum())
    return dict(ttft=statistics.median(ttft), decode=statistics.median(decode), generated=generated)


def long_tail_limits(B: int, N: int, seed: int = 0) -> np.ndarray:
    """Per-request new-token caps: 60% in [N/16, N/4], 30% in (N/4, N/2], 10% (and at least one) at N."""
    rng = np.random.default_rng(seed)
    u = rng.random(B)
    limits = np.where(u < 0.6, rng.integers(N // 16, N // 4 + 1, B),
                      np.where(u < 0.9, rng.integers(N // 4 + 1, N // 2 + 1, B), N))
    limits[rng.integers(0, B)] = N
    return np.maximum(limits, 1).astype(np.int32)


def time_long_tail(model, prompts, cfg: sampler.SamplerConfig, limits, slots: int, repeats: int) -> dict:
    """Seconds (median) to finish every request of the mix: the lockstep batch decodes all rows until the longest
    ends (its rows cannot stop early without a stop token, so its time is the fixed-length run's), continuous
    batching over `slots` slots stops each request at its cap and refills its slot."""
    def median_time(run):
        run()  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    key = jax.random.key(0)
    lockstep = median_time(lambda: sampler.generate(model, prompts, key, cfg).tokens_BxT.block_until_ready())
    continuous = median_time(lambda: engine.generate(model, prompts, key, cfg.replace(slots=slots),
                                                     max_new_tokens_R=limits).tokens_BxT.block_until_ready())
    return dict(lockstep_s=lockstep, continuous_s=continuous, useful_tokens=int(limits.sum()))


def hf_twin(mcfg: ModelConfig, dtype: str, folder: str, *, qwen2: bool = True, **config):
    """A random transformers model with the preset's sizes, a Qwen2 (qkv bias included, as every Qwen2 has) or a
    Llama, saved to `folder` so r1jax loads the identical weights; `config` adds to its config."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    common = dict(
        vocab_size=mcfg.vocab_size, hidden_size=mcfg.d_model, intermediate_size=mcfg.d_ff,
        num_hidden_layers=mcfg.n_layers, num_attention_heads=mcfg.n_heads, num_key_value_heads=mcfg.n_kv_heads,
        head_dim=mcfg.head_dim, tie_word_embeddings=mcfg.tie_embeddings, rope_theta=mcfg.rope_theta,
        rms_norm_eps=mcfg.norm_eps, max_position_embeddings=mcfg.max_seq_len, **config)
    if qwen2:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    model = model.eval().to(getattr(torch, dtype))
    model.save_pretrained(folder)
    return model


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def time_transformers(model, prompts, G: int, N: int, temperature: float, repeats: int, threads: int) -> dict:
    import torch

    # Setting the thread count explicitly (even to its default) made transformers' decode loop many times faster
    # on the CI machine's torch build (OpenMP); without it the comparison would flatter r1jax.
    torch.set_num_threads(threads or torch.get_num_threads())
    ids = torch.tensor(np.asarray(prompts))
    common = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                  num_return_sequences=G, pad_token_id=0, eos_token_id=None)

    def run(n):
        with torch.inference_mode():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **common)

    run(2)  # warm up
    ttft, total = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        run(1)
        ttft.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = run(N)
        total.append(time.perf_counter() - start)
    generated = int(out[:, ids.shape[1]:].numel())
    t1, tn = statistics.median(ttft), statistics.median(total)
    return dict(ttft=t1, decode=tn - t1, generated=generated)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r1jax.bench.sampler", description=__doc__)
    parser.add_argument("--preset", default="toy", choices=list(PRESETS))
    parser.add_argument("--prompts", type=int, default=8, help="P")
    parser.add_argument("-G", "--group-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="parameter and compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor")
    parser.add_argument("--mix", choices=("fixed", "long-tail"), default="fixed",
                        help="fixed: every row makes --new-tokens; long-tail: lockstep vs continuous batching")
    parser.add_argument("--slots", type=int, default=0, help="continuous batching's decode slots (default B/4)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-transformers", action="store_true", help="on CPU, skip the transformers comparison")
    parser.add_argument("--threads", type=int, default=1,
                        help="on CPU, the cores both frameworks run on (the process is pinned to them: XLA sizes its "
                             "thread pool by the cores it may use, torch takes as many threads); 0 keeps every core")
    args = parser.parse_args(argv)
    if args.threads:  # before JAX starts its CPU backend; XLA's threading flags did not bound its thunk runtime
        pin_cores(args.threads)

    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    mcfg = ModelConfig.preset(args.preset).replace(param_dtype=dtype, dtype=dtype)
    P, G, T, N = args.prompts, args.group_size, args.prompt_len, args.new_tokens
    B = P * G
    cfg = sampler.SamplerConfig(max_prompt_len=T, max_new_tokens=N, group_size=G, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p)  # no stop ids: every row makes N tokens
    mesh = sharding.MeshConfig(*(int(x) for x in args.mesh.split(","))).make()
    prompts = np.random.default_rng(0).integers(0, mcfg.vocab_size, (P, T)).tolist()
    if args.mix == "long-tail":
        return _long_tail(args, mcfg, mesh, prompts, cfg, device)
    compare = on_cpu and not args.no_transformers
    theirs = None
    with tempfile.TemporaryDirectory() as folder:
        if compare:
            # transformers first: on the shared 2-core CI machine its OpenMP decode loop was erratic (up to 100x
            # slower) when timed after XLA had run, and steady before.
            torch_model = hf_twin(mcfg, dtype, folder)
            theirs = time_transformers(torch_model, prompts, G, N, args.temperature, args.repeats, args.threads)
            mcfg, model = hf.load_hf(folder, dtype, mesh=mesh, rules=sharding.SAMPLE_RULES)
            mcfg = mcfg.replace(dtype=dtype)
            model.cfg = mcfg
            source = "random transformers Qwen2 of these sizes, loaded with r1jax.hf.load_hf"
        else:
            model = create_model(mcfg, mesh=mesh, rules=sharding.SAMPLE_RULES)
            source = "random init"
        ours = time_r1jax(sharding.for_sampling(model, mesh), prompts, cfg, args.repeats)
        peak, peak_how = peak_memory()

    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    filled = B * KVCache.bytes_per_row(mcfg, T + N // 2)  # average slots holding tokens over the decode
    allocated = B * KVCache.bytes_per_row(mcfg, T + N)  # what attention reads each step as implemented
    bandwidth, bw_how = device_bandwidth(device)
    roofline = B / ((weight_bytes + filled) / bandwidth)  # decode tokens/s if every byte read once per step

    def rates(r):
        return B * N / (r["ttft"] + r["decode"]), B * (N - 1) / r["decode"], r["ttft"]

    print(f"r1jax sampler benchmark on {jax.device_count()} x {device.device_kind} ({device.platform})"
          + (f", {args.threads or 'default'} thread(s) (CPU figures are noisy on a shared machine)" if on_cpu else ""))
    print(f"model   {args.preset} sizes, {mcfg.num_params / 1e6:.2f}M params ({'+qkv bias, ' if mcfg.qkv_bias else ''}"
          f"{source}), {dtype}")
    print(f"batch   {P} prompts x G={G} = {B} rows, prompt {T} tokens, {N} new tokens, "
          f"temperature {args.temperature}, top_k {args.top_k}, top_p {args.top_p}, median of {args.repeats}")
    header = f"{'':28}{'r1jax':>14}" + (f"{'transformers':>16}{'ratio':>10}" if theirs else "")
    print(header)
    names = ("generated tokens/s", "decode tokens/s", "time to first token (ms)")
    for i, name in enumerate(names):
        scale = 1e3 if i == 2 else 1.0
        line = f"{name:28}{rates(ours)[i] * scale:14.1f}"
        if theirs:  # ratio > 1: r1jax is faster
            ratio = rates(ours)[i] / rates(theirs)[i] if i < 2 else rates(theirs)[i] / rates(ours)[i]
            line += f"{rates(theirs)[i] * scale:16.1f}{ratio:9.2f}x"
        print(line)
    print(f"{'peak memory (MiB)':28}{peak / 2**20:14.1f}   ({peak_how}{', includes torch' if theirs else ''})")
    print(f"roofline: per decode step {weight_bytes / 2**20:.2f} MiB weights + {filled / 2**20:.2f} MiB KV cache "
          f"(filled slots; {allocated / 2**20:.2f} MiB allocated and read) at {bandwidth / 1e9:.1f} GB/s ({bw_how})")
    print(f"          = {roofline:.0f} tokens/s; r1jax decode reaches {rates(ours)[1] / roofline:.3f} of the roofline")
    if theirs:
        import torch

        print(f"transformers {transformers_version()} generate: do_sample, KV cache (DynamicCache), prompts repeated "
              f"G times before prefill, torch {torch.__version__} with {torch.get_num_threads()} thread(s)")
    if ours["generated"] != B * N:
        print(f"warning: r1jax generated {ours['generated']} tokens, expected {B * N}")
    if args.json:
        figures = dict(generated_tokens_per_s=rates(ours)[0], decode_tokens_per_s=rates(ours)[1],
                       ttft_s=rates(ours)[2], peak_memory_bytes=peak, roofline_tokens_per_s=roofline,
                       roofline_fraction=rates(ours)[1] / roofline)
        if theirs:
            figures.update(transformers_generated_tokens_per_s=rates(theirs)[0],
                           transformers_decode_tokens_per_s=rates(theirs)[1], transformers_ttft_s=rates(theirs)[2],
                           speedup_vs_transformers=rates(ours)[0] / rates(theirs)[0])
        _write_json(args, device, mcfg, dtype, figures)
    return 0


def _write_json(args, device, mcfg: ModelConfig, dtype: str, figures: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(bench="sampler", device=device.device_kind, platform=device.platform, devices=jax.device_count(),
                       model=args.preset, params=mcfg.num_params, dtype=dtype, mix=args.mix, prompts=args.prompts,
                       group_size=args.group_size, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, threads=args.threads,
                       **figures), f, indent=1)
    print(f"wrote {args.json}")


def _long_tail(args, mcfg: ModelConfig, mesh, prompts, cfg: sampler.SamplerConfig, device) -> int:
    P, G, N = args.prompts, args.group_size, args.new_tokens
    B = P * G
    slots = args.slots or max(1, B // 4)
    limits = long_tail_limits(B, N)
    model = sharding.for_sampling(create_model(mcfg, mesh=mesh, rules=sharding.SAMPLE_RULES), mesh)
    r = time_long_tail(model, prompts, cfg, limits, slots, args.repeats)
    useful = r["useful_tokens"]
    print(f"r1jax sampler benchmark, long-tailed lengths, on {jax.device_count()} x {device.device_kind}")
    print(f"model   {args.preset} sizes, {mcfg.num_params / 1e6:.2f}M params (random init), {mcfg.param_dtype}")
    print(f"batch   {P} prompts x G={G} = {B} requests, prompt {args.prompt_len} tokens, caps {limits.min()}.."
          f"{limits.max()} new tokens (mean {limits.mean():.1f}; {useful} of {B * N}), top_p {args.top_p}, "
          f"median of {args.repeats}")
    print(f"{'':34}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'lockstep batch (' + str(B) + ' rows)':34}{r['lockstep_s']:10.2f}{useful / r['lockstep_s']:12.1f}")
    print(f"{'continuous batching (' + str(slots) + ' slots)':34}{r['continuous_s']:10.2f}"
          f"{useful / r['continuous_s']:12.1f}")
    print(f"continuous batching: {r['lockstep_s'] / r['continuous_s']:.2f}x the lockstep batch "
          "(tokens/s counts each request's tokens up to its cap)")
    if args.json:
        _write_json(args, device, mcfg, mcfg.param_dtype, dict(
            slots=slots, useful_tokens=useful, lockstep_s=r["lockstep_s"], continuous_s=r["continuous_s"],
            speedup_continuous_vs_lockstep=r["lockstep_s"] / r["continuous_s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
