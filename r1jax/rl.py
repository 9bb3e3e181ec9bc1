"""The GRPO stage: sample groups, reward them, and update the policy, with a reference
model, periodic evaluation, metrics and exact-resume checkpoints.

Shapes: P prompts per step, G completions per prompt, B = P*G rows, Tp prompt
length, T completion length.
"""
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import grpo, rollout, sampler, sharding, train
from r1jax.checkpoint import Checkpointer
from r1jax.data import PromptStream
from r1jax.evaluate import Evaluation
from r1jax.metrics import Progress
from r1jax.rewards import RewardSet, routed_mean
from r1jax.run import Context, NonFiniteError, Policy, Preempted


def _logp_gap(old_logp, sampler_logp, mask, is_weights, cap: float) -> dict:
    """How far the sampler's log-probs are from the trainer's old ones over the loss's tokens (bf16 kernels,
    top-p's renormalisation): the mean and max |gap|, and the importance weights' mean and capped share."""
    valid = np.asarray(sharding.host_array(mask), bool)
    gap = np.abs(np.asarray(sharding.host_array(old_logp)) - np.asarray(sharding.host_array(sampler_logp)))[valid]
    out = {"sampler_logp_gap_mean": float(gap.mean()) if gap.size else 0.0,
           "sampler_logp_gap_max": float(gap.max()) if gap.size else 0.0}
    if is_weights is not None:
        w = np.asarray(sharding.host_array(is_weights))[valid]
        out.update(tis_weight_mean=float(w.mean()) if w.size else 0.0,
                   tis_capped_frac=float((w >= cap).mean()) if w.size else 0.0)
    return out


@dataclasses.dataclass(frozen=True)
class RLConfig:
    steps: int = 1000
    prompts_per_step: int = 32  # P
    group_size: int = 16  # G
    mu: int = 1  # inner epochs per batch of rollouts
    minibatches: int = 1  # optimizer steps per epoch
    microbatches: int = 1  # gradient accumulation inside a minibatch
    optim: train.OptimConfig = train.OptimConfig(lr=3e-6)
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.001
    kl_kind: Literal["k1", "k2", "k3"] = "k3"
    aggregation: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = "seq_mean_token_mean"
    adv_scale: Literal["group", "batch", "none"] = "group"
    importance: Literal["token", "sequence"] = "token"
    ref_reset_every: int = 400  # the reference becomes the current policy every N steps (R1)
    recompute_old_logp: bool = False  # else the sampler's log-probs are the old policy's
    # > 0: truncated importance sampling. The sampler returns its behaviour log-probs (of the distribution it drew
    # from, after top-k/top-p: SamplerConfig.logprobs="sampled"), the trainer recomputes the old policy's, and each
    # token's surrogate is weighted by min(pi_old / pi_sampler, tis_cap) (grpo.tis_weights; needs
    # recompute_old_logp). Required when RL samples with top_p or top_k, whose draws pi_old does not describe.
    tis_cap: float = 0.0
    mask_truncated: bool = False  # drop completions that hit max_new_tokens from the loss
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: tuple[str, ...] = ()  # completions also end on these texts (e.g. </answer>), kept in them
    slots: int = 0  # > 0: continuous batching over this many decode slots (r1jax.engine); 0: lockstep batches
    max_prompt_len: int = 512
    max_new_tokens: int = 1024
    dual_clip: float | None = None  # > 1 caps a negative-advantage token's loss at -dual_clip * A (verl's clip_ratio_c)
    log_ratio_clamp: float = grpo.LOG_RATIO_CLAMP  # |logp - old_logp| is clamped to this before exp
    logprob_chunk: int = 256
    checkpoint_every: int = 50
    checkpoint_keep: int = 3
    log_samples_every: int = 10
    max_nonfinite_steps: int = 3  # steps in a row whose updates were all skipped (NaN/inf) before the run stops
    loss_type: Literal["ppo", "cispo"] = "ppo"  # cispo: MiniMax-M1's clipped stop-gradient IS weights on every token
    # DAPO's overlong reward shaping: a penalty growing linearly to -overlong_penalty over the last
    # overlong_buffer tokens before max_new_tokens (0: off).
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    # DAPO's dynamic sampling: groups whose rewards are all equal are dropped and more prompts are sampled,
    # up to max_sampling_rounds generate calls per step; a batch still short then is topped up with dropped
    # groups (zero advantage; counted as dynamic_sampling_short_groups).
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    # Each prompt's forward runs once for the completions of its group that share a device and a microbatch,
    # in the update and in the reference / old-policy forwards (the same numbers, up to float rounding; the
    # work on prompt tokens drops by up to G times). Epochs then shuffle whole blocks of such rows.
    share_prompts: bool = True

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "mu", "minibatches", "microbatches", "max_prompt_len",
                     "max_new_tokens", "logprob_chunk", "checkpoint_every", "checkpoint_keep", "ref_reset_every",
                     "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size} must be >= 2: a group of one has no spread, so every "
                             "advantage is 0 and nothing is learned")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0: GRPO learns from the spread of "
                             "sampled groups (R1 samples at 1.0)")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"dual_clip={self.dual_clip} must be > 1 (or none)")
        if not self.log_ratio_clamp > 0 or min(self.clip_low, self.clip_high, self.kl_coef) < 0:
            raise ValueError("log_ratio_clamp must be > 0 and clip_low, clip_high, kl_coef >= 0")
        if not 0 <= self.overlong_buffer <= self.max_new_tokens or self.overlong_penalty < 0:
            raise ValueError(f"overlong_buffer={self.overlong_buffer} must be in [0, max_new_tokens="
                             f"{self.max_new_tokens}] and overlong_penalty >= 0")
        if self.max_sampling_rounds < 1:
            raise ValueError(f"max_sampling_rounds={self.max_sampling_rounds} must be >= 1")
        if not 0 < self.top_p <= 1 or self.top_k < 0 or self.log_samples_every < 0:
            raise ValueError("top_p must be in (0, 1], top_k >= 0 and log_samples_every >= 0")
        if self.tis_cap < 0 or (self.tis_cap and not self.recompute_old_logp):
            raise ValueError(f"tis_cap={self.tis_cap} must be >= 0, and > 0 needs recompute_old_logp=true (the "
                             "weights compare the trainer's old log-probs with the sampler's)")
        if (self.top_p < 1 or self.top_k) and not self.tis_cap:
            raise ValueError(f"top_p={self.top_p}, top_k={self.top_k}: the samples come from a truncated "
                             "distribution the policy's log-probs do not describe, which biases the ratio; set "
                             "recompute_old_logp=true tis_cap=2 (truncated importance sampling) or sample the full "
                             "distribution")

    def check_mesh(self, mesh) -> None:
        """Before any compute (and after every override: it relates several settings): the batch must split
        into minibatches x microbatches, and each microbatch's rows over the mesh's data and fsdp axes."""
        rows, parts = self.prompts_per_step * self.group_size, self.minibatches * self.microbatches
        data = mesh.shape["data"] * mesh.shape["fsdp"]
        if rows % (parts * data):
            raise ValueError(f"rl.prompts_per_step x rl.group_size = {rows} rows do not split into rl.minibatches "
                             f"x rl.microbatches = {parts} parts of a multiple of mesh data x fsdp = {data} devices; "
                             "change one of them")

    def rows_per_shard(self, mesh, parts: int) -> int:
        """Rows of one step's batch split into `parts`, on each device holding a share of them."""
        return self.prompts_per_step * self.group_size // (parts * mesh.shape["data"] * mesh.shape["fsdp"])

    def prompt_share(self, mesh, parts: int = 1) -> int:
        """Rows per prompt forward when the batch is split into `parts` (see share_prompts)."""
        if not self.share_prompts:
            return 1
        return train.prompt_share(self.group_size, self.rows_per_shard(mesh, parts))

    def hyper(self, mesh=None) -> train.RLHyper:
        share = 1 if mesh is None else self.prompt_share(mesh, self.minibatches * self.microbatches)
        return train.RLHyper(
            mu=self.mu, minibatches=self.minibatches, microbatches=self.microbatches,
            clip_low=self.clip_low, clip_high=self.clip_high, kl_coef=self.kl_coef, kl_kind=self.kl_kind,
            aggregation=self.aggregation, importance=self.importance, temperature=self.temperature,
            max_len=self.max_new_tokens if self.aggregation == "seq_mean_token_sum_norm" else None,
            logprob_chunk=self.logprob_chunk, dual_clip=self.dual_clip, log_ratio_clamp=self.log_ratio_clamp,
            loss_type=self.loss_type, prompt_share=share)


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


def sample_groups(model, take, n: int, key, cfg: RLConfig, scfg: sampler.SamplerConfig, tok, render, rewards,
                  step: int, poll) -> tuple[Groups, int]:
    """Sample G completions for `n` prompts drawn by `take`, decode and score them (each process its share);
    returns the groups and the number of prompts skipped as too long."""
    records, prompts, too_long = rollout.take_prompts(take, n, render, tok, cfg.max_prompt_len)
    done = rollout.complete(model, records, prompts, key, scfg, tok, rewards, step=step, poll=poll)
    task_B = np.asarray(done.scored.total_B, np.float32)
    shaped_B = task_B
    if cfg.overlong_buffer:
        penalty_B = grpo.overlong_penalty(done.lengths_B, cfg.max_new_tokens, cfg.overlong_buffer,
                                          penalty_factor=cfg.overlong_penalty)
        shaped_B = task_B + np.asarray(penalty_B, np.float32)
    counts = {k: v for k, v in done.scored.metrics.items() if not k.endswith(("/mean", "/weight"))}
    return Groups(records, *(getattr(done, f) for f in rollout.ROW_FIELDS), done.texts, task_B, shaped_B,
                  done.scored.scores, done.scored.routed, counts,
                  {"sample_s": done.sample_s, "reward_s": done.reward_s}), too_long


def collect_step(model, take, key, cfg: RLConfig, scfg, tok, render, rewards, step: int, poll) -> tuple[Groups, dict]:
    """One step's P groups: sample -> decode -> score, and with dynamic sampling keep only groups whose task
    rewards differ, sampling more prompts until P are kept (at most max_sampling_rounds calls)."""
    P, G = cfg.prompts_per_step, cfg.group_size
    groups, too_long = sample_groups(model, take, P, jax.random.fold_in(key, 0), cfg, scfg, tok, render,
                                     rewards, step, poll)
    stats = {"prompts_too_long": too_long, "time_sample_s": groups.times.get("sample_s", 0.0),
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
        groups, skipped = sample_groups(model, take, P, jax.random.fold_in(key, rounds), cfg, scfg, tok,
                                        render, rewards, step, poll)
        stats["prompts_too_long"] += skipped
    short = max(P - len(kept.records), 0)
    if short:  # top up with zero-advantage groups so the batch keeps its shape (and its compiled program)
        kept = _join(kept, dropped.take(np.arange(short), G))
    stats.update(dynamic_sampling_rounds=rounds, dynamic_sampling_dropped_groups=len(dropped.records),
                 dynamic_sampling_short_groups=short)
    kept = kept.take(np.arange(P), G)
    kept.counts = counts
    return kept, stats


# update(state, batch, key) -> (state, metrics): one step's optimizer updates from a batch of rollouts.
Update = Callable[[train.TrainState, train.RLBatch, jax.Array], tuple[train.TrainState, dict]]


def grpo_stage(ctx: Context, policy: Policy, *, name: str, cfg: RLConfig, train_records: list[dict],
               rewards: RewardSet, render: Callable[[str], str], evaluation: Evaluation | None = None,
               evaluate_start: bool = True, update: Update | None = None) -> Policy:
    """Run `cfg.steps` GRPO steps from `policy`; resumes from the stage's last readable checkpoint.

    Evaluations run at step 0 (unless `evaluate_start` is False: the policy was just evaluated by the
    stage before), every `evaluation.cfg.every` steps and at the end (none without an enabled evaluation);
    one that a stop or a crash cut short runs again on resume. SIGTERM is
    polled between steps, evaluation batches and decode segments; the loop saves and leaves.

    `update` replaces the GRPO update and its reference / old-policy forwards with another learning rule on the
    same rollouts (on-policy distillation: r1jax.distill); the rewards are then measured, not optimised. Its
    metrics are logged as they come.
    """
    if update is not None and (cfg.kl_coef or cfg.recompute_old_logp or cfg.mu != 1):
        raise ValueError(f"{name}: with another update than GRPO's, kl_coef must be 0, recompute_old_logp false "
                         "and mu 1 (the update owns its loss and its passes)")
    cfg.check_mesh(ctx.mesh)
    tok, mesh = policy.tokenizer, ctx.mesh
    P, G = cfg.prompts_per_step, cfg.group_size
    updates = cfg.steps * cfg.mu * cfg.minibatches  # optimizer steps in the stage
    tx = train.make_optimizer(cfg.optim, updates)
    schedule = train.lr_schedule(cfg.optim, updates)
    policy.model.act_sharding = sharding.ActivationSharding(mesh, sharding.TRAIN_RULES)
    state = train.create_train_state(policy.model, tx)
    use_ref = cfg.kl_coef > 0
    ref_params = jax.tree.map(jnp.copy, state.params) if use_ref else None
    key = jax.random.key(ctx.seed)
    # Every process draws the same global batch of prompts (they are small); each process scores only
    # its share of the completions and the scores are gathered (rollout.score), and each places only
    # its own rows on its devices.
    stream = PromptStream(train_records, seed=ctx.seed, process_index=0, process_count=1)
    scfg = sampler.SamplerConfig(
        max_prompt_len=cfg.max_prompt_len, max_new_tokens=cfg.max_new_tokens, group_size=G,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, stop_ids=tuple(tok.stop_ids),
        pad_id=tok.pad_id, stop_strings=cfg.stop_strings, slots=cfg.slots,
        logprobs="sampled" if cfg.tis_cap else "full")

    ckpt = Checkpointer(ctx.stage_dir(name) + "/checkpoints", keep=cfg.checkpoint_keep)
    start = 0
    restored = ckpt.restore_latest((state, ref_params))
    if restored is not None:
        (state, ref_params), extras = restored
        stream.set_state(extras["data"])
        start = extras["step"]
        print(f"[r1jax] {name}: resumed at step {start}")
    ctx.logger.purge(name, start)  # a killed attempt may have logged steps past the checkpoint
    saved = {"step": start if restored is not None else None}

    def save(step: int, data_state: dict) -> None:
        ckpt.save(step, (state, ref_params), {"step": step, "data": data_state}, force=True)
        ckpt.raise_if_failed()
        saved["step"] = step

    def keep_progress(step: int, data_state: dict) -> None:
        """Stopped inside an evaluation or a generation: the `step` steps done so far must not be lost."""
        if step > 0 and saved["step"] != step:
            save(step, data_state)
        ckpt.wait()

    evaluating = evaluation is not None and evaluation.enabled
    if not evaluating and start == 0:
        print(f"[r1jax] {name}: evaluation is off")

    def eval_due(step: int) -> bool:
        if step == 0:
            return evaluating and evaluate_start
        return evaluating and (step == cfg.steps or step % evaluation.cfg.every == 0)

    def do_eval(step: int) -> None:
        try:
            evaluation(ctx, state.model(), tok, name, step)
        except Preempted:
            keep_progress(step, stream.get_state())
            raise

    if eval_due(start) and start not in ctx.evaluated_steps(name):
        do_eval(start)
    hp = cfg.hyper(mesh)
    ref_share = cfg.prompt_share(mesh)
    progress = Progress(total=cfg.steps, initial=start, desc=name)
    nonfinite_run = 0  # steps in a row whose every update was skipped
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        data_state = stream.get_state()
        step_key = jax.random.fold_in(key, step)
        try:
            groups, sample_stats = collect_step(sharding.for_sampling(state.model(), mesh), stream.take, step_key,
                                                cfg, scfg, tok, render, rewards, step, ctx.poll)
        except Preempted:
            keep_progress(step, data_state)
            raise
        adv_B = np.asarray(grpo.group_advantages(groups.rewards_B, G, scale=cfg.adv_scale))
        t1 = time.perf_counter()

        mask = groups.mask_BxT
        loss_mask = mask & ~groups.truncated_B[:, None] if cfg.mask_truncated else mask
        put = lambda x: sharding.put_rows(x, mesh, sharding.TRAIN_RULES)  # noqa: E731
        prompt_BxTp, prompt_mask_BxTp = put(groups.prompt_tokens_BxTp), put(groups.prompt_mask_BxTp)
        completion_BxT, loss_mask_BxT = put(groups.tokens_BxT), put(loss_mask)
        old_logp = sampler_logp = put(groups.logp_BxT)
        is_weights = None
        if cfg.recompute_old_logp:
            old_logp = train.rollout_logprobs(state.graphdef, state.params, prompt_BxTp, prompt_mask_BxTp,
                                              completion_BxT, loss_mask_BxT, temperature=cfg.temperature,
                                              chunk=cfg.logprob_chunk, share=ref_share)
            if cfg.tis_cap:
                is_weights = grpo.tis_weights(old_logp, sampler_logp, cfg.tis_cap, mask_BxT=loss_mask_BxT)
        ref_logp = None
        if use_ref:
            ref_logp = train.rollout_logprobs(state.graphdef, ref_params, prompt_BxTp, prompt_mask_BxTp,
                                              completion_BxT, loss_mask_BxT, temperature=cfg.temperature,
                                              chunk=cfg.logprob_chunk, share=ref_share)
        jax.block_until_ready((old_logp, ref_logp))
        t_ref = time.perf_counter()
        batch = train.RLBatch(prompt_BxTp, prompt_mask_BxTp, completion_BxT, loss_mask_BxT, old_logp, ref_logp,
                              put(adv_B), is_weights)
        lr = float(schedule(int(sharding.host_array(state.step))))
        state, update_metrics = (update or functools.partial(train.rl_update, hp=hp))(
            state, batch, jax.random.fold_in(step_key, 1))
        update_metrics = jax.tree.map(sharding.host_array, update_metrics)
        t2 = time.perf_counter()

        if use_ref and (step + 1) % cfg.ref_reset_every == 0:
            ref_params = jax.tree.map(jnp.copy, state.params)
        lengths = mask.sum(axis=1)
        rewards_B = groups.rewards_B
        record = {
            "step": step + 1, "stage": name,
            "reward_mean": float(rewards_B.mean()), "reward_std": float(rewards_B.std()),
            "accuracy": _routed_mean(groups, "accuracy"), "format_rate": _routed_mean(groups, "format"),
            "completion_len_mean": float(lengths.mean()), "completion_len_max": int(lengths.max()),
            "truncation_rate": float(groups.truncated_B.mean()),
            "zero_spread_groups": float(grpo.zero_spread_fraction(rewards_B, G)),
            **sample_stats,
            "lr": lr,
            **{k: float(v) for k, v in update_metrics.items()},
            **{f"reward/{k}/mean": _routed_mean(groups, k) for k in groups.scores},
            **{f"reward/{k}": v for k, v in groups.counts.items()},
            **{f"reward/{r.name}/weight": r.weight_at(step) for r in rewards.rewards},
            # The step's split: the device works in sample, reference and update; the rest (decoding and scoring
            # the text, advantages, transfers) is host time in which it sits idle.
            "time_rollout_s": t1 - t0, "time_train_s": t2 - t1, "time_step_s": t2 - t0,
            "time_reference_s": t_ref - t1, "time_update_s": t2 - t_ref,
            "time_idle_s": (t2 - t0) - sample_stats["time_sample_s"] - (t2 - t1),
            "tokens_per_s": float(lengths.sum() / max(t2 - t0, 1e-9)),
        }
        if cfg.recompute_old_logp:
            record.update(_logp_gap(old_logp, sampler_logp, loss_mask_BxT, is_weights, cfg.tis_cap))
        if cfg.overlong_buffer:
            record["overlong_penalty_mean"] = float((groups.rewards_B - groups.task_rewards_B).mean())
        if not use_ref:
            record["kl"] = 0.0  # no reference model (on-policy distillation logs its KL to the teacher apart)
        ctx.logger.log_step(record)
        progress.update(step + 1, record)
        if cfg.log_samples_every and (step + 1) % cfg.log_samples_every == 0:
            ctx.logger.log_samples(step + 1, name, [
                {"prompt": groups.records[i // G]["prompt"], "completion": groups.texts[i],
                 "reward": float(rewards_B[i])} for i in range(0, len(groups.texts), G)][:4])
        skipped = int(update_metrics["nonfinite_updates"])
        nonfinite_run = nonfinite_run + 1 if skipped == cfg.mu * cfg.minibatches else 0
        if nonfinite_run >= cfg.max_nonfinite_steps:
            ckpt.wait()
            progress.close()
            raise NonFiniteError(name, f"every update of the last {nonfinite_run} steps", step + 1,
                                 saved["step"], ckpt.directory)
        stopping = ctx.stop.stop_everywhere()
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or stopping:
            save(step + 1, stream.get_state())
        if stopping:
            ckpt.wait()
            progress.close()
            raise Preempted(f"{name}: stopped by signal at step {step + 1}; re-run the command to resume")
        if eval_due(step + 1):
            do_eval(step + 1)
    progress.close()
    ckpt.wait()
    ckpt.close()
    model = state.model()
    return dataclasses.replace(policy, model=model)



def _routed_mean(groups: Groups, name: str) -> float:
    """A reward's mean over the rows it applies to (0.0 when it is absent or applies to none)."""
    mean = routed_mean(groups.scores, groups.routed, name)
    return 0.0 if mean is None else mean
