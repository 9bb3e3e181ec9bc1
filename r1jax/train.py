"""Train steps as pure jitted functions: the optimizer, SFT and GRPO updates, log-probs.

Shapes: B rows (P prompts x G completions), Tp prompt length, T completion length,
S = Tp + T, D width, V vocab.
"""
import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from r1jax import grpo
from r1jax.model import Transformer, chunked_logprobs, positions_from_mask


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-6
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    else:
        after = optax.cosine_decay_schedule(cfg.lr, max(total_steps - cfg.warmup_steps, 1), alpha=cfg.min_lr_ratio)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay),
    )


@struct.dataclass
class TrainState:
    step: jax.Array  # optimizer updates applied so far
    params: nnx.State
    opt_state: Any
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.params)


def create_train_state(model: Transformer, tx: optax.GradientTransformation) -> TrainState:
    """Optimizer state created on the parameters' shardings (Adam moments mirror them)."""
    graphdef, params = nnx.split(model)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    treedef = jax.tree.structure(params)
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    replicated = NamedSharding(mesh, PartitionSpec())

    def shard_like(node):
        if jax.tree.structure(node) == treedef:
            return param_shardings
        return replicated

    abstract = jax.eval_shape(tx.init, params)
    shardings = jax.tree.map(shard_like, abstract, is_leaf=lambda n: jax.tree.structure(n) == treedef)
    opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    return TrainState(step=step, params=params, opt_state=opt_state, graphdef=graphdef, tx=tx)


def completion_logprobs(model: Transformer, prompt_BxTp, prompt_mask_BxTp, completion_BxT,
                        completion_mask_BxT, *, temperature: float = 1.0, chunk: int = 256):
    """(logp_BxT, entropy_BxT) of the completion tokens given their prompts.

    One forward over prompt+completion; the head runs only on the positions that
    predict completion tokens, in chunks (never a full fp32 BxSxV logits tensor).
    """
    tokens_BxS = jnp.concatenate([prompt_BxTp, completion_BxT], axis=1)
    mask_BxS = jnp.concatenate([prompt_mask_BxTp, completion_mask_BxT], axis=1)
    h_BxSxD, _ = model.hidden(tokens_BxS, positions_from_mask(mask_BxS), mask_BxS)
    Tp = prompt_BxTp.shape[1]
    h_BxTxD = h_BxSxD[:, Tp - 1 : -1]
    return chunked_logprobs(h_BxTxD, model.head_weight_DxV(), completion_BxT,
                            temperature=temperature, chunk=chunk)


@struct.dataclass
class RLBatch:
    prompt_BxTp: jax.Array
    prompt_mask_BxTp: jax.Array
    completion_BxT: jax.Array
    completion_mask_BxT: jax.Array  # tokens that enter the loss
    old_logp_BxT: jax.Array
    ref_logp_BxT: jax.Array | None
    adv_B: jax.Array


@dataclasses.dataclass(frozen=True)
class RLHyper:
    """Static options of the GRPO update (hashable: part of the jit cache key)."""

    mu: int = 1  # inner epochs over each batch of rollouts
    minibatches: int = 1  # optimizer steps per epoch
    microbatches: int = 1  # gradient accumulation within a minibatch
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    aggregation: str = "seq_mean_token_mean"
    max_len: int | None = None
    importance: str = "token"
    temperature: float = 1.0
    logprob_chunk: int = 256


def _split(x, n):
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])


@functools.partial(jax.jit, static_argnames="hp", donate_argnames="state")
def rl_update(state: TrainState, batch: RLBatch, key: jax.Array, hp: RLHyper):
    """`mu` epochs x `minibatches` optimizer steps over one batch of rollouts.

    Each minibatch's gradient is accumulated over `microbatches` parts, each
    normalised by the whole minibatch's loss denominator, so the accumulated loss and
    gradient equal the minibatch's exactly. Rows are reshuffled every epoch.
    """
    B = batch.adv_B.shape[0]
    if B % (hp.minibatches * hp.microbatches):
        raise ValueError(f"batch of {B} rows does not split into {hp.minibatches} x {hp.microbatches}")

    def loss_fn(params, mb, normalizer):
        model = nnx.merge(state.graphdef, params)
        logp_BxT, entropy_BxT = completion_logprobs(
            model, mb.prompt_BxTp, mb.prompt_mask_BxTp, mb.completion_BxT, mb.completion_mask_BxT,
            temperature=hp.temperature, chunk=hp.logprob_chunk)
        loss, aux = grpo.grpo_loss(
            logp_BxT, mb.old_logp_BxT, mb.ref_logp_BxT, mb.adv_B, mb.completion_mask_BxT,
            clip_low=hp.clip_low, clip_high=hp.clip_high, kl_coef=hp.kl_coef, kl_kind=hp.kl_kind,
            aggregation=hp.aggregation, max_len=hp.max_len, importance=hp.importance,
            normalizer=normalizer)
        mask = mb.completion_mask_BxT
        gap_BxT = jnp.where(mask, jnp.abs(logp_BxT - mb.old_logp_BxT), 0.0)
        stats = {
            "entropy_sum": jnp.sum(jnp.where(mask, entropy_BxT, 0.0)),
            "gap_sum": jnp.sum(gap_BxT),
            "gap_max": jnp.max(gap_BxT),
            "tokens": jnp.sum(mask),
        }
        return loss, (aux, stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def minibatch_step(state, mb):
        normalizer = grpo.loss_denominator(mb.completion_mask_BxT, hp.aggregation)
        micro = jax.tree.map(lambda x: _split(x, hp.microbatches), mb)

        def micro_step(grads, part):
            (loss, (aux, stats)), g = grad_fn(state.params, part, normalizer)
            return jax.tree.map(jnp.add, grads, g), (loss, aux, stats)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, (losses, auxes, stats) = jax.lax.scan(micro_step, zeros, micro)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {
            "loss": jnp.sum(losses),
            "grad_norm": optax.tree.norm(grads),
            # Token means of the parts, weighted by their token counts: the minibatch's exact means.
            **{name: jnp.sum(getattr(auxes, field) * auxes.valid_tokens) / jnp.maximum(jnp.sum(auxes.valid_tokens), 1)
               for name, field in (("clip_low_frac", "clip_low_frac"), ("clip_high_frac", "clip_high_frac"),
                                   ("ratio_mean", "ratio_mean"), ("kl", "kl_mean"))},
            **{k: (jnp.max(v) if k == "gap_max" else jnp.sum(v)) for k, v in stats.items()},
        }
        return new_state, metrics

    def epoch(state, epoch_key):
        perm = jax.random.permutation(epoch_key, B)
        shuffled = jax.tree.map(lambda x: _split(x[perm], hp.minibatches), batch)
        return jax.lax.scan(minibatch_step, state, shuffled)

    state, metrics = jax.lax.scan(epoch, state, jax.random.split(key, hp.mu))
    # metrics: [mu, minibatches]. The sampler/trainer gap is read before any update.
    first = jax.tree.map(lambda x: x[0, 0], metrics)
    out = {k: jnp.mean(v) for k, v in metrics.items() if k not in ("entropy_sum", "gap_sum", "gap_max", "tokens")}
    out["kl"] = first["kl"] if hp.kl_coef else out["kl"]
    tokens = jnp.maximum(first["tokens"], 1)
    out.update(entropy=first["entropy_sum"] / tokens, logp_gap_mean=first["gap_sum"] / tokens,
               logp_gap_max=first["gap_max"], ratio_mean_last=jnp.mean(metrics["ratio_mean"][-1]),
               clip_frac_last=jnp.mean(metrics["clip_low_frac"][-1] + metrics["clip_high_frac"][-1]))
    return state, out


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "chunk"))
def rollout_logprobs(graphdef, params, prompt_BxTp, prompt_mask_BxTp, completion_BxT, completion_mask_BxT,
                     *, temperature: float, chunk: int = 256):
    """Log-probs of sampled completions under `params` (reference model, or recomputed old policy)."""
    model = nnx.merge(graphdef, params)
    logp_BxT, _ = completion_logprobs(model, prompt_BxTp, prompt_mask_BxTp, completion_BxT,
                                      completion_mask_BxT, temperature=temperature, chunk=chunk)
    return logp_BxT


@struct.dataclass
class SFTBatch:
    tokens_BxS: jax.Array
    mask_BxS: jax.Array  # real tokens (prompt and completion)
    loss_mask_BxS: jax.Array  # tokens whose prediction is trained (the completion)
    # The loss is sum(token losses) / normalizer: the dataset's mean trained tokens per row
    # times B, not this batch's count, so every token weighs the same in expectation even
    # when batches are grouped by length (a per-batch mean would overweight short rows).
    normalizer: jax.Array


@functools.partial(jax.jit, donate_argnames="state", static_argnames="chunk")
def sft_step(state: TrainState, batch: SFTBatch, chunk: int = 256):
    """One optimizer step of next-token cross-entropy over the trained tokens."""

    def loss_fn(params):
        model = nnx.merge(state.graphdef, params)
        inputs, mask = batch.tokens_BxS[:, :-1], batch.mask_BxS[:, :-1]
        h_BxSxD, _ = model.hidden(inputs, positions_from_mask(mask), mask)
        logp_BxS, _ = chunked_logprobs(h_BxSxD, model.head_weight_DxV(), batch.tokens_BxS[:, 1:], chunk=chunk)
        weight = batch.loss_mask_BxS[:, 1:]
        return -jnp.sum(jnp.where(weight, logp_BxS, 0.0)) / batch.normalizer

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
