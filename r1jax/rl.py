"""The GRPO stage: sample groups, reward them, and update the policy, with a reference
model, periodic evaluation, metrics and exact-resume checkpoints.

Shapes: P prompts per step, G completions per prompt, B = P*G rows, Tp prompt
length, T completion length.
"""
import dataclasses
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
from r1jax.evaluate import EvalConfig, evaluate
from r1jax.metrics import Progress
from r1jax.rewards import RewardSet
from r1jax.run import Context, NonFiniteError, Policy, Preempted


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
    mask_truncated: bool = False  # drop completions that hit max_new_tokens from the loss
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_len: int = 512
    max_new_tokens: int = 1024
    dual_clip: float | None = None  # > 1 caps a negative-advantage token's loss at -dual_clip * A (verl's clip_ratio_c)
    log_ratio_clamp: float = grpo.LOG_RATIO_CLAMP  # |logp - old_logp| is clamped to this before exp
    logprob_chunk: int = 256
    checkpoint_every: int = 50
    checkpoint_keep: int = 3
    log_samples_every: int = 10
    max_nonfinite_steps: int = 3  # steps in a row whose updates were all skipped (NaN/inf) before the run stops

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
        if not 0 < self.top_p <= 1 or self.top_k < 0 or self.log_samples_every < 0:
            raise ValueError("top_p must be in (0, 1], top_k >= 0 and log_samples_every >= 0")

    def check_mesh(self, mesh) -> None:
        """Before any compute (and after every override: it relates several settings): the batch must split
        into minibatches x microbatches, and each microbatch's rows over the mesh's data and fsdp axes."""
        rows, parts = self.prompts_per_step * self.group_size, self.minibatches * self.microbatches
        data = mesh.shape["data"] * mesh.shape["fsdp"]
        if rows % (parts * data):
            raise ValueError(f"rl.prompts_per_step x rl.group_size = {rows} rows do not split into rl.minibatches "
                             f"x rl.microbatches = {parts} parts of a multiple of mesh data x fsdp = {data} devices; "
                             "change one of them")

    def hyper(self) -> train.RLHyper:
        return train.RLHyper(
            mu=self.mu, minibatches=self.minibatches, microbatches=self.microbatches,
            clip_low=self.clip_low, clip_high=self.clip_high, kl_coef=self.kl_coef, kl_kind=self.kl_kind,
            aggregation=self.aggregation, importance=self.importance, temperature=self.temperature,
            max_len=self.max_new_tokens if self.aggregation == "seq_mean_token_sum_norm" else None,
            logprob_chunk=self.logprob_chunk, dual_clip=self.dual_clip, log_ratio_clamp=self.log_ratio_clamp)


def _sampling_model(state: train.TrainState, mesh) -> "nnx.Module":
    """The policy on the sampling rules' shardings (weights replicated over fsdp)."""
    model = sharding.reshard(state.model(), mesh, sharding.SAMPLE_RULES)
    model.act_sharding = sharding.ActivationSharding(mesh, sharding.SAMPLE_RULES)
    return model


def grpo_stage(ctx: Context, policy: Policy, *, name: str, cfg: RLConfig, eval_cfg: EvalConfig,
               train_records: list[dict], eval_records: list[dict], rewards: RewardSet,
               render: Callable[[str], str]) -> Policy:
    """Run `cfg.steps` GRPO steps from `policy`; resumes from the stage's last readable checkpoint.

    Evaluations run at step 0, every `eval_cfg.every` steps and at the end (none when `every` is 0 or
    there are no eval records); one that a stop or a crash cut short runs again on resume. SIGTERM is
    polled between steps, evaluation batches and decode segments; the loop saves and leaves.
    """
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
        pad_id=tok.pad_id)

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

    evaluating = eval_cfg.every > 0 and len(eval_records) > 0
    if not evaluating and start == 0:
        print(f"[r1jax] {name}: evaluation is off " + ("(eval.every=0)" if eval_records else "(no eval records)"))

    def eval_due(step: int) -> bool:
        return evaluating and (step in (0, cfg.steps) or step % eval_cfg.every == 0)

    def do_eval(step: int) -> None:
        try:
            metrics, samples = evaluate(_sampling_model(state, mesh), eval_records, render, tok, eval_cfg, scfg,
                                        jax.random.fold_in(jax.random.key(ctx.seed + 1), step), poll=ctx.poll)
        except Preempted:
            keep_progress(step, stream.get_state())
            raise
        ctx.logger.log_eval({"step": step, "stage": name, **metrics})
        ctx.logger.log_samples(step, name, [{**s, "kind": "eval"} for s in samples])

    if eval_due(start) and start not in ctx.evaluated_steps(name):
        do_eval(start)
    hp = cfg.hyper()
    progress = Progress(total=cfg.steps, initial=start, desc=name)
    nonfinite_run = 0  # steps in a row whose every update was skipped
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        data_state = stream.get_state()
        records, prompts, too_long = rollout.take_prompts(stream.take, P, render, tok, cfg.max_prompt_len)
        step_key = jax.random.fold_in(key, step)
        try:
            out = sampler.generate(_sampling_model(state, mesh), prompts, jax.random.fold_in(step_key, 0), scfg,
                                   poll=ctx.poll)
        except Preempted:
            keep_progress(step, data_state)
            raise
        tokens, mask, truncated = map(sharding.host_array, (out.tokens_BxT, out.mask_BxT, out.truncated_B))
        t1 = time.perf_counter()

        texts = tok.decode_batch([t[m] for t, m in zip(tokens, mask)])
        examples = [r for r in records for _ in range(G)]
        reward_out = rollout.score(rewards, texts, examples)
        rewards_B = np.asarray(reward_out.total_B, np.float32)
        adv_B = np.asarray(grpo.group_advantages(rewards_B, G, scale=cfg.adv_scale))
        t2 = time.perf_counter()

        loss_mask = mask & ~truncated[:, None] if cfg.mask_truncated else mask
        put = lambda x: sharding.put_rows(x, mesh, sharding.TRAIN_RULES)  # noqa: E731
        prompt_BxTp, prompt_mask_BxTp = put(out.prompt_tokens_BxT), put(out.prompt_mask_BxT)
        completion_BxT, loss_mask_BxT = put(out.tokens_BxT), put(loss_mask)
        old_logp = put(out.logp_BxT)
        if cfg.recompute_old_logp:
            old_logp = train.rollout_logprobs(state.graphdef, state.params, prompt_BxTp, prompt_mask_BxTp,
                                              completion_BxT, loss_mask_BxT, temperature=cfg.temperature,
                                              chunk=cfg.logprob_chunk)
        ref_logp = None
        if use_ref:
            ref_logp = train.rollout_logprobs(state.graphdef, ref_params, prompt_BxTp, prompt_mask_BxTp,
                                              completion_BxT, loss_mask_BxT, temperature=cfg.temperature,
                                              chunk=cfg.logprob_chunk)
        batch = train.RLBatch(prompt_BxTp, prompt_mask_BxTp, completion_BxT, loss_mask_BxT, old_logp, ref_logp,
                              put(adv_B))
        lr = float(schedule(int(sharding.host_array(state.step))))
        state, update_metrics = train.rl_update(state, batch, jax.random.fold_in(step_key, 1), hp)
        update_metrics = jax.tree.map(sharding.host_array, update_metrics)
        t3 = time.perf_counter()

        if use_ref and (step + 1) % cfg.ref_reset_every == 0:
            ref_params = jax.tree.map(jnp.copy, state.params)
        lengths = mask.sum(axis=1)
        record = {
            "step": step + 1, "stage": name,
            "reward_mean": float(rewards_B.mean()), "reward_std": float(rewards_B.std()),
            "accuracy": float(np.mean(reward_out.scores["accuracy"])) if "accuracy" in reward_out.scores else 0.0,
            "format_rate": float(np.mean(reward_out.scores["format"])) if "format" in reward_out.scores else 0.0,
            "completion_len_mean": float(lengths.mean()), "completion_len_max": int(lengths.max()),
            "truncation_rate": float(truncated.mean()),
            "zero_spread_groups": float(grpo.zero_spread_fraction(rewards_B, G)),
            "prompts_too_long": too_long,
            "lr": lr,
            **{k: float(v) for k, v in update_metrics.items()},
            **{f"reward/{k}": float(v) for k, v in reward_out.metrics.items()},
            "time_sample_s": t1 - t0, "time_reward_s": t2 - t1, "time_train_s": t3 - t2,
            "tokens_per_s": float(lengths.sum() / max(t3 - t0, 1e-9)),
        }
        if not use_ref:
            record["kl"] = 0.0
        ctx.logger.log_step(record)
        progress.update(step + 1, record)
        if cfg.log_samples_every and (step + 1) % cfg.log_samples_every == 0:
            ctx.logger.log_samples(step + 1, name, [
                {"prompt": examples[i]["prompt"], "completion": texts[i], "reward": float(rewards_B[i])}
                for i in range(0, len(texts), G)][:4])
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
