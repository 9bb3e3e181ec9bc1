"""Held-out evaluation as R1 reports it: pass@1 averaged over k samples, and maj@k.

Shapes: P prompts, k samples each (B = P*k rows, prompt-major).
"""
import collections
import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from r1jax import rollout, sampler, sharding
from r1jax.rewards import R1_TAGS, Reward, RewardSet, accuracy_reward, final_answer, format_reward
from r1jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 25  # RL steps between evaluations (and one before, one after training); 0: none
    num_prompts: int = 256
    samples: int = 4  # k
    temperature: float = 0.6  # R1's evaluation settings
    top_p: float = 0.95
    max_new_tokens: int = 1024
    batch_prompts: int = 64  # prompts per generate call (lockstep)
    stop_strings: tuple[str, ...] = ()  # completions also end on these texts (e.g. </answer>), kept in them
    # > 0: continuous batching over this many decode slots (r1jax.engine), every prompt in one call; 0: lockstep
    slots: int = 0

    def __post_init__(self):
        for name in ("num_prompts", "samples", "max_new_tokens", "batch_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.every < 0:
            raise ValueError(f"every={self.every} must be >= 0 (0: no evaluation during training)")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (pass@1 over k samples needs sampling)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def majority_correct(answers_k: list[str | None], correct_k: np.ndarray) -> float:
    """maj@k for one prompt: is the most common extracted answer a correct one?"""
    votes = collections.Counter(a.strip() for a in answers_k if a and a.strip())
    if not votes:
        return 0.0
    top = votes.most_common(1)[0][0]
    return float(max(c for a, c in zip(answers_k, correct_k) if a and a.strip() == top))


_EVAL_REWARDS = RewardSet([Reward("accuracy", accuracy_reward), Reward("format", format_reward)])


def evaluate(model, records: list[dict], render, tokenizer: Tokenizer, cfg: EvalConfig,
             sampler_cfg: sampler.SamplerConfig, key: jax.Array, *, rewards: RewardSet | None = None,
             poll: Callable[[], None] | None = None) -> tuple[dict, list[dict]]:
    """Metrics over `records` and a few (prompt, completion, score) samples to read.

    `render(question) -> prompt text` applies the recipe's template. `rewards` must hold an "accuracy" and a
    "format" reward (default: the rule-based ones). Prompts longer than the sampler's max_prompt_len are
    left out and counted (`eval_prompts_too_long`). `poll()` runs between batches and decode segments:
    raise from it to abandon the evaluation (SIGTERM).
    """
    rewards = rewards or _EVAL_REWARDS
    scfg = sampler_cfg.replace(group_size=cfg.samples, temperature=cfg.temperature, top_p=cfg.top_p,
                               top_k=0, min_p=0.0, greedy=False, max_new_tokens=cfg.max_new_tokens,
                               slots=cfg.slots, stop_strings=cfg.stop_strings)
    records, prompts, too_long = rollout.encode_prompts(records, render, tokenizer, scfg.max_prompt_len)
    if not records:
        raise ValueError(f"no evaluation prompt fits max_prompt_len={scfg.max_prompt_len} ({too_long} too long)")
    correct, formatted, lengths, majority, samples = [], [], [], [], []
    extra = {name: [] for name in (r.name for r in rewards.rewards) if name not in ("accuracy", "format")}
    per_call = len(records) if cfg.slots else cfg.batch_prompts  # the engine holds only its slots' rows
    for start in range(0, len(records), per_call):
        if poll is not None:
            poll()
        batch = records[start : start + per_call]
        done = rollout.complete(model, batch, prompts[start : start + per_call],
                                jax.random.fold_in(key, start), scfg, tokenizer, rewards, poll=poll)
        acc, fmt = done.scored.scores["accuracy"], done.scored.scores["format"]
        correct.append(acc)
        formatted.append(fmt)
        for name in extra:
            extra[name].append(done.scored.scores[name])
        lengths.append(done.lengths_B)
        answers = [final_answer(t, R1_TAGS) for t in done.texts]
        for p in range(len(batch)):
            sl = slice(p * cfg.samples, (p + 1) * cfg.samples)
            majority.append(majority_correct(answers[sl], acc[sl]))
        if start == 0:
            samples = [{"prompt": batch[i // cfg.samples]["prompt"], "completion": done.texts[i],
                        "accuracy": float(acc[i])}
                       for i in range(0, min(len(done.texts), 4 * cfg.samples), cfg.samples)]
    correct, formatted, lengths = map(np.concatenate, (correct, formatted, lengths))
    metrics = {
        "eval_accuracy": float(correct.mean()),
        f"eval_maj{cfg.samples}_accuracy": float(np.mean(majority)),
        "eval_format_rate": float(formatted.mean()),
        "eval_completion_len_mean": float(lengths.mean()),
        "eval_prompts": len(records),
        "eval_prompts_too_long": too_long,
    }
    for name, parts in extra.items():  # a recipe's other rewards, e.g. language consistency
        metrics[_EVAL_NAMES.get(name, f"eval_{name}")] = float(np.concatenate(parts).mean())
    return metrics, samples


_EVAL_NAMES = {"language": "eval_language_consistency"}


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What a recipe evaluates its stages on; `evaluation(ctx, model, tokenizer, stage, step)` samples, scores
    and logs one eval record (and a few samples) and returns its metrics.

    `rewards` scores the held-out `records` (accuracy and format, and e.g. "language", logged as
    eval_language_consistency); `general` prompts, when given, get one sample each at the same
    temperature, scored by `general_rewards` (reward models): their mean total is eval_rm_score.
    """

    cfg: EvalConfig
    records: list[dict]
    render: Callable[[str], str]
    max_prompt_len: int
    rewards: RewardSet | None = None
    general: list[dict] = dataclasses.field(default_factory=list)
    general_rewards: RewardSet | None = None

    @property
    def enabled(self) -> bool:
        return self.cfg.every > 0 and len(self.records) > 0

    def __call__(self, ctx, model, tokenizer: Tokenizer, stage: str, step: int) -> dict:
        metrics, samples = self.measure(ctx, model, tokenizer, step)
        ctx.logger.log_eval({"step": step, "stage": stage, **metrics})
        ctx.logger.log_samples(step, stage, [{**s, "kind": "eval"} for s in samples])
        return metrics

    def measure(self, ctx, model, tokenizer: Tokenizer, step: int) -> tuple[dict, list[dict]]:
        model = sharding.for_sampling(model, ctx.mesh)
        scfg = sampler.SamplerConfig(max_prompt_len=self.max_prompt_len, max_new_tokens=self.cfg.max_new_tokens,
                                     stop_ids=tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id)
        key = jax.random.fold_in(jax.random.key(ctx.seed + 1), step)
        metrics, samples = evaluate(model, self.records, self.render, tokenizer, self.cfg, scfg, key,
                                    rewards=self.rewards, poll=ctx.poll)
        if self.general and self.general_rewards is not None:
            metrics["eval_rm_score"], general_samples = self._general_score(model, tokenizer, scfg, key, ctx.poll)
            samples += general_samples
        return metrics, samples

    def _general_score(self, model, tokenizer, scfg, key, poll) -> tuple[float, list[dict]]:
        scfg = scfg.replace(group_size=1, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                            max_new_tokens=self.cfg.max_new_tokens)
        records, prompts, _ = rollout.encode_prompts(self.general, self.render, tokenizer, scfg.max_prompt_len)
        totals, texts = [], []
        for start in range(0, len(records), self.cfg.batch_prompts):
            poll()
            done = rollout.complete(model, records[start : start + self.cfg.batch_prompts],
                                    prompts[start : start + self.cfg.batch_prompts],
                                    jax.random.fold_in(key, 1_000_003 + start), scfg, tokenizer,
                                    self.general_rewards, poll=poll)
            totals.append(done.scored.total_B)
            texts += done.texts
        totals_B = np.concatenate(totals)
        samples = [{"prompt": records[i]["prompt"], "completion": texts[i], "reward": float(totals_B[i])}
                   for i in range(min(2, len(texts)))]
        return float(totals_B.mean()), samples
