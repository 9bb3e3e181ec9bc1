"""Distillation (DeepSeek-R1, section "distillation"): a strong reasoner's traces, filtered for correctness,
fine-tune a smaller student; no RL on the student. Optionally the student then learns the teacher's
distributions themselves: on the traces (logit distillation) or on its own samples (on-policy distillation).

  teacher          (a measurement) the teacher, evaluated once: `teacher=` (an HF folder, e.g. an r1 run's final
                   policy), or the embedded default's, the `r1_zero` run's final policy (trained first when
                   `teacher_run` holds none)
  student_base     `student=` (an HF folder or a preset with `tokenizer=`), or the embedded default's small base:
                   a fifth of the teacher's parameters, pretrained on the toy corpus with the teacher's tokenizer
  teacher_traces   k samples per prompt from the teacher at R1's settings (temperature 0.6, top-p 0.95); correct,
                   well-formed, unrepeated ones kept (at most n per prompt), as text with the teacher's name and
                   settings (r1jax.distill.teacher_traces)
  student_sft      SFT of the student base on the traces (streamed, packed)
  logit_kd         mode=logit: forward KL to the teacher's next-token distributions on the traces (top-k or full)
  on_policy        mode=on_policy: the student samples, the teacher scores every token, per-token reverse KL
  ablation_rl      (a measurement) the r1_zero recipe on the student base (accuracy + format rewards, GRPO) with
                   about the compute the distillation stages took: the paper's "distillation beats RL" comparison

The final table compares the student at each point with the RL-alone student and the teacher, with each row's
steps and wall time.
"""
import dataclasses
import functools
import hashlib
import json
import os
from typing import Literal

import jax

from r1jax import distill, generate, hf, rejection, sft, toy
from r1jax.data import read_records
from r1jax.evaluate import EvalConfig, Evaluation
from r1jax.metrics import MetricsLogger
from r1jax.rewards import Reward, RewardSet, accuracy_reward, format_reward
from r1jax.rl import RLConfig, grpo_stage
from r1jax.run import Context, Policy, RunConfig, Stage, load_policy, run_stages, stage_seconds
from r1jax.tokenizer import load_tokenizer, r1_zero_prompt
from r1jax.train import OptimConfig
from recipes import _toy_base, r1_zero

Mode = Literal["sft", "logit", "on_policy"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    prompts: str = "toy"  # prompts with gold answers: the teacher's traces, on-policy and the RL ablation
    eval: str = ""  # held-out prompts (empty: the toy's held-out split)
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    on_error: Literal["raise", "skip"] = "raise"


@dataclasses.dataclass(frozen=True)
class StudentBaseConfig:
    """The embedded default's student: pretrained on the toy task's corpus (the teacher's tokenizer), with a
    mix in which step-by-step work is rare, as it is for small base models."""

    model: str = "toy-student"  # preset
    task: toy.ToyTask = toy.ToyTask(mix=(0.03, 0.57, 0.40))
    corpus_size: int = 40000
    cache_dir: str = "runs/cache"
    pretrain: sft.SFTConfig = r1_zero.ToyBaseConfig().pretrain


@dataclasses.dataclass(frozen=True)
class DistillConfig(RunConfig):
    run_dir: str = "runs/distill"
    teacher: str = ""  # an HF folder; empty: the embedded r1_zero run's final policy (teacher_run)
    teacher_run: str = "runs/r1_zero"  # trained with the r1_zero recipe's CPU default when it has no final policy
    student: str = "toy"  # "toy": the embedded student base; else an HF folder, or a preset with tokenizer=
    tokenizer: str = ""
    mode: Mode = "on_policy"  # after trace SFT: nothing more (sft), logit distillation, or on-policy distillation
    on_policy_from: Literal["student_base", "student_sft"] = "student_sft"  # as Qwen3 and others: SFT first
    ablation: bool = True  # also train the student base by RL alone
    data: DataConfig = DataConfig()
    student_base: StudentBaseConfig = StudentBaseConfig()
    traces: distill.TracesConfig = distill.TracesConfig()
    student_sft: sft.SFTConfig = sft.SFTConfig(epochs=2)
    logit_kd: sft.SFTConfig = sft.SFTConfig(epochs=1)
    kd: distill.KDConfig = distill.KDConfig()
    on_policy: RLConfig = RLConfig(kl_coef=0.0, group_size=4)
    ablation_rl: RLConfig = RLConfig()
    eval: EvalConfig = EvalConfig()


def _paper(student: str, lr: float) -> DistillConfig:
    """R1-Distill as published: SFT of the student on ~800k R1 samples (600k reasoning, 200k general), 2-3 epochs,
    batch 64, cosine decay to a tenth, 32k tokens; the learning rate per student is the paper's supplementary
    table's (as we read it). Point teacher= and data.prompts= at real ones (and student= at the student)."""
    sampling = generate.GenerationConfig(samples=4, temperature=0.6, top_p=0.95, max_prompt_len=1024,
                                         max_new_tokens=32768 - 1024, batch_prompts=64)
    return DistillConfig(
        run_dir=f"runs/distill-{student}", teacher="", student=student, mode="sft", ablation=False,
        dtype="bfloat16", remat="full", data=DataConfig(prompts=""),
        traces=distill.TracesConfig(generation=sampling, filter=rejection.RejectionConfig(keep_per_prompt=4)),
        student_sft=sft.SFTConfig(epochs=2, batch_size=64, max_len=32768, checkpoint_every=500,
                                  optim=OptimConfig(lr=lr, warmup_steps=50, schedule="cosine", min_lr_ratio=0.1)),
        eval=EvalConfig(every=0, num_prompts=1024, samples=16, temperature=0.6, top_p=0.95,
                        max_new_tokens=32768 - 1024, batch_prompts=64),
    )


def cpu() -> DistillConfig:
    """The embedded default: the r1_zero run's policy teaches a student a fifth its size, on a laptop CPU."""
    teacher = r1_zero.cpu()
    rl = dataclasses.replace(teacher.rl, checkpoint_every=20)
    return DistillConfig(
        scan_layers=False,
        # One sample per prompt at R1's temperature 0.6 (the teacher is right ~97% of the time), room for the
        # longest worked sums (a completion cut at the limit is never kept).
        traces=distill.TracesConfig(prompts=4096, generation=generate.GenerationConfig(
            samples=1, max_prompt_len=64, max_new_tokens=72, batch_prompts=256),
            filter=rejection.RejectionConfig(keep_per_prompt=1, max_tokens=72)),
        student_sft=sft.SFTConfig(epochs=2, batch_size=32, max_len=128, log_every=20, checkpoint_every=100,
                                  optim=OptimConfig(lr=3e-3, warmup_steps=5, schedule="cosine", b2=0.98)),
        logit_kd=sft.SFTConfig(epochs=1, batch_size=32, max_len=128, log_every=20, checkpoint_every=100,
                               optim=OptimConfig(lr=1e-3, warmup_steps=5, schedule="cosine", b2=0.98)),
        # From the SFT student (as Qwen3's and Thinking Machines' recipes): its own mistakes, corrected token by
        # token. 1e-3 undid some of the SFT (99.1% -> 97.8% in a calibration run); a gentler rate refines.
        on_policy=dataclasses.replace(rl, steps=40, group_size=4, minibatches=1, mu=1, kl_coef=0.0,
                                      optim=OptimConfig(lr=3e-4, warmup_steps=5, schedule="cosine", b2=0.98)),
        # The r1_zero recipe's tuned settings on the student, for about the wall time of traces + SFT (1e-3
        # collapsed the student to empty answers in a calibration run; 60 steps at 2e-4 reached 14.7%).
        ablation_rl=dataclasses.replace(rl, steps=200, checkpoint_every=50),
        eval=dataclasses.replace(teacher.eval, every=1000),
    )


PRESETS = {
    "cpu": cpu,
    "paper-qwen-1.5b": lambda: _paper("Qwen2.5-Math-1.5B", 1e-4),
    "paper-qwen-7b": lambda: _paper("Qwen2.5-Math-7B", 8e-5),
    "paper-qwen-14b": lambda: _paper("Qwen2.5-14B", 7e-5),
    "paper-qwen-32b": lambda: _paper("Qwen2.5-32B", 6e-5),
    "paper-llama-8b": lambda: _paper("Llama-3.1-8B", 5e-5),
    "paper-llama-70b": lambda: _paper("Llama-3.3-70B-Instruct", 2e-5),
}


# --- data, rewards, evaluation ----------------------------------------------------------------------------------

def _teacher_cfg(cfg: DistillConfig) -> r1_zero.R1ZeroConfig:
    """The embedded teacher's recipe settings: r1_zero's CPU default in `teacher_run`."""
    return dataclasses.replace(r1_zero.cpu(), run_dir=cfg.teacher_run, seed=cfg.seed, mesh=cfg.mesh)


@functools.lru_cache(maxsize=4)
def _toy_splits(cfg: DistillConfig) -> tuple[list[dict], list[dict]]:
    """The teacher's task splits, made once per config (every stage and evaluation reads them)."""
    return r1_zero.toy_splits(_teacher_cfg(cfg))


def _records(cfg: DistillConfig, which: Literal["prompts", "eval"]) -> list[dict]:
    path = getattr(cfg.data, which)
    if path == "toy" or (which == "eval" and not path and cfg.student == "toy"):
        train, held_out = _toy_splits(cfg)
        return train if which == "prompts" else held_out
    if not path:
        return []
    return read_records(path, prompt_field=cfg.data.prompt_field, answer_field=cfg.data.answer_field,
                        on_error=cfg.data.on_error)


def _rewards() -> RewardSet:
    return RewardSet([Reward("accuracy", accuracy_reward, 1.0), Reward("format", format_reward, 1.0)])


def _max_prompt_len(cfg: DistillConfig) -> int:
    return cfg.traces.generation.max_prompt_len


def evaluation(cfg: DistillConfig) -> Evaluation:
    """The held-out split (`data.eval`, or the toy's): what `python -m r1jax eval --recipe distill` measures."""
    return Evaluation(cfg.eval, _records(cfg, "eval")[: cfg.eval.num_prompts], r1_zero_prompt, _max_prompt_len(cfg))


def _stage_evaluation(cfg: DistillConfig) -> Evaluation | None:
    evaluate = evaluation(cfg)
    return evaluate if evaluate.enabled else None


# --- stages -----------------------------------------------------------------------------------------------------

def _teacher_dir(cfg: DistillConfig) -> str:
    return cfg.teacher or os.path.join(cfg.teacher_run, "grpo", "final")


def _train_teacher(ctx: Context, cfg: DistillConfig) -> None:
    """Run (or resume) the r1_zero recipe in its own run dir, with its own metrics."""
    tcfg = _teacher_cfg(cfg)
    print(f"[r1jax] teacher: no final policy in {tcfg.run_dir}; training it with the r1_zero recipe there")
    os.makedirs(tcfg.run_dir, exist_ok=True)
    sub = dataclasses.replace(ctx, run_dir=tcfg.run_dir, model_overrides=tcfg.model_overrides(),
                              logger=MetricsLogger(tcfg.run_dir, enabled=jax.process_index() == 0))
    try:
        run_stages(sub, r1_zero.stages(tcfg))
    finally:
        sub.logger.close()


def load_teacher(ctx: Context, cfg: DistillConfig) -> Policy:
    return load_policy(_teacher_dir(cfg), ctx)


def teacher(ctx: Context, _: None, *, cfg: DistillConfig) -> None:
    if not cfg.teacher and not os.path.exists(os.path.join(_teacher_dir(cfg), "config.json")):
        _train_teacher(ctx, cfg)
    policy = load_teacher(ctx, cfg)
    evaluate = evaluation(cfg)
    if evaluate.enabled and 0 not in ctx.evaluated_steps("teacher"):
        evaluate(ctx, policy.model, policy.tokenizer, "teacher", 0)
    return None


def _tokenizer_key(path: str) -> str:
    """What the student's cached base depends on in the teacher: its tokenizer files."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.startswith("tokenizer") or name.endswith(".model"):
            with open(os.path.join(path, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()[:12]


def student_base(ctx: Context, _: None, *, cfg: DistillConfig) -> Policy:
    if cfg.student != "toy":
        return load_policy(cfg.student, ctx, cfg.tokenizer)
    sb, tdir = cfg.student_base, _teacher_dir(cfg)
    with open(os.path.join(tdir, "config.json")) as f:
        teacher_cfg = hf.config_from_hf(json.load(f))
    problems = _records(cfg, "prompts")[: sb.corpus_size]
    key = _toy_base.cache_key(sb, cfg.seed, "distill-student", _tokenizer_key(tdir))
    return _toy_base.pretrain(ctx, name="student_base", cache=os.path.join(sb.cache_dir, f"student_base-{key}"),
                              corpus=toy.base_corpus(sb.task, problems, seed=cfg.seed + 1), preset=sb.model,
                              vocab_size=teacher_cfg.vocab_size, cfg=sb.pretrain, seed=cfg.seed,
                              tokenizer=load_tokenizer(tdir))


def teacher_traces(ctx: Context, _: Policy, *, cfg: DistillConfig) -> None:
    """Writes run_dir/teacher_traces/traces.jsonl and stats.json; the student passes through unchanged."""
    name = cfg.teacher or f"r1_zero:{os.path.abspath(cfg.teacher_run)}"
    distill.teacher_traces(ctx, load_teacher(ctx, cfg), _records(cfg, "prompts"), name="teacher_traces",
                           cfg=cfg.traces, render=r1_zero_prompt, rewards=_rewards(), teacher_name=name)
    return None


def _traces_path(ctx: Context) -> str:
    return os.path.join(ctx.stage_dir("teacher_traces"), distill.TRACES_FILE)


def student_sft(ctx: Context, student: Policy, *, cfg: DistillConfig) -> Policy:
    return sft.sft_stage(ctx, student, _traces_path(ctx), cfg.student_sft, name="student_sft", seed=cfg.seed + 7,
                         evaluation=_stage_evaluation(cfg), evaluate_start=True)


def logit_kd(ctx: Context, student: Policy, *, cfg: DistillConfig) -> Policy:
    teacher = load_teacher(ctx, cfg)
    distill.check_same_vocab(student, teacher)
    step = distill.logit_kd_update(teacher.model, cfg.kd, cfg.logit_kd.microbatches)
    return sft.sft_stage(ctx, student, _traces_path(ctx), cfg.logit_kd, name="logit_kd", seed=cfg.seed + 8,
                         evaluation=_stage_evaluation(cfg), step_fn=step)


def on_policy(ctx: Context, student: Policy, *, cfg: DistillConfig) -> Policy:
    teacher = load_teacher(ctx, cfg)
    distill.check_same_vocab(student, teacher)
    rl = cfg.on_policy
    hp = distill.OnPolicyHyper(kd=cfg.kd, minibatches=rl.minibatches, microbatches=rl.microbatches,
                               prompt_share=rl.prompt_share(ctx.mesh, rl.minibatches * rl.microbatches))
    return grpo_stage(ctx, student, name="on_policy", cfg=rl, train_records=_records(cfg, "prompts"),
                      rewards=_rewards(), render=r1_zero_prompt, evaluation=evaluation(cfg),
                      evaluate_start=False,  # student_sft evaluated the student base at its step 0
                      update=distill.on_policy_update(teacher.model, hp))


def ablation_rl(ctx: Context, student: Policy, *, cfg: DistillConfig) -> Policy:
    return grpo_stage(ctx, student, name="ablation_rl", cfg=cfg.ablation_rl, train_records=_records(cfg, "prompts"),
                      rewards=_rewards(), render=r1_zero_prompt, evaluation=evaluation(cfg), evaluate_start=False)


def stages(cfg: DistillConfig) -> list[Stage]:
    if cfg.student != "toy" and (not cfg.teacher or not cfg.data.prompts or cfg.data.prompts == "toy"):
        raise SystemExit("set teacher=<HF folder>, student=<HF folder> and data.prompts=<.jsonl/.parquet> "
                         "(and data.eval=... to evaluate)")
    keep = cfg.student == "toy"  # an HF student is loaded again when needed, never copied
    out = [Stage("teacher", functools.partial(teacher, cfg=cfg), start_from=None),
           Stage("student_base", functools.partial(student_base, cfg=cfg), start_from=None, keep=keep),
           Stage("teacher_traces", functools.partial(teacher_traces, cfg=cfg), start_from="student_base"),
           Stage("student_sft", functools.partial(student_sft, cfg=cfg), start_from="student_base")]
    if cfg.mode == "logit":
        out.append(Stage("logit_kd", functools.partial(logit_kd, cfg=cfg), start_from="student_sft"))
    elif cfg.mode == "on_policy":
        out.append(Stage("on_policy", functools.partial(on_policy, cfg=cfg), start_from=cfg.on_policy_from))
    elif cfg.mode != "sft":
        raise SystemExit(f"mode={cfg.mode!r}: choose sft, logit or on_policy")
    if cfg.ablation:
        out.append(Stage("ablation_rl", functools.partial(ablation_rl, cfg=cfg), start_from="student_base"))
    return out


# --- the table --------------------------------------------------------------------------------------------------

_ROWS = (("student base", "student_sft", "first"), ("student, RL alone", "ablation_rl", "last"),
         ("student, trace SFT", "student_sft", "last"), ("student, logit distillation", "logit_kd", "last"),
         ("student, on-policy distillation", "on_policy", "last"), ("teacher", "teacher", "last"))


def _row_seconds(cfg: DistillConfig, stage: str, seconds: dict) -> float | None:
    """The wall time that made a row: its stage and the stages it builds on after the student base."""
    chain = {"student_sft": ["teacher_traces", "student_sft"], "ablation_rl": ["ablation_rl"],
             "logit_kd": ["teacher_traces", "student_sft", "logit_kd"],
             "on_policy": ["on_policy"] + (["teacher_traces", "student_sft"] if cfg.on_policy_from == "student_sft"
                                           else [])}.get(stage)
    if stage == "teacher":
        teacher = stage_seconds(cfg.teacher_run) if not cfg.teacher else {}
        return sum(teacher.values()) if teacher else None
    if chain is None or not all(s in seconds for s in chain):
        return None
    return sum(seconds[s] for s in chain)


def table(cfg: DistillConfig, evals: list[dict], seconds: dict) -> str:
    """One row per point the issue compares: student base, RL alone, trace SFT, logit / on-policy distillation,
    teacher; pass@1, maj@k, format, mean length, the row's optimizer steps and wall time."""
    evals = [r for r in evals if "eval_accuracy" in r]
    maj = next((k for r in evals for k in r if k.startswith("eval_maj") and k.endswith("_accuracy")), None)
    head = ["", "pass@1", f"maj@{maj.removeprefix('eval_maj').removesuffix('_accuracy')}" if maj else "maj@k",
            "format", "mean length", "steps", "wall time"]
    lines = [head]
    for label, stage, which in _ROWS:
        mine = [r for r in evals if r.get("stage") == stage]
        if not mine or (which == "last" and stage == "student_sft" and len(mine) < 2):
            continue
        r = mine[0] if which == "first" else mine[-1]
        secs = _row_seconds(cfg, stage, seconds) if which == "last" else seconds.get("student_base")
        lines.append([label, f"{r['eval_accuracy']:.1%}", f"{r[maj]:.1%}" if maj in r else "-",
                      f"{r['eval_format_rate']:.1%}", f"{r['eval_completion_len_mean']:.1f}",
                      str(r["step"]) if stage != "teacher" else "-",
                      "-" if secs is None else f"{secs / 60:.1f} min"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     .rstrip() for row in lines)
