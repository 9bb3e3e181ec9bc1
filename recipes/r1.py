"""DeepSeek-R1: four chained stages after the base model, each resumable, each keeping its output.

  cold_start          SFT of the base on readable long-CoT examples
  reasoning_rl        GRPO, accuracy + format + language-consistency rewards
  ablation_r1_zero    (a measurement) GRPO from the base with accuracy + format only: R1-Zero, same steps
  rejection_sampling  k samples per reasoning prompt from reasoning_rl's policy; keep correct, well-formed,
                      single-language, not over-long, not duplicated, at most n per prompt; mix with general SFT data
  reward_model        (embedded default only) Bradley-Terry reward models from preference pairs
  sft_from_base       SFT of the *base* on that dataset
  all_scenario_rl     GRPO on reasoning prompts (rule rewards) and general prompts (reward models, switched
                      on for the last N steps), temperature 0.7

The embedded default (`toy_base` first) is r1jax.toy_r1's task: sums whose worked steps the base writes in
English, Chinese or a mix of both, and short general requests whose replies a reward model judges.
"""
import dataclasses
import functools
import os
from typing import Literal

from r1jax import generate, rejection, sft, toy_r1
from r1jax.data import read_records
from r1jax.evaluate import EvalConfig, Evaluation
from r1jax.rewards import (Reward, RewardSet, accuracy_reward, format_reward,
                           make_language_consistency_reward)
from r1jax.reward_model import as_reward, load_scorer
from r1jax.reward_model_stage import RMConfig, reward_model_stage
from r1jax.rl import RLConfig, grpo_stage
from r1jax.rewards.language import LANGUAGES
from r1jax.run import Context, Policy, RunConfig, Stage, load_policy
from r1jax.sft_data import RecordSource, list_files
from r1jax.tokenizer import r1_zero_prompt
from r1jax.train import OptimConfig
from recipes import _toy_base

REASONING = ("arith", "math", "gsm8k", "countdown", "code")  # tasks the rule rewards verify


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """"toy": the built-in task's; else files (JSONL/Parquet, or folders of them)."""

    cold_start: str = "toy"  # SFT records: {"messages": [...]} chats or {"prompt", "completion"} pairs
    reasoning: str = "toy"  # prompts with gold answers (and a "task"): reasoning RL, rejection sampling
    general: str = "toy"  # non-reasoning SFT records, mixed in at rejection sampling
    general_prompts: str = "toy"  # prompts the reward models judge in all_scenario_rl (task "general")
    eval: str = ""  # held-out reasoning prompts (empty: the toy's held-out split)
    general_eval: str = ""  # held-out general prompts (empty: the toy's)
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    on_error: Literal["raise", "skip"] = "raise"


@dataclasses.dataclass(frozen=True)
class ToyBaseConfig:
    task: toy_r1.R1ToyTask = toy_r1.R1ToyTask()
    model: str = "toy"
    corpus_size: int = 40000  # reasoning problems in the base corpus (general requests are added)
    general_size: int = 300  # general requests for training (of the task's 384); the rest can be held out
    general_eval_size: int = 64
    vocab_size: int = 1024  # 512 leaves English number words split into bytes (longer than Chinese)
    cache_dir: str = "runs/cache"
    # Packed rows of 128 tokens hold ~1.6 examples (~50 per step): 450 steps (~23k examples) take half the time
    # of 1000 unpacked batches of 32 and gave a better base (R1-Zero task, step-0 pass@1 39.9% against 29.4%).
    pretrain: sft.SFTConfig = sft.SFTConfig(
        steps=450, batch_size=32, max_len=128, log_every=50, checkpoint_every=150,
        optim=OptimConfig(lr=3e-3, warmup_steps=30, schedule="cosine", weight_decay=0.01, b2=0.98))
    cold_start_size: int = 2000
    pairs: int = 1200  # preference pairs for each toy reward model (the general requests, repeated)


@dataclasses.dataclass(frozen=True)
class RewardModelsConfig:
    helpful: str = ""  # HF *ForSequenceClassification folder; empty with model=toy: trained by `reward_model`
    harmless: str = ""  # likewise; empty otherwise: no harmlessness reward
    train: RMConfig = RMConfig()
    batch_size: int = 64  # scoring batch
    max_len: int = 512
    last_steps: int = 400  # the reward models are on for the last N steps of all_scenario_rl (R1: 400)
    general_share: float = 0.5  # share of general prompts among all_scenario_rl's prompts


@dataclasses.dataclass(frozen=True)
class RejectionStageConfig:
    prompts: int = 0  # reasoning prompts to sample from (0: all)
    generation: generate.GenerationConfig = generate.GenerationConfig()
    filter: rejection.RejectionConfig = rejection.RejectionConfig()
    general_records: int = 0  # general SFT records mixed in (0: all)


@dataclasses.dataclass(frozen=True)
class R1Config(RunConfig):
    run_dir: str = "runs/r1"
    model: str = "toy"  # "toy": pretrain the built-in base; else an HF folder (or a preset + tokenizer)
    tokenizer: str = ""
    languages: tuple[str, ...] = LANGUAGES  # what the language-consistency reward tells apart
    language_weight: float = 1.0  # R1 sums accuracy and language consistency
    ablation: bool = True  # also run R1-Zero from the base (no cold start, no language reward)
    data: DataConfig = DataConfig()
    base: ToyBaseConfig = ToyBaseConfig()
    cold_start: sft.SFTConfig = sft.SFTConfig()
    reasoning_rl: RLConfig = RLConfig()
    rejection: RejectionStageConfig = RejectionStageConfig()
    sft_from_base: sft.SFTConfig = sft.SFTConfig(epochs=2)
    all_scenario_rl: RLConfig = RLConfig(temperature=0.7)
    reward_models: RewardModelsConfig = RewardModelsConfig()
    eval: EvalConfig = EvalConfig()


def paper() -> R1Config:
    """DeepSeek-R1's published settings where the paper gives them (point model= and data.* at real ones)."""
    rl = RLConfig(steps=8000, prompts_per_step=32, group_size=16, optim=OptimConfig(lr=3e-6), kl_coef=0.001,
                  clip_low=10.0, clip_high=10.0, temperature=1.0, ref_reset_every=400, max_prompt_len=1024,
                  max_new_tokens=32768 - 1024, checkpoint_every=50)
    return R1Config(
        run_dir="runs/r1-paper", model="", dtype="bfloat16", remat="full", ablation=False,
        data=DataConfig(cold_start="", reasoning="", general="", general_prompts="", eval="", general_eval=""),
        cold_start=sft.SFTConfig(epochs=2, batch_size=128, max_len=32768, optim=OptimConfig(lr=5e-5)),
        reasoning_rl=rl,
        rejection=RejectionStageConfig(generation=generate.GenerationConfig(
            samples=16, temperature=0.6, top_p=0.95, max_prompt_len=1024, max_new_tokens=32768 - 1024,
            batch_prompts=64), filter=rejection.RejectionConfig(keep_per_prompt=4)),
        sft_from_base=sft.SFTConfig(epochs=2, batch_size=128, max_len=32768, optim=OptimConfig(lr=5e-5)),
        all_scenario_rl=dataclasses.replace(rl, steps=1700, temperature=0.7),
        reward_models=RewardModelsConfig(last_steps=400, max_len=4096),
        eval=EvalConfig(every=100, num_prompts=1024, samples=16, temperature=0.6, top_p=0.95,
                        max_new_tokens=32768 - 1024, batch_prompts=64),
    )


def cpu() -> R1Config:
    """The embedded default: the whole pipeline on the built-in task, on a laptop CPU."""
    rl = RLConfig(steps=40, prompts_per_step=8, group_size=8, minibatches=2,
                  optim=OptimConfig(lr=2e-4, warmup_steps=5, schedule="cosine", b2=0.98), kl_coef=0.0,
                  clip_low=0.2, clip_high=0.28, max_prompt_len=64, max_new_tokens=72, checkpoint_every=10,
                  log_samples_every=10)
    return R1Config(
        scan_layers=False,  # the toy's 4 layers unrolled: XLA's CPU backend runs them faster
        languages=("english", "chinese"),
        cold_start=sft.SFTConfig(steps=60, batch_size=32, max_len=128, log_every=20, checkpoint_every=60,
                                 optim=OptimConfig(lr=1e-3, warmup_steps=5, schedule="cosine", b2=0.98)),
        reasoning_rl=rl,
        rejection=RejectionStageConfig(prompts=256, generation=generate.GenerationConfig(
            samples=4, temperature=1.0, max_prompt_len=64, max_new_tokens=72, batch_prompts=128),
            filter=rejection.RejectionConfig(keep_per_prompt=2, max_tokens=72)),
        sft_from_base=sft.SFTConfig(epochs=3, batch_size=32, max_len=128, log_every=20, checkpoint_every=100,
                                    optim=OptimConfig(lr=1e-3, warmup_steps=5, schedule="cosine", b2=0.98)),
        # A lower learning rate than reasoning_rl's: the reward models' clear preferences otherwise pull the
        # shared weights away from the sums (accuracy fell from 72% to 49% at 2e-4).
        all_scenario_rl=dataclasses.replace(rl, steps=30, temperature=0.7,
                                            optim=dataclasses.replace(rl.optim, lr=1e-4)),
        reward_models=RewardModelsConfig(
            train=RMConfig(steps=30, batch_size=32, max_len=96, eval_pairs=200, log_every=10,
                           optim=OptimConfig(lr=1e-3, warmup_steps=5, schedule="cosine")),
            batch_size=128, max_len=96, last_steps=20),
        eval=EvalConfig(every=1000, num_prompts=128, samples=4, max_new_tokens=72, batch_prompts=128),
    )


PRESETS = {"cpu": cpu, "paper": paper}


# --- data -------------------------------------------------------------------------------------------------------

def _read(path: str, data: DataConfig) -> list[dict]:
    return read_records(path, prompt_field=data.prompt_field, answer_field=data.answer_field, on_error=data.on_error)


@functools.lru_cache(maxsize=4)
def _toy(cfg: R1Config) -> dict:
    """The built-in task's splits (deterministic from the seed)."""
    task, base = cfg.base.task, cfg.base
    reasoning = toy_r1.problems(task, base.corpus_size, seed=cfg.seed)
    held_out = toy_r1.problems(task, cfg.eval.num_prompts, seed=cfg.seed + 10_000,
                               exclude=frozenset(p["prompt"] for p in reasoning))
    general = toy_r1.general_prompts(base.general_size, seed=cfg.seed + 1)
    general_eval = toy_r1.general_prompts(base.general_eval_size, seed=cfg.seed + 10_001,
                                          exclude=frozenset(p["prompt"] for p in general))
    return {"reasoning": reasoning, "eval": held_out, "general": general, "general_eval": general_eval}


def _records(cfg: R1Config, which: str) -> list[dict]:
    path = getattr(cfg.data, which)
    if path == "toy" or (not path and cfg.model == "toy" and which in ("eval", "general_eval")):
        return _toy(cfg)[which if which != "general_prompts" else "general"]
    if not path:
        return []
    records = _read(path, cfg.data)
    if which in ("general_prompts", "general_eval"):
        records = [{**r, "task": r.get("task") or "general"} for r in records]
    return records


# --- rewards and evaluation -------------------------------------------------------------------------------------

def _rule_rewards(cfg: R1Config, *, language: bool, tasks=None) -> list[Reward]:
    out = [Reward("accuracy", accuracy_reward, 1.0, tasks=tasks), Reward("format", format_reward, 1.0)]
    if language:
        out.append(Reward("language", make_language_consistency_reward(languages=cfg.languages),
                          cfg.language_weight, tasks=tasks))
    return out


def _reward_model_paths(cfg: R1Config, ctx: Context) -> dict[str, str]:
    rm = cfg.reward_models
    trained = cfg.model == "toy"
    paths = {"helpful": rm.helpful or (ctx.final_dir("reward_model/helpful") if trained else ""),
             "harmless": rm.harmless or (ctx.final_dir("reward_model/harmless") if trained else "")}
    return {k: v for k, v in paths.items() if v}


def _model_rewards(cfg: R1Config, ctx: Context, *, schedule=()) -> list[Reward]:
    """Helpfulness judges the final answer only, harmlessness the whole response (R1); general prompts only."""
    rm = cfg.reward_models
    out = []
    for name, path in _reward_model_paths(cfg, ctx).items():
        scorer = load_scorer(path, ctx.mesh, batch_size=rm.batch_size, max_len=rm.max_len)
        view = "answer" if name == "helpful" else "full"
        out.append(Reward(name, as_reward(scorer, view), 1.0, tasks=("general",), schedule=schedule,
                          collective=True))
    return out


def _evaluation(cfg: R1Config, ctx: Context | None = None, *, reward_models: bool = False) -> Evaluation:
    general, general_rewards = [], None
    if reward_models and ctx is not None:
        general = _records(cfg, "general_eval")[: cfg.eval.num_prompts]
        models = _model_rewards(cfg, ctx)
        general_rewards = RewardSet(models[:1]) if models else None  # the helpfulness score
    return Evaluation(cfg.eval, _records(cfg, "eval")[: cfg.eval.num_prompts], r1_zero_prompt,
                      cfg.reasoning_rl.max_prompt_len, rewards=RewardSet(_rule_rewards(cfg, language=True)),
                      general=general, general_rewards=general_rewards)


def evaluation(cfg: R1Config) -> Evaluation:
    """What `python -m r1jax eval --recipe r1` measures: the reasoning split (no reward models)."""
    return _evaluation(cfg)


# --- stages -----------------------------------------------------------------------------------------------------

def toy_base(ctx: Context, _: Policy | None, *, cfg: R1Config) -> Policy:
    toy = _toy(cfg)
    corpus = toy_r1.base_corpus(cfg.base.task, toy["reasoning"], toy["general"], seed=cfg.seed + 1)
    key = _toy_base.cache_key(cfg.base, cfg.seed, "r1")
    return _toy_base.pretrain(ctx, name="toy_base", cache=os.path.join(cfg.base.cache_dir, f"r1_base-{key}"),
                              corpus=corpus, preset=cfg.base.model, vocab_size=cfg.base.vocab_size,
                              cfg=cfg.base.pretrain, seed=cfg.seed, chat_template=toy_r1.CHAT_TEMPLATE)


def cold_start(ctx: Context, policy: Policy, *, cfg: R1Config) -> Policy:
    if cfg.data.cold_start == "toy":
        data = toy_r1.cold_start_records(_toy(cfg)["reasoning"][: cfg.base.cold_start_size], seed=cfg.seed + 2)
    else:
        data = list_files(cfg.data.cold_start)
    return sft.sft_stage(ctx, policy, data, cfg.cold_start, name="cold_start", seed=cfg.seed,
                         evaluation=_evaluation(cfg), evaluate_start=True)


def reasoning_rl(ctx: Context, policy: Policy, *, cfg: R1Config, name="reasoning_rl", language=True) -> Policy:
    return grpo_stage(ctx, policy, name=name, cfg=cfg.reasoning_rl, train_records=_records(cfg, "reasoning"),
                      rewards=RewardSet(_rule_rewards(cfg, language=language)), render=r1_zero_prompt,
                      evaluation=_evaluation(cfg), evaluate_start=False)  # cold_start's last evaluation is step 0


def rejection_sampling(ctx: Context, policy: Policy, *, cfg: R1Config) -> None:
    """Writes run_dir/rejection_sampling/sft.jsonl and stats.json; the policy passes through unchanged."""
    rs = cfg.rejection
    prompts = _records(cfg, "reasoning")
    prompts = prompts[-rs.prompts:] if rs.prompts else prompts  # the end of the list: least seen in RL
    result = generate.generate_samples(ctx, policy, prompts, name="rejection_sampling", cfg=rs.generation,
                                       render=r1_zero_prompt, rewards=RewardSet(_rule_rewards(cfg, language=True)))
    kept, stats = rejection.select(result.samples, rs.filter)
    if cfg.data.general == "toy":
        general = toy_r1.general_sft_records(_toy(cfg)["general"], seed=cfg.seed + 3)
    else:  # read one record at a time while the dataset is written
        general = RecordSource(cfg.data.general)
    stage_dir = ctx.stage_dir("rejection_sampling")
    counts = rejection.write_dataset(os.path.join(stage_dir, "sft.jsonl"), kept, general, seed=cfg.seed,
                                     general_limit=rs.general_records)
    rejection.write_stats(os.path.join(stage_dir, "stats.json"), {**stats, "dataset": counts})
    print(f"[r1jax] rejection_sampling: kept {stats['total']['kept']} of {stats['total']['samples']} samples; "
          f"dataset by task {counts}\n{rejection.describe(stats)}")
    return None


def reward_model(ctx: Context, base: Policy, *, cfg: R1Config) -> None:
    """The embedded default's reward models, from the base's weights: helpfulness on answers (warm beats curt
    or rude), harmlessness on whole responses (anything beats rude)."""
    toy = _toy(cfg)["general"]
    general = (toy * -(-cfg.base.pairs // len(toy)))[: cfg.base.pairs]
    for name, view, data in (("helpful", "answer", toy_r1.preference_pairs(general, seed=cfg.seed + 4)),
                             ("harmless", "full", toy_r1.harmless_pairs(general, seed=cfg.seed + 5))):
        if not os.path.exists(os.path.join(ctx.final_dir(f"reward_model/{name}"), "config.json")):
            reward_model_stage(ctx, base, data, cfg.reward_models.train, name=f"reward_model/{name}", view=view)
    return None


def sft_from_base(ctx: Context, base: Policy, *, cfg: R1Config) -> Policy:
    data = os.path.join(ctx.stage_dir("rejection_sampling"), "sft.jsonl")
    return sft.sft_stage(ctx, base, data, cfg.sft_from_base, name="sft_from_base", seed=cfg.seed + 5,
                         evaluation=_evaluation(cfg, ctx, reward_models=True))


def all_scenario_rl(ctx: Context, policy: Policy, *, cfg: R1Config) -> Policy:
    rl = cfg.all_scenario_rl
    on_from = max(rl.steps - cfg.reward_models.last_steps, 0)
    schedule = ((0, 0.0), (on_from, 1.0)) if on_from else ()
    rewards = RewardSet(_rule_rewards(cfg, language=True, tasks=REASONING) + _model_rewards(cfg, ctx, schedule=schedule))
    records = _mix(_records(cfg, "reasoning"), _records(cfg, "general_prompts"), cfg.reward_models.general_share)
    return grpo_stage(ctx, policy, name="all_scenario_rl", cfg=rl, train_records=records, rewards=rewards,
                      render=r1_zero_prompt, evaluation=_evaluation(cfg, ctx, reward_models=True),
                      evaluate_start=False)


def _mix(reasoning: list[dict], general: list[dict], share: float) -> list[dict]:
    """All reasoning prompts, and the general ones repeated until they are `share` of the list."""
    if not general or share <= 0:
        return reasoning
    n = round(len(reasoning) * share / (1 - share))
    return reasoning + (general * -(-n // len(general)))[:n]


def stages(cfg: R1Config) -> list[Stage]:
    if cfg.model == "toy":
        base = Stage("toy_base", functools.partial(toy_base, cfg=cfg), start_from=None)
    else:
        if not cfg.model or not cfg.data.reasoning or not cfg.data.cold_start:
            raise SystemExit("set model=<HF folder>, data.cold_start=..., data.reasoning=... (and data.general, "
                             "data.general_prompts, reward_models.helpful for the last stages)")
        base = Stage("load", lambda ctx, _: load_policy(cfg.model, ctx, cfg.tokenizer), start_from=None, keep=False)
    out = [base,
           Stage("cold_start", functools.partial(cold_start, cfg=cfg)),
           Stage("reasoning_rl", functools.partial(reasoning_rl, cfg=cfg))]
    if cfg.ablation:
        out.append(Stage("ablation_r1_zero", functools.partial(reasoning_rl, cfg=cfg, name="ablation_r1_zero",
                                                               language=False), start_from=base.name))
    out.append(Stage("rejection_sampling", functools.partial(rejection_sampling, cfg=cfg), start_from="reasoning_rl"))
    if cfg.model == "toy":
        out.append(Stage("reward_model", functools.partial(reward_model, cfg=cfg), start_from=base.name))
    out += [Stage("sft_from_base", functools.partial(sft_from_base, cfg=cfg), start_from=base.name),
            Stage("all_scenario_rl", functools.partial(all_scenario_rl, cfg=cfg))]
    return out
