"""Merge the benchmarks' JSON files into `bench.json`: one object per device kind (cpu, gpu, tpu), the figures
DESIGN.md names, each with where it came from. Runs after the benchmarks in `make bench`; a device kind's
earlier figures (e.g. a GPU run's) are kept when this machine is another kind.

    python -m r1jax.bench.summary runs/bench

Figures (ratios > 1 favour r1jax except the step-time ratio, where < 1 does):
  grpo_step_ratio_vs_trl          r1jax GRPO step time / TRL's, same workload (grpo_step*.json, one per shape)
  sampler_ratio_vs_transformers   r1jax generated tokens/s / transformers.generate's (sampler.json)
  decode_roofline_fraction        r1jax decode tokens/s / the memory-bandwidth roofline's (sampler.json)
  continuous_batching_speedup     lockstep time / continuous batching's, long-tailed lengths (sampler_long_tail.json)
  train_mfu                       training-step model FLOPs utilisation (mfu.json; on CPU over a measured peak)
  sampler_shapes                  tokens/s, time to first token and roofline fraction per preset (sampler*.json)
"""
import glob
import json
import os
import sys


def _load(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def device_kind(platform: str) -> str:
    return {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu"}.get(platform, "cpu")


def collect(out_dir: str) -> tuple[str, dict]:
    """(device kind, figures) from the JSON files in `out_dir`."""
    figures, platform = {}, None
    for path in sorted(glob.glob(os.path.join(out_dir, "grpo_step*.json"))):
        g = _load(path)
        if g:
            figures.setdefault("grpo_step", {})[g["shape"]] = {"r1jax": g["r1jax"], "trl": g.get("trl")}
            platform = platform or g.get("platform", "cpu")
        if g and g.get("trl"):
            figures.setdefault("grpo_step_ratio_vs_trl", {})[g["shape"]] = g["r1jax"]["step"] / g["trl"]["step"]
    s = _load(os.path.join(out_dir, "sampler.json"))
    if s:
        platform = s["platform"]
        figures["decode_roofline_fraction"] = s["roofline_fraction"]
        if "speedup_vs_transformers" in s:
            figures["sampler_ratio_vs_transformers"] = s["speedup_vs_transformers"]
        figures["sampler"] = {k: s[k] for k in ("model", "dtype", "prompts", "group_size", "prompt_len",
                                                 "new_tokens", "top_p", "generated_tokens_per_s", "device")}
    for path in sorted(glob.glob(os.path.join(out_dir, "sampler*.json"))):
        shape = _load(path)
        if shape and shape.get("mix") == "fixed":
            figures.setdefault("sampler_shapes", {})[shape["model"]] = {
                k: shape[k] for k in ("generated_tokens_per_s", "decode_tokens_per_s", "ttft_s", "roofline_fraction",
                                      "prompts", "group_size", "prompt_len", "new_tokens", "top_p", "dtype")}
    lt = _load(os.path.join(out_dir, "sampler_long_tail.json"))
    if lt:
        platform = lt["platform"]
        figures["continuous_batching_speedup"] = lt["speedup_continuous_vs_lockstep"]
        figures["long_tail"] = {k: lt[k] for k in ("model", "prompts", "group_size", "new_tokens", "slots",
                                                   "useful_tokens", "lockstep_s", "continuous_s")}
    m = _load(os.path.join(out_dir, "mfu.json"))
    if m:
        platform = m["platform"]
        figures["train_mfu"] = m["mfu"]
        figures["train_step"] = {k: m[k] for k in ("model", "vocab", "batch", "seq", "dtype", "remat", "step_s",
                                                   "tokens_per_s", "peak_flops", "peak_source")}
    return device_kind(platform or "cpu"), figures


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = argv[0] if argv else "runs/bench"
    kind, figures = collect(out_dir)
    path = os.path.join(out_dir, "bench.json")
    merged = _load(path) or {}
    merged[kind] = figures
    with open(path, "w") as f:
        json.dump(merged, f, indent=1)
    print(f"wrote {path} ({kind}):")
    for name, value in figures.items():
        if not isinstance(value, dict) or name.endswith("_vs_trl"):
            print(f"  {name}: {json.dumps(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
