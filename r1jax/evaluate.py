"""Held-out evaluation as R1 reports it: pass@1 averaged over k samples, and maj@k.

Shapes: P prompts, k samples each (B = P*k rows, prompt-major).
"""
import collections
import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from r1jax import rollout, sampler
from r1jax.rewards import R1_TAGS, Reward, RewardSet, accuracy_reward, final_answer, format_reward
from r1jax.sharding import host_array
from r1jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 25  # RL steps between evaluations (and one before, one after training); 0: none
    num_prompts: int = 256
    samples: int = 4  # k
    temperature: float = 0.6  # R1's evaluation settings
    top_p: float = 0.95
    max_new_tokens: int = 1024
    batch_prompts: int = 64  # prompts per generate call

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
                               top_k=0, min_p=0.0, greedy=False, max_new_tokens=cfg.max_new_tokens)
    records, prompts, too_long = rollout.encode_prompts(records, render, tokenizer, scfg.max_prompt_len)
    if not records:
        raise ValueError(f"no evaluation prompt fits max_prompt_len={scfg.max_prompt_len} ({too_long} too long)")
    correct, formatted, lengths, majority, samples = [], [], [], [], []
    for start in range(0, len(records), cfg.batch_prompts):
        if poll is not None:
            poll()
        batch = records[start : start + cfg.batch_prompts]
        out = sampler.generate(model, prompts[start : start + cfg.batch_prompts], jax.random.fold_in(key, start),
                               scfg, poll=poll)
        tokens, mask = host_array(out.tokens_BxT), host_array(out.mask_BxT)
        texts = tokenizer.decode_batch([t[m] for t, m in zip(tokens, mask)])
        examples = [r for r in batch for _ in range(cfg.samples)]
        scored = rollout.score(rewards, texts, examples)
        acc, fmt = scored.scores["accuracy"], scored.scores["format"]
        correct.append(acc)
        formatted.append(fmt)
        lengths.append(mask.sum(axis=1))
        answers = [final_answer(t, R1_TAGS) for t in texts]
        for p in range(len(batch)):
            sl = slice(p * cfg.samples, (p + 1) * cfg.samples)
            majority.append(majority_correct(answers[sl], acc[sl]))
        if start == 0:
            samples = [{"prompt": batch[i // cfg.samples]["prompt"], "completion": texts[i],
                        "accuracy": float(acc[i])} for i in range(0, min(len(texts), 4 * cfg.samples), cfg.samples)]
    correct, formatted, lengths = map(np.concatenate, (correct, formatted, lengths))
    metrics = {
        "eval_accuracy": float(correct.mean()),
        f"eval_maj{cfg.samples}_accuracy": float(np.mean(majority)),
        "eval_format_rate": float(formatted.mean()),
        "eval_completion_len_mean": float(lengths.mean()),
        "eval_prompts": len(records),
        "eval_prompts_too_long": too_long,
    }
    return metrics, samples
