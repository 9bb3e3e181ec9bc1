"""Held-out evaluation as R1 reports it: pass@1 averaged over k samples, and maj@k.

Shapes: P prompts, k samples each (B = P*k rows, prompt-major).
"""
import collections
import dataclasses

import jax
import numpy as np

from r1jax import sampler
from r1jax.sharding import host_array
from r1jax.rewards import R1_TAGS, accuracy_reward, final_answer, format_reward
from r1jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 25  # RL steps between evaluations (and one before any training)
    num_prompts: int = 256
    samples: int = 4  # k
    temperature: float = 0.6  # R1's evaluation settings
    top_p: float = 0.95
    max_new_tokens: int = 1024
    batch_prompts: int = 64  # prompts per generate call


def majority_correct(answers_k: list[str | None], correct_k: np.ndarray) -> float:
    """maj@k for one prompt: is the most common extracted answer a correct one?"""
    votes = collections.Counter(a.strip() for a in answers_k if a and a.strip())
    if not votes:
        return 0.0
    top = votes.most_common(1)[0][0]
    return float(max(c for a, c in zip(answers_k, correct_k) if a and a.strip() == top))


def evaluate(model, records: list[dict], render, tokenizer: Tokenizer, cfg: EvalConfig,
             sampler_cfg: sampler.SamplerConfig, key: jax.Array, *, rewards=None) -> tuple[dict, list[dict]]:
    """Metrics over `records` and a few (prompt, completion, score) samples to read.

    `render(question) -> prompt text` applies the recipe's template.
    """
    scfg = sampler_cfg.replace(group_size=cfg.samples, temperature=cfg.temperature, top_p=cfg.top_p,
                               top_k=0, min_p=0.0, greedy=False, max_new_tokens=cfg.max_new_tokens)
    correct, formatted, lengths, majority, samples = [], [], [], [], []
    for start in range(0, len(records), cfg.batch_prompts):
        batch = records[start : start + cfg.batch_prompts]
        prompts = tokenizer.encode_batch([render(r["prompt"]) for r in batch], add_bos=True)
        prompts = [p[-scfg.max_prompt_len:] for p in prompts]
        rollout = sampler.generate(model, prompts, jax.random.fold_in(key, start), scfg)
        tokens, mask = host_array(rollout.tokens_BxT), host_array(rollout.mask_BxT)
        texts = tokenizer.decode_batch([t[m] for t, m in zip(tokens, mask)])
        examples = [r for r in batch for _ in range(cfg.samples)]
        acc = np.asarray(accuracy_reward(texts, examples) if rewards is None else rewards(texts, examples))
        fmt = format_reward(texts, examples)
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
    }
    return metrics, samples
