"""One GRPO step, split into sample / reward / reference / update / idle, with tokens/s; on CPU side by side with
TRL's GRPOTrainer on the same weights, tokenizer and workload.

    python -m r1jax.bench.grpo_step --shape tiny-qwen2
    python -m r1jax.bench.grpo_step --shape smollm2-135m --microbatches 4

The workload (issue 11): P = 8 prompts x G = 8 samples, prompts of exactly 128 tokens, up to 64 new tokens
(random weights rarely draw the stop token), one optimizer step per GRPO step, a KL term to a reference model
(beta 0.001: both frameworks run the reference forward), fp32, temperature 1. Each framework runs one warm-up
step (compilation, allocation) and then `--steps` steps; figures are medians over those.

r1jax runs its real RL stage (`rl.grpo_stage`) and reads the split it logs. TRL is timed by wrapping its
generation and reward methods; its update is the step's remainder after generate-and-score. Neither
rematerialises activations (TRL's default gradient checkpointing is turned off), and each runs in a process of
its own.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SHAPES = {
    # name: (model preset it starts from, overrides, vocab)
    "tiny-qwen2": dict(base="qwen2.5-0.5b", d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64,
                       d_ff=1024, vocab_size=4096),
    "smollm2-135m": dict(base="smollm2-135m", vocab_size=4096),
}
PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS, BETA, LR = 8, 8, 128, 64, 0.001, 1e-6


def length_reward(completions, examples=None, **_):
    """A cheap rule reward both frameworks call: the share of completion words ending in an even digit."""
    if REWARD_SECONDS:  # a slow verifier (a sandbox, a remote judge): the host waits this long per call
        time.sleep(REWARD_SECONDS)
    return [float(np.mean([w[-1] in "02468" for w in c.split()])) if c.split() else 0.0 for c in completions]


REWARD_SECONDS = 0.0


def make_folder(folder: str, shape: str) -> None:
    """A random transformers model of the shape (Qwen2 when it has qkv biases, else Llama) and a word-level
    tokenizer whose words are single tokens, so a 128-word prompt is 128 tokens for both frameworks."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from r1jax.bench.sampler import hf_twin
    from r1jax.model import ModelConfig

    spec = dict(SHAPES[shape])
    mcfg = ModelConfig.preset(spec.pop("base")).replace(**spec)
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, mcfg.vocab_size)}}
    word = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=word, eos_token="<eos>", pad_token="<eos>",
                                                unk_token="<unk>")
    fast.save_pretrained(folder)
    hf_twin(mcfg, "float32", folder, qwen2=mcfg.qkv_bias, eos_token_id=1, pad_token_id=1, bos_token_id=None)


def prompts(n: int, vocab: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(2, vocab, PROMPT_LEN)) for _ in range(n)]


def run_r1jax(folder: str, steps: int, microbatches: int, run_dir: str, scan_layers: bool,
              one_step_off: bool = False) -> list[dict]:
    import jax

    from r1jax import run, sharding
    from r1jax.metrics import read_metrics
    from r1jax.rewards import Reward, RewardSet
    from r1jax.rl import RLConfig, grpo_stage
    from r1jax.train import OptimConfig

    class Never:
        def stop_everywhere(self):
            return False

    ctx = run.make_context(run_dir, sharding.MeshConfig(data=jax.device_count()), 0, {"scan_layers": scan_layers},
                           Never())
    policy = run.load_policy(folder, ctx)
    cfg = RLConfig(steps=steps + 1 + one_step_off, prompts_per_step=PROMPTS, group_size=GROUP, microbatches=microbatches,
                   optim=OptimConfig(lr=LR), kl_coef=BETA, max_prompt_len=PROMPT_LEN, max_new_tokens=NEW_TOKENS,
                   checkpoint_every=10_000, log_samples_every=0, one_step_off=one_step_off)
    records = [{"prompt": p, "answer": ""} for p in prompts(8 * PROMPTS, policy.cfg.vocab_size)]
    grpo_stage(ctx, policy, name="grpo", cfg=cfg, train_records=records,
               rewards=RewardSet([Reward("even", length_reward)]), render=str)
    ctx.logger.close()
    steps_logged = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]
    # Not the warm-up step (compilation), nor one-step-off's last, which has no next batch to sample.
    steps_logged = steps_logged[1:-1] if one_step_off else steps_logged[1:]
    return [{"step": r["time_step_s"], "sample": r["time_sample_s"], "reward": r["time_reward_s"],
             "reference": r["time_reference_s"], "update": r["time_update_s"], "idle": r["time_idle_s"],
             "tokens": r["completion_len_mean"] * PROMPTS * GROUP} for r in steps_logged]


def run_trl(folder: str, steps: int, microbatches: int, out_dir: str, threads: int) -> list[dict]:
    import datasets
    import torch
    import transformers
    import trl

    torch.set_num_threads(threads or torch.get_num_threads())
    transformers.utils.logging.set_verbosity_error()
    times: list[dict] = []
    current: dict = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                current[name] = current.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            current.clear()
            current["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            total = time.perf_counter() - current["start"]
            scored = current.get("generate_and_score", 0.0)
            times.append({"step": total, "sample": current.get("generate", 0.0),
                          "reward": current.get("reward", 0.0),
                          "reference": scored - current.get("generate", 0.0) - current.get("reward", 0.0),
                          "update": total - scored, "idle": float("nan"), "tokens": current.get("tokens", 0)})

    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder)  # Auto would pick Qwen2Tokenizer
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    data = datasets.Dataset.from_dict({"prompt": prompts(PROMPTS * (steps + 1), model.config.vocab_size, seed=1)})
    config = trl.GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=PROMPTS * GROUP // microbatches,
        gradient_accumulation_steps=microbatches, num_generations=GROUP, max_completion_length=NEW_TOKENS,
        max_steps=steps + 1, learning_rate=LR, beta=BETA, num_iterations=1, temperature=1.0, top_p=1.0,
        use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=0, dataloader_num_workers=0, shuffle_dataset=False,
        # TRL defaults to activation checkpointing; r1jax here keeps activations (remat "none"): like for like.
        gradient_checkpointing=False)
    trainer = trl.GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[length_reward],
                              args=config, train_dataset=data, callbacks=[StepTimer()])
    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    score = trainer._generate_and_score_completions

    def generate_and_score(*args, **kwargs):
        start = time.perf_counter()
        out = score(*args, **kwargs)
        current["generate_and_score"] = current.get("generate_and_score", 0.0) + time.perf_counter() - start
        current["tokens"] = current.get("tokens", 0) + int(out["completion_mask"].sum())
        return out

    trainer._generate_and_score_completions = generate_and_score
    trainer.train()
    return times[1:]


def median(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def table(ours: dict, theirs: dict | None) -> str:
    lines = [f"{'':22}{'r1jax':>10}" + (f"{'TRL':>10}{'TRL / r1jax':>14}" if theirs else "")]
    for key in ("step", "sample", "reward", "reference", "update", "idle"):
        line = f"{key + ' (s)':22}{ours[key]:10.2f}"
        if theirs:
            ratio = theirs[key] / ours[key] if ours[key] > 0 and np.isfinite(theirs[key]) else float("nan")
            line += f"{theirs[key]:10.2f}{ratio:13.2f}x"
        lines.append(line)
    rate = ours["tokens"] / ours["step"]
    line = f"{'tokens/s':22}{rate:10.1f}"
    if theirs:
        line += f"{theirs['tokens'] / theirs['step']:10.1f}{rate / (theirs['tokens'] / theirs['step']):13.2f}x"
    lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r1jax.bench.grpo_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny-qwen2", choices=list(SHAPES))
    parser.add_argument("--microbatches", type=int, default=1, help="gradient accumulation parts of the 64 rows")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for TRL (0: torch's default)")
    parser.add_argument("--scan-layers", action="store_true",
                        help="r1jax's layers as one scan (default: unrolled, as the CPU recipes run them)")
    parser.add_argument("--reward-seconds", type=float, default=0.0,
                        help="the reward sleeps this long per call in both frameworks (a slow verifier)")
    parser.add_argument("--one-step-off", action="store_true", help="r1jax samples the next batch before the update")
    parser.add_argument("--json", default="", help="write the figures here as well")
    parser.add_argument("--worker", choices=("r1jax", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global REWARD_SECONDS
    REWARD_SECONDS = args.reward_seconds

    if args.worker:  # one framework in a process of its own: neither's thread pools linger into the other's timing
        with tempfile.TemporaryDirectory() as tmp:
            if args.worker == "trl":
                rows = run_trl(args.folder, args.steps, args.microbatches, tmp, args.threads)
            else:
                rows = run_r1jax(args.folder, args.steps, args.microbatches, tmp, args.scan_layers, args.one_step_off)
        with open(args.json, "w") as f:
            json.dump(median(rows), f)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        make_folder(folder, args.shape)

        def worker(name: str) -> dict:
            out = os.path.join(tmp, f"{name}.json")
            cmd = [sys.executable, "-m", "r1jax.bench.grpo_step", "--worker", name, "--folder", folder, "--json", out,
                   "--shape", args.shape, "--microbatches", str(args.microbatches), "--steps", str(args.steps),
                   "--threads", str(args.threads), "--reward-seconds", str(args.reward_seconds)]
            cmd += ["--scan-layers"] * args.scan_layers + ["--one-step-off"] * args.one_step_off
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(out) as f:
                return json.load(f)

        theirs = None if args.no_trl else worker("trl")
        ours = worker("r1jax")
    import jax

    print(f"GRPO step on {jax.devices()[0].device_kind}: shape {args.shape}, {PROMPTS} prompts x {GROUP} samples, "
          f"{PROMPT_LEN}-token prompts, up to {NEW_TOKENS} new tokens, {args.microbatches} microbatch(es), fp32, "
          f"median of {args.steps} steps after a warm-up, each framework in its own process"
          + (f", a {args.reward_seconds} s reward" if args.reward_seconds else "")
          + (", r1jax one-step-off" if args.one_step_off else ""))
    print(table(ours, theirs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "microbatches": args.microbatches, "platform": jax.devices()[0].platform,
                       "reward_seconds": args.reward_seconds, "one_step_off": args.one_step_off,
                       "r1jax": ours, "trl": theirs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
