"""R1-Zero: pure RL from a base model with the <think>/<answer> template, accuracy and
format rewards, no SFT.

Stages: `toy_base` (only for the embedded default: pretrain a small base model on the
built-in task's corpus, cached across runs) then `grpo`.
"""
import contextlib
import dataclasses
import functools
import hashlib
import os
import shutil
import sys
from typing import Literal

import jax

from r1jax import config as config_lib
from r1jax import sft, toy
from r1jax.checkpoint import CheckpointError, graceful_sigterm
from r1jax.data import read_records
from r1jax.evaluate import EvalConfig
from r1jax.metrics import before_after_table, plot_run, read_metrics
from r1jax.model import ModelConfig, create_model
from r1jax.rewards import RewardSet, Reward, accuracy_reward, format_reward
from r1jax.rl import RLConfig, grpo_stage
from r1jax.run import (Context, NonFiniteError, Policy, Preempted, load_policy, make_context, run_stages,
                       save_policy)
from r1jax.sharding import MeshConfig
from r1jax.tokenizer import r1_zero_prompt, train_sentencepiece
from r1jax.train import OptimConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: str = "toy"  # "toy" (built-in task) or a .jsonl/.parquet file or folder
    eval: str = ""  # a file; empty: a held-out split of the built-in task
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    on_error: Literal["raise", "skip"] = "raise"  # a bad record: stop naming file and line, or skip and count


@dataclasses.dataclass(frozen=True)
class ToyBaseConfig:
    """The embedded default's base model: built-in task corpus, tokenizer, pretraining."""

    task: toy.ToyTask = toy.ToyTask()
    model: str = "toy"  # preset
    corpus_size: int = 40000
    vocab_size: int = 512
    cache_dir: str = "runs/cache"  # reused across runs with the same settings
    pretrain: sft.SFTConfig = sft.SFTConfig(
        steps=1000, batch_size=32, max_len=128, log_every=100, checkpoint_every=250,
        optim=OptimConfig(lr=3e-3, warmup_steps=30, schedule="cosine", weight_decay=0.01, b2=0.98))


@dataclasses.dataclass(frozen=True)
class R1ZeroConfig:
    run_dir: str = "runs/r1_zero"
    seed: int = 0
    model: str = "toy"  # "toy": pretrain the built-in base; else an HF folder (or a preset + tokenizer)
    tokenizer: str = ""
    param_dtype: str = "float32"
    dtype: str = "auto"
    remat: str = "none"
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    base: ToyBaseConfig = ToyBaseConfig()
    rl: RLConfig = RLConfig()
    eval: EvalConfig = EvalConfig()


def paper() -> R1ZeroConfig:
    """DeepSeek-R1's published full-scale settings (point `model=` and `data=` at real ones)."""
    return R1ZeroConfig(
        run_dir="runs/r1_zero-paper", model="", dtype="bfloat16", remat="full",
        data=DataConfig(train="", eval=""),
        rl=RLConfig(steps=8000, prompts_per_step=32, group_size=16, optim=OptimConfig(lr=3e-6),
                    kl_coef=0.001, clip_low=10.0, clip_high=10.0, temperature=1.0, ref_reset_every=400,
                    max_prompt_len=1024, max_new_tokens=32768 - 1024, checkpoint_every=50),
        eval=EvalConfig(every=100, num_prompts=1024, samples=16, temperature=0.6, top_p=0.95,
                        max_new_tokens=32768 - 1024, batch_prompts=64),
    )


def cpu() -> R1ZeroConfig:
    """The embedded default: learns the built-in task on a laptop CPU in minutes."""
    return R1ZeroConfig(
        rl=RLConfig(steps=60, prompts_per_step=16, group_size=8, mu=1, minibatches=2,
                    optim=OptimConfig(lr=2e-4, warmup_steps=5, schedule="cosine", b2=0.98), kl_coef=0.0,
                    clip_low=0.2, clip_high=0.28, max_prompt_len=64, max_new_tokens=56,
                    checkpoint_every=10, log_samples_every=10, ref_reset_every=400),
        eval=EvalConfig(every=10, num_prompts=256, samples=4, max_new_tokens=56, batch_prompts=128),
    )


PRESETS = {"cpu": cpu, "paper": paper}


def config(preset: str | None, overrides: list[str]) -> R1ZeroConfig:
    if preset is not None and preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    return config_lib.override(PRESETS[preset or "cpu"](), overrides)


def _read(path: str, data: DataConfig) -> list[dict]:
    return read_records(path, prompt_field=data.prompt_field, answer_field=data.answer_field, on_error=data.on_error)


def _toy_splits(cfg: R1ZeroConfig) -> tuple[list[dict], list[dict]]:
    task = cfg.base.task
    train = toy.problems(task, cfg.base.corpus_size, seed=cfg.seed)
    held_out = toy.problems(task, cfg.eval.num_prompts, seed=cfg.seed + 10_000,
                            exclude=frozenset(p["prompt"] for p in train))
    return train, held_out


def base_cache_key(cfg: R1ZeroConfig) -> str:
    """What the cached base model depends on: its settings and the seed, not where the cache lives."""
    what = (dataclasses.replace(cfg.base, cache_dir=""), cfg.seed)
    return hashlib.sha256(repr(what).encode()).hexdigest()[:12]


def toy_base_stage(ctx: Context, policy: Policy | None, *, cfg: R1ZeroConfig, train_problems: list[dict]) -> Policy:
    """Pretrain the small base model on the built-in task's mixed corpus; cached by settings."""
    cache = os.path.join(cfg.base.cache_dir, f"toy_base-{base_cache_key(cfg)}")
    if os.path.exists(os.path.join(cache, "config.json")):
        print(f"[r1jax] toy_base: reusing the cached base model in {cache}")
        return load_policy(cache, ctx)
    corpus = toy.base_corpus(cfg.base.task, train_problems, seed=cfg.seed + 1)
    tokenizer = train_sentencepiece([p + c for p, c in corpus[:5000]], None, cfg.base.vocab_size,
                                    max_piece_length=128, split_by_whitespace=False,
                                    split_by_unicode_script=False)
    mcfg = ModelConfig.preset(cfg.base.model).replace(vocab_size=cfg.base.vocab_size,
                                                      **ctx.model_overrides)
    policy = Policy(mcfg, create_model(mcfg, mesh=ctx.mesh, seed=ctx.seed), tokenizer)
    policy = sft.sft_stage(ctx, policy, corpus, cfg.base.pretrain, name="toy_base", seed=cfg.seed)
    tmp = cache + ".tmp"
    save_policy(policy, tmp)
    if jax.process_index() == 0:
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    return policy


def _rewards() -> RewardSet:
    # R1-Zero: rule-based accuracy and format rewards, equally weighted.
    return RewardSet([Reward("accuracy", accuracy_reward, 1.0), Reward("format", format_reward, 1.0)])


def stages(cfg: R1ZeroConfig) -> list:
    if cfg.model == "toy":
        train_records, eval_records = _toy_splits(cfg)
        pipeline = [("toy_base", functools.partial(toy_base_stage, cfg=cfg, train_problems=train_records))]
    else:
        if not cfg.model or not cfg.data.train:
            raise SystemExit("set model=<HF folder> and data=<.jsonl/.parquet> (data.train=...)")
        train_records = _read(cfg.data.train, cfg.data)
        eval_records = _read(cfg.data.eval, cfg.data) if cfg.data.eval else []
        pipeline = [("load", lambda ctx, _: load_policy(cfg.model, ctx, cfg.tokenizer))]
    eval_records = eval_records[: cfg.eval.num_prompts]
    grpo = functools.partial(grpo_stage, name="grpo", cfg=cfg.rl, eval_cfg=cfg.eval, train_records=train_records,
                             eval_records=eval_records, rewards=_rewards(), render=r1_zero_prompt)
    return pipeline + [("grpo", grpo)]


def train(cfg: R1ZeroConfig, *, stop=None) -> int:
    """Run (or resume) every stage. `stop`: an object whose `stop_everywhere()` says when
    to checkpoint and leave; by default SIGTERM sets it (TPU preemption)."""
    overrides = {"param_dtype": cfg.param_dtype, "dtype": cfg.dtype, "remat": cfg.remat}
    with contextlib.ExitStack() as scope:
        stop = stop if stop is not None else scope.enter_context(graceful_sigterm())
        ctx = make_context(cfg.run_dir, cfg.mesh, cfg.seed, overrides, stop)
        cfg.rl.check_mesh(ctx.mesh)  # before any compute (the base stage included)
        print(f"[r1jax] run dir: {os.path.abspath(cfg.run_dir)}")
        print("[r1jax] resolved config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in config_lib.flatten(cfg).items()))
        if jax.process_index() == 0:
            with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
                f.write(config_lib.to_json(cfg))
        try:
            run_stages(ctx, stages(cfg))
        except Preempted as e:
            print(f"[r1jax] {e}")
            return 0
        except (NonFiniteError, CheckpointError) as e:
            print(f"[r1jax] error: {e}", file=sys.stderr)
            return 1
        finally:
            ctx.logger.close()
    metrics_path = os.path.join(cfg.run_dir, "metrics.jsonl")
    if jax.process_index() == 0:
        plot_run(metrics_path, os.path.join(cfg.run_dir, "reward.png"))
        evals = read_metrics(metrics_path, kind="eval")
        print(before_after_table(evals) if evals else "[r1jax] no evaluations were run (eval.every=0 or no eval data)")
        print(f"[r1jax] final checkpoint: {os.path.abspath(os.path.join(cfg.run_dir, 'grpo', 'final'))}")
        print(f"[r1jax] run dir: {os.path.abspath(cfg.run_dir)}")
    return 0


def evaluate(cfg: R1ZeroConfig) -> int:
    """Evaluate `model=` (an HF folder), or this run's final policy, on the eval split."""
    import json

    from r1jax.evaluate import evaluate as run_eval
    from r1jax.sampler import SamplerConfig

    path = cfg.model if os.path.isdir(cfg.model) else os.path.join(cfg.run_dir, "grpo", "final")
    if not os.path.isdir(path):
        raise SystemExit(f"nothing to evaluate: {path} does not exist (train first, or set model=<HF folder>)")
    overrides = {"param_dtype": cfg.param_dtype, "dtype": cfg.dtype, "remat": cfg.remat}
    with graceful_sigterm() as stop:
        ctx = make_context(cfg.run_dir, cfg.mesh, cfg.seed, overrides, stop)
        policy = load_policy(path, ctx, cfg.tokenizer)
        if cfg.data.eval:
            records = _read(cfg.data.eval, cfg.data)
        else:
            records = _toy_splits(cfg)[1]
        records = records[: cfg.eval.num_prompts]
        scfg = SamplerConfig(max_prompt_len=cfg.rl.max_prompt_len, max_new_tokens=cfg.eval.max_new_tokens,
                             stop_ids=tuple(policy.tokenizer.stop_ids), pad_id=policy.tokenizer.pad_id)
        policy.model.act_sharding = None
        metrics, samples = run_eval(policy.model, records, r1_zero_prompt, policy.tokenizer, cfg.eval, scfg,
                                    jax.random.key(cfg.seed + 1))
        ctx.logger.close()
    print(json.dumps({"model": path, "prompts": len(records), **metrics}, indent=2))
    for s in samples[:2]:
        print(f"--- {s['prompt']!r} -> {s['completion']!r} (accuracy {s['accuracy']})")
    return 0
