"""One GRPO step's rollouts on the host: P groups of G completions sampled, decoded and scored, with DAPO's
dynamic sampling (groups whose rewards are all equal dropped, more prompts sampled).

Shapes: P prompts per step, G completions per prompt, B = P*G rows (prompt-major), Tp prompt length, T completion
length.
"""
import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from r1jax import grpo, rollout

# draw(n) -> (records, token lists, number skipped as too long): n prompts that fit (rollout.take_prompts).
Draw = Callable[[int], tuple[list[dict], list[list[int]], int]]


@dataclasses.dataclass
class Groups:
    """One step's rollouts on the host, P groups of G rows (prompt-major), ready for the update."""

    records: list[dict]  # P
    prompt_tokens_BxTp: np.ndarray
    prompt_mask_BxTp: np.ndarray
    tokens_BxT: np.ndarray
    mask_BxT: np.ndarray
    logp_BxT: np.ndarray
    truncated_B: np.ndarray
    texts: list[str]
    task_rewards_B: np.ndarray  # the rewards' weighted total
    rewards_B: np.ndarray  # plus reward shaping (overlong); what the advantages are computed from
    scores: dict[str, np.ndarray]  # name -> per-row score (0 where the reward does not apply)
    routed: dict[str, np.ndarray]  # name -> per-row bool
    counts: dict[str, float]  # the rewards' error/timeout/... counts over every row sampled for the step
    times: dict[str, float] = dataclasses.field(default_factory=dict)  # sample_s, reward_s over every round

    def take(self, groups: np.ndarray, G: int) -> "Groups":
        rows = (groups[:, None] * G + np.arange(G)).reshape(-1)
        pick = lambda x: x[rows]  # noqa: E731
        return Groups([self.records[p] for p in groups], *(pick(getattr(self, f)) for f in rollout.ROW_FIELDS[:6]),
                      [self.texts[r] for r in rows], pick(self.task_rewards_B), pick(self.rewards_B),
                      {k: pick(v) for k, v in self.scores.items()}, {k: pick(v) for k, v in self.routed.items()},
                      self.counts)


def _pad_to(x: np.ndarray, width: int, left: bool) -> np.ndarray:
    pad = [(0, 0)] * x.ndim
    pad[1] = (width - x.shape[1], 0) if left else (0, width - x.shape[1])
    return np.pad(x, pad)


def _join(a: Groups, b: Groups) -> Groups:
    """Groups of two generate calls in one batch (their prompt buckets may differ: left-pad the narrower)."""
    def cat(name):
        x, y = getattr(a, name), getattr(b, name)
        if x.ndim == 2 and x.shape[1] != y.shape[1]:
            left = name.startswith("prompt")
            width = max(x.shape[1], y.shape[1])
            x, y = _pad_to(x, width, left), _pad_to(y, width, left)
        return np.concatenate([x, y])
    return Groups(a.records + b.records, *(cat(f) for f in rollout.ROW_FIELDS), a.texts + b.texts,
                  np.concatenate([a.task_rewards_B, b.task_rewards_B]), np.concatenate([a.rewards_B, b.rewards_B]),
                  {k: np.concatenate([v, b.scores[k]]) for k, v in a.scores.items()},
                  {k: np.concatenate([v, b.routed[k]]) for k, v in a.routed.items()},
                  a.counts)  # collect_step sets the step's counts once its rounds are done


def sample_groups(model, drawn, key, cfg, scfg, tok, rewards, step: int, poll,
                  on_sampled: Callable[[rollout.Completions], None] | None = None) -> Groups:
    """G completions of each of the `drawn` (records, token lists, ...) prompts, decoded and scored (each process
    its share); `on_sampled(completions)` runs once the tokens are on the host, before any decoding."""
    records, prompts = drawn[0], drawn[1]
    done = rollout.sample(model, records, prompts, key, scfg, tok, poll=poll)
    if on_sampled is not None:
        on_sampled(done)
    done = rollout.decode_and_score(done, tok, rewards, scfg.stop_strings, step=step)
    task_B = np.asarray(done.scored.total_B, np.float32)
    shaped_B = task_B
    if cfg.overlong_buffer:
        penalty_B = grpo.overlong_penalty(done.lengths_B, cfg.max_new_tokens, cfg.overlong_buffer,
                                          penalty_factor=cfg.overlong_penalty)
        shaped_B = task_B + np.asarray(penalty_B, np.float32)
    counts = {k: v for k, v in done.scored.metrics.items() if not k.endswith(("/mean", "/weight"))}
    return Groups(records, *(getattr(done, f) for f in rollout.ROW_FIELDS), done.texts, task_B, shaped_B,
                  done.scored.scores, done.scored.routed, counts,
                  {"sample_s": done.sample_s, "reward_s": done.reward_s})


def collect_step(model, drawn, draw: Draw, key, cfg, scfg, tok, rewards, step: int, poll,
                 on_sampled: Callable[[rollout.Completions], None] | None = None) -> tuple[Groups, dict]:
    """One step's P groups from the `drawn` prompts: sample -> decode -> score, and with dynamic sampling keep only
    groups whose task rewards differ, sampling `draw(P)` more prompts until P are kept (at most
    max_sampling_rounds calls). `on_sampled(completions)` runs as each round's tokens reach the host, before the
    host decodes and scores them: device work queued there runs meanwhile."""
    P, G = cfg.prompts_per_step, cfg.group_size
    groups = sample_groups(model, drawn, jax.random.fold_in(key, 0), cfg, scfg, tok, rewards, step, poll, on_sampled)
    stats = {"prompts_too_long": drawn[2], "time_sample_s": groups.times.get("sample_s", 0.0),
             "time_reward_s": groups.times.get("reward_s", 0.0)}
    if not cfg.dynamic_sampling:
        return groups, stats
    kept, dropped, rounds, counts = None, None, 0, {}
    while True:
        rounds += 1
        if rounds > 1:
            stats["time_sample_s"] += groups.times.get("sample_s", 0.0)
            stats["time_reward_s"] += groups.times.get("reward_s", 0.0)
        for k, v in groups.counts.items():
            counts[k] = counts.get(k, 0.0) + v
        informative = np.asarray(grpo.informative_groups(groups.task_rewards_B.reshape(-1, G)))
        good, bad = groups.take(np.flatnonzero(informative), G), groups.take(np.flatnonzero(~informative), G)
        kept = good if kept is None else _join(kept, good)
        dropped = bad if dropped is None else _join(dropped, bad)
        if len(kept.records) >= P or rounds == cfg.max_sampling_rounds:
            break
        more = draw(P)
        stats["prompts_too_long"] += more[2]
        groups = sample_groups(model, more, jax.random.fold_in(key, rounds), cfg, scfg, tok, rewards, step, poll,
                               on_sampled)
    short = max(P - len(kept.records), 0)
    if short:  # top up with zero-advantage groups so the batch keeps its shape (and its compiled program)
        kept = _join(kept, dropped.take(np.arange(short), G))
    stats.update(dynamic_sampling_rounds=rounds, dynamic_sampling_dropped_groups=len(dropped.records),
                 dynamic_sampling_short_groups=short)
    kept = kept.take(np.arange(P), G)
    kept.counts = counts
    return kept, stats
