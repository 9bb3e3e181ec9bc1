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
from flax import nnx

from r1jax import grpo, rollout, sampler, sharding, train
from r1jax.checkpoint import Checkpointer
from r1jax.data import PromptStream
from r1jax.evaluate import Evaluation
from r1jax.groups import Groups, collect_step
from r1jax.metrics import Progress
from r1jax.rewards import RewardSet, routed_mean
from r1jax.run import Context, NonFiniteError, Policy, Preempted
from r1jax.timing import DeviceTimeline


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
    # One-step-off (opt-in): the batch a step trains on was sampled before the previous step's update, by the
    # policy before it (staleness 1, logged), and the next batch is sampled before this step's update is queued,
    # so the update runs while the host decodes and scores. The ratio's old log-probs are that policy's (the
    # sampler's, or recomputed from its sampling weights); checkpoints hold those weights, and a resume draws
    # the batch in flight again from them.
    one_step_off: bool = False

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


# update(state, batch, key) -> (state, metrics): one step's optimizer updates from a batch of rollouts.
Update = Callable[[train.TrainState, train.RLBatch, jax.Array], tuple[train.TrainState, dict]]


@dataclasses.dataclass
class _Batch:
    """A step's scored rollouts (None until drawn) and what a resume needs to draw them again."""

    groups: Groups | None
    stats: dict  # collect_step's: prompts skipped, dynamic sampling rounds, ...
    version: int  # the step whose policy sampled them
    data_state: dict  # the prompt stream before their prompts were drawn
    behaviour: object = None  # one-step-off: the sampling view that draws them (checkpointed until they are trained)
    old_logp: jax.Array | None = None  # one-step-off with recompute_old_logp: their log-probs under `behaviour`
    rows: tuple | None = None  # one-step-off: their prompt and completion rows, already on the device


@dataclasses.dataclass
class _Pending:
    """A step whose update was dispatched: its record is finished once the update's metrics are read, a step late."""

    step: int
    t0: float
    record: dict
    metrics: dict  # on the device
    step_count: jax.Array  # optimizer updates before this step's: its learning rate
    groups: Groups
    gap: tuple | None  # (old_logp, sampler_logp, loss mask, is_weights) when old log-probs were recomputed


def _checkpoint_tree(state, ref_params, behaviour) -> tuple:
    return (state, ref_params) if behaviour is None else (state, ref_params, nnx.state(behaviour))


def grpo_stage(ctx: Context, policy: Policy, *, name: str, cfg: RLConfig, train_records: list[dict],
               rewards: RewardSet, render: Callable[[str], str], evaluation: Evaluation | None = None,
               evaluate_start: bool = True, update: Update | None = None) -> Policy:
    """Run `cfg.steps` GRPO steps from `policy`; resumes from the stage's last readable checkpoint.

    Evaluations run at step 0 (unless `evaluate_start` is False: the policy was just evaluated by the
    stage before), every `evaluation.cfg.every` steps and at the end (none without an enabled evaluation);
    one that a stop or a crash cut short runs again on resume. SIGTERM is
    polled between steps, evaluation batches and decode segments; the loop saves and leaves.

    The device is kept busy: the reference and old-policy forwards are queued as soon as the completions are
    on the host and run while it decodes and scores them; a step's update metrics are read in the next step,
    once its prompts are drawn and its sampling weights queued. With `cfg.one_step_off` the next step's batch
    is sampled before this step's update is queued, and the update runs while the host scores that batch.

    `update` replaces the GRPO update and its reference / old-policy forwards with another learning rule on the
    same rollouts (on-policy distillation: r1jax.distill); the rewards are then measured, not optimised. Its
    metrics are logged as they come.
    """
    if update is not None and (cfg.kl_coef or cfg.recompute_old_logp or cfg.mu != 1 or cfg.one_step_off):
        raise ValueError(f"{name}: with another update than GRPO's, kl_coef must be 0, recompute_old_logp false, "
                         "mu 1 and one_step_off false (the update owns its loss and its passes, on-policy)")
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
    # One-step-off: a checkpoint also holds the sampling weights of the batch in flight, which a resume draws
    # again from them (the same prompts, key and weights: the same batch).
    behaviour = sharding.for_sampling(state.model(), mesh) if cfg.one_step_off else None
    restored = ckpt.restore_latest(_checkpoint_tree(state, ref_params, behaviour))
    if restored is not None:
        tree, extras = restored
        state, ref_params = tree[0], tree[1]
        if behaviour is not None:
            behaviour = nnx.merge(nnx.graphdef(behaviour), tree[2])
        stream.set_state(extras["data"])
        start = extras["step"]
        print(f"[r1jax] {name}: resumed at step {start}")
    ctx.logger.purge(name, start)  # a killed attempt may have logged steps past the checkpoint
    saved = {"step": start if restored is not None else None}

    evaluating = evaluation is not None and evaluation.enabled
    if not evaluating and start == 0:
        print(f"[r1jax] {name}: evaluation is off")

    def eval_due(step: int) -> bool:
        if step == 0:
            return evaluating and evaluate_start
        return evaluating and (step == cfg.steps or step % evaluation.cfg.every == 0)

    hp = cfg.hyper(mesh)
    ref_share = cfg.prompt_share(mesh)
    put = lambda x: sharding.put_rows(x, mesh, sharding.TRAIN_RULES)  # noqa: E731
    timeline = DeviceTimeline()
    progress = Progress(total=cfg.steps, initial=start, desc=name)
    nonfinite_run = 0  # steps in a row whose every update was skipped
    pending: _Pending | None = None
    # Where a stop resumes from: the steps done, and how to draw the batch the next one trains on.
    resume = {"step": start, "batch": _Batch(None, {}, start - 1 if restored else start, stream.get_state(),
                                             behaviour)}

    def save(step: int, batch: _Batch) -> None:
        ckpt.save(step, _checkpoint_tree(state, ref_params, batch.behaviour), {"step": step, "data": batch.data_state},
                  force=True)
        ckpt.raise_if_failed()
        saved["step"] = step

    def keep_progress() -> None:
        """Stopped inside an evaluation or a generation: the steps done so far must not be lost."""
        flush()
        if resume["step"] > 0 and saved["step"] != resume["step"]:
            save(resume["step"], resume["batch"])
        ckpt.wait()

    def do_eval(step: int) -> None:
        try:
            evaluation(ctx, state.model(), tok, name, step)
        except Preempted:
            keep_progress()
            raise

    def draw(n: int):
        return rollout.take_prompts(stream.take, n, render, tok, cfg.max_prompt_len)

    def logprobs(graphdef, params, rows):
        return train.rollout_logprobs(graphdef, params, *rows, temperature=cfg.temperature,
                                      chunk=cfg.logprob_chunk, share=ref_share)

    def sampled_rows(done) -> tuple:
        # With the sampler's own mask: a stop-string cut made later on the host only shortens it, and a causal
        # model's log-probs of the tokens kept do not depend on the tokens cut.
        return (put(done.prompt_tokens_BxTp), put(done.prompt_mask_BxTp), put(done.tokens_BxT),
                put(done.mask_BxT.copy()))  # the host may cut its own copy while the device reads this one

    def queue_forwards(done, old_logp=None, rows=None) -> dict:
        """The reference and (recomputed) old-policy log-probs of sampled rows, queued on the device."""
        rows = rows or sampled_rows(done)
        out = {"rows": rows}
        if cfg.recompute_old_logp:
            out["old"] = old_logp if old_logp is not None else logprobs(state.graphdef, state.params, rows)
        if use_ref:
            out["ref"] = logprobs(state.graphdef, ref_params, rows)
        if "ref" in out or (cfg.recompute_old_logp and old_logp is None):
            timeline.dispatched("reference", (out.get("ref"), out.get("old")))
        return out

    def collect(view, step: int, times: dict, on_sampled=None) -> tuple[Groups, dict]:
        """The prompts for `step`'s batch, then the last step's record (its update ran meanwhile), then the batch;
        `on_sampled(completions)` once its first tokens are on the host."""
        drawn = draw(P)
        flush(until=times["t0"])
        rounds = []

        def sampled(done) -> None:
            end = time.perf_counter()
            timeline.ran("sample", end - done.sample_s, end)
            if on_sampled is not None and not rounds:
                on_sampled(done)
            rounds.append(done)

        groups, stats = collect_step(view, drawn, draw, jax.random.fold_in(key, step), cfg, scfg, tok, rewards,
                                     step, ctx.poll, sampled)
        times["sample"] += stats.pop("time_sample_s")
        times["reward"] += stats.pop("time_reward_s")
        return groups, stats

    def behaviour_batch(groups, stats, version, data_state, view) -> _Batch:
        rows = sampled_rows(groups)
        old = logprobs(*nnx.split(view), rows) if cfg.recompute_old_logp else None
        if old is not None:
            timeline.dispatched("reference", old)
        return _Batch(groups, stats, version, data_state, view, old, rows)

    def dispatch_update(step: int, batch: _Batch, forwards: dict):
        """Queue `batch`'s update; returns (metrics, step count before it, gap inputs), all on the device."""
        nonlocal state, ref_params
        groups = batch.groups
        adv_B = np.asarray(grpo.group_advantages(groups.rewards_B, G, scale=cfg.adv_scale))
        loss_mask = groups.mask_BxT & ~groups.truncated_B[:, None] if cfg.mask_truncated else groups.mask_BxT
        prompt_BxTp, prompt_mask_BxTp, completion_BxT, _ = forwards.get("rows") or sampled_rows(groups)
        loss_mask_BxT = put(loss_mask)
        sampler_logp = put(groups.logp_BxT)
        old_logp = forwards.get("old", sampler_logp)
        is_weights = (grpo.tis_weights(old_logp, sampler_logp, cfg.tis_cap, mask_BxT=loss_mask_BxT)
                      if cfg.tis_cap else None)
        rl_batch = train.RLBatch(prompt_BxTp, prompt_mask_BxTp, completion_BxT, loss_mask_BxT, old_logp,
                                 forwards.get("ref"), put(adv_B), is_weights)
        step_count = jnp.copy(state.step)  # the update donates the state
        state, metrics = (update or functools.partial(train.rl_update, hp=hp))(
            state, rl_batch, jax.random.fold_in(jax.random.fold_in(key, step), 1))
        timeline.dispatched("update", metrics)
        if use_ref and (step + 1) % cfg.ref_reset_every == 0:
            ref_params = jax.tree.map(jnp.copy, state.params)
        gap = (old_logp, sampler_logp, loss_mask_BxT, is_weights) if cfg.recompute_old_logp else None
        return metrics, step_count, gap

    def flush(until: float | None = None) -> None:
        """Finish and log the pending step's record: its update's metrics (read a step late, so the host never
        waits for them while it has other work) and the device's time in the step, [its start, `until`]."""
        nonlocal pending, nonfinite_run
        if pending is None:
            return
        p, pending = pending, None
        metrics = jax.tree.map(sharding.host_array, p.metrics)
        busy = timeline.window(p.t0, time.perf_counter() if until is None else until)
        seconds = sum(busy.values())
        record = {**p.record, "lr": float(schedule(int(sharding.host_array(p.step_count)))),
                  **{k: float(v) for k, v in metrics.items()},
                  # The device's share of the step: sampling, the reference / old-policy forwards, the update;
                  # idle is what is left (host-only work: decoding, scoring, logging, the next prompts).
                  "time_step_s": seconds, "time_reference_s": busy.get("reference", 0.0),
                  "time_update_s": busy.get("update", 0.0), "time_idle_s": busy["idle"],
                  "tokens_per_s": float(p.groups.mask_BxT.sum() / max(seconds, 1e-9))}
        if p.gap is not None:
            record.update(_logp_gap(*p.gap, cfg.tis_cap))
        ctx.logger.log_step(record)
        progress.update(p.step + 1, record)
        if cfg.log_samples_every and (p.step + 1) % cfg.log_samples_every == 0:
            ctx.logger.log_samples(p.step + 1, name, [
                {"prompt": p.groups.records[i // G]["prompt"], "completion": p.groups.texts[i],
                 "reward": float(p.groups.rewards_B[i])} for i in range(0, len(p.groups.texts), G)][:4])
        skipped = int(metrics["nonfinite_updates"])
        nonfinite_run = nonfinite_run + 1 if skipped == cfg.mu * cfg.minibatches else 0
        if nonfinite_run >= cfg.max_nonfinite_steps:
            ckpt.wait()
            progress.close()
            raise NonFiniteError(name, f"every update of the last {nonfinite_run} steps", p.step + 1,
                                 saved["step"], ckpt.directory)

    if eval_due(start) and start not in ctx.evaluated_steps(name):
        do_eval(start)
    ahead: _Batch | None = None  # one-step-off: the next step's batch, sampled and scored
    for step in range(start, cfg.steps):
        times = {"t0": time.perf_counter(), "sample": 0.0, "reward": 0.0}
        try:
            if not cfg.one_step_off:
                resume["batch"] = _Batch(None, {}, step, stream.get_state())
                view = sharding.for_sampling(state.model(), mesh)
                forwards = {}
                # With dynamic sampling the batch is known once every round is scored; another update owns its passes.
                early = not cfg.dynamic_sampling and update is None
                groups, stats = collect(view, step, times, (lambda done: forwards.update(queue_forwards(done)))
                                        if early else None)
                if not early and update is None:
                    forwards = queue_forwards(groups)
                batch = _Batch(groups, stats, step, resume["batch"].data_state)
                launched = dispatch_update(step, batch, forwards)
                resume.update(step=step + 1, batch=_Batch(None, {}, step + 1, stream.get_state()))
            else:
                if ahead is None:  # the first step, or a resume: the batch in flight is drawn (again) from its weights
                    b = resume["batch"]
                    groups, stats = collect(b.behaviour, step, times)
                    ahead = behaviour_batch(groups, stats, b.version, b.data_state, b.behaviour)
                batch, ahead = ahead, None
                resume["batch"] = batch
                forwards = queue_forwards(batch.groups, batch.old_logp, batch.rows)
                if step + 1 == cfg.steps:
                    flush(until=times["t0"])
                    launched = dispatch_update(step, batch, forwards)
                    resume.update(step=step + 1, batch=dataclasses.replace(batch, data_state=stream.get_state()))
                else:
                    view = batch.behaviour if batch.version == step else sharding.for_sampling(state.model(), mesh)
                    data_state = stream.get_state()
                    started = []

                    def start_update(_, batch=batch, forwards=forwards, data_state=data_state, view=view):
                        # The next batch's tokens are on the host: queue this step's update, then score them.
                        started.append(dispatch_update(step, batch, forwards))
                        resume.update(step=step + 1, batch=_Batch(None, {}, step, data_state, view))

                    groups, stats = collect(view, step + 1, times, start_update)
                    launched = started[0]
                    ahead = behaviour_batch(groups, stats, step, data_state, view)
                    resume["batch"] = ahead
        except Preempted:
            keep_progress()
            raise
        groups = batch.groups
        lengths = groups.mask_BxT.sum(axis=1)
        record = {
            "step": step + 1, "stage": name,
            "reward_mean": float(groups.rewards_B.mean()), "reward_std": float(groups.rewards_B.std()),
            "accuracy": _routed_mean(groups, "accuracy"), "format_rate": _routed_mean(groups, "format"),
            "completion_len_mean": float(lengths.mean()), "completion_len_max": int(lengths.max()),
            "truncation_rate": float(groups.truncated_B.mean()),
            "zero_spread_groups": float(grpo.zero_spread_fraction(groups.rewards_B, G)),
            **batch.stats,
            "staleness": step - batch.version,  # updates between the policy that sampled the batch and this one
            **{f"reward/{k}/mean": _routed_mean(groups, k) for k in groups.scores},
            **{f"reward/{k}": v for k, v in groups.counts.items()},
            **{f"reward/{r.name}/weight": r.weight_at(step) for r in rewards.rewards},
            "time_sample_s": times["sample"], "time_reward_s": times["reward"],
        }
        if cfg.overlong_buffer:
            record["overlong_penalty_mean"] = float((groups.rewards_B - groups.task_rewards_B).mean())
        if not use_ref:
            record["kl"] = 0.0  # no reference model (on-policy distillation logs its KL to the teacher apart)
        pending = _Pending(step, times["t0"], record, *launched[:2], groups, launched[2])
        # Checkpoints, evaluations and stops wait for the update and log its record first; other steps leave
        # the record to the next step.
        checkpoint = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps
        if checkpoint or eval_due(step + 1):
            flush()
        stopping = ctx.stop.stop_everywhere()
        if checkpoint or stopping:
            flush()
            save(step + 1, resume["batch"])
        if stopping:
            ckpt.wait()
            progress.close()
            raise Preempted(f"{name}: stopped by signal at step {step + 1}; re-run the command to resume")
        if eval_due(step + 1):
            do_eval(step + 1)
    flush()
    progress.close()
    ckpt.wait()
    ckpt.close()
    model = state.model()
    return dataclasses.replace(policy, model=model)


def _routed_mean(groups: Groups, name: str) -> float:
    """A reward's mean over the rows it applies to (0.0 when it is absent or applies to none)."""
    mean = routed_mean(groups.scores, groups.routed, name)
    return 0.0 if mean is None else mean
