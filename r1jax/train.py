"""Train steps as pure jitted functions: the optimizer, SFT and GRPO updates, log-probs.

Shapes: B rows (P prompts x G completions), Tp prompt length, T completion length,
S = Tp + T, D width, V vocab.
"""
import dataclasses
import functools
import math
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


@functools.lru_cache(maxsize=32)
def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Cached: the transformation is a static field of TrainState, so the same settings must give the
    same object, or every stage (and every resume in one process) would compile its steps again."""
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


def completion_hidden(model: Transformer, prompt_BxTp, prompt_mask_BxTp, completion_BxT, completion_mask_BxT, *,
                      share: int = 1) -> jax.Array:
    """h_BxTxD: the final hidden state at each position that predicts a completion token (the prompt's last
    column, then every completion column but the last), from one forward over prompt+completion.

    `share` > 1: every block of `share` consecutive rows has the same prompt (GRPO's groups, prompt-major),
    and each prompt runs once for its block (`Transformer.hidden_shared_prompt`); same result, less work.
    """
    Tp = prompt_BxTp.shape[1]
    if share > 1:
        B = completion_BxT.shape[0]
        first = lambda x: x.reshape(B // share, share, *x.shape[1:])[:, 0]  # noqa: E731
        h_QxTpxD, h_BxTxD = model.hidden_shared_prompt(first(prompt_BxTp), first(prompt_mask_BxTp),
                                                       completion_BxT, completion_mask_BxT, share)
        # The prompt's last column (a real token: left padding) predicts the first completion token.
        return jnp.concatenate([jnp.repeat(h_QxTpxD[:, -1:], share, axis=0), h_BxTxD[:, :-1]], axis=1)
    tokens_BxS = jnp.concatenate([prompt_BxTp, completion_BxT], axis=1)
    mask_BxS = jnp.concatenate([prompt_mask_BxTp, completion_mask_BxT], axis=1)
    h_BxSxD, _ = model.hidden(tokens_BxS, positions_from_mask(mask_BxS), mask_BxS)
    return h_BxSxD[:, Tp - 1 : -1]


def completion_logprobs(model: Transformer, prompt_BxTp, prompt_mask_BxTp, completion_BxT,
                        completion_mask_BxT, *, temperature: float = 1.0, chunk: int = 256, share: int = 1):
    """(logp_BxT, entropy_BxT) of the completion tokens given their (left-padded) prompts.

    One forward over prompt+completion (`completion_hidden`, `share` as there); the head runs only on the
    positions that predict completion tokens, in chunks (never a full fp32 BxSxV logits tensor).
    """
    h_BxTxD = completion_hidden(model, prompt_BxTp, prompt_mask_BxTp, completion_BxT, completion_mask_BxT,
                                share=share)
    return chunked_logprobs(h_BxTxD, model.head_weight_DxV(), completion_BxT,
                            temperature=temperature, chunk=chunk)


def prompt_share(group_size: int, rows_per_shard: int) -> int:
    """How many consecutive rows of a prompt-major batch (groups of `group_size` rows) can share one prompt
    forward when each device holds `rows_per_shard` consecutive rows: the largest block that divides both,
    so no block straddles two devices or two groups."""
    return math.gcd(group_size, rows_per_shard)


@struct.dataclass
class RLBatch:
    prompt_BxTp: jax.Array
    prompt_mask_BxTp: jax.Array
    completion_BxT: jax.Array
    completion_mask_BxT: jax.Array  # tokens that enter the loss
    old_logp_BxT: jax.Array
    ref_logp_BxT: jax.Array | None
    adv_B: jax.Array
    is_weights_BxT: jax.Array | None = None  # per-token importance weights on the surrogate (grpo.tis_weights)


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
    dual_clip: float | None = None
    log_ratio_clamp: float = grpo.LOG_RATIO_CLAMP
    loss_type: str = "ppo"  # "ppo" (clipped surrogate) or "cispo" (clipped, stop-gradient IS weights)
    # > 1: blocks of this many consecutive rows share their prompt (`completion_logprobs`); epochs then
    # shuffle whole blocks, so every microbatch holds whole blocks.
    prompt_share: int = 1


def apply_if_finite(state: TrainState, grads, loss, grad_norm) -> tuple[TrainState, jax.Array]:
    """One optimizer step, or none when the loss or the gradient is not finite.

    A skipped step leaves params, optimizer moments and the step count as they were, so a
    single bad batch (an overflow, a NaN reward that slipped through) costs one update, not
    the run; the caller counts skips and stops after too many in a row.
    """
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    return state.replace(step=state.step + finite.astype(state.step.dtype), params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state)), finite


def apply_grads(state: TrainState, loss, grads) -> tuple[TrainState, dict]:
    """`apply_if_finite` with the step's metrics: loss, gradient norm, and 1 if the update was skipped."""
    grad_norm = optax.tree.norm(grads)
    state, finite = apply_if_finite(state, grads, loss, grad_norm)
    return state, {"loss": loss, "grad_norm": grad_norm, "nonfinite_updates": (~finite).astype(jnp.int32)}


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
    if B % (hp.minibatches * hp.microbatches * hp.prompt_share):
        raise ValueError(f"batch of {B} rows does not split into {hp.minibatches} x {hp.microbatches} parts of "
                         f"whole blocks of prompt_share={hp.prompt_share} rows")

    def loss_fn(params, mb, normalizer):
        model = nnx.merge(state.graphdef, params)
        logp_BxT, entropy_BxT = completion_logprobs(
            model, mb.prompt_BxTp, mb.prompt_mask_BxTp, mb.completion_BxT, mb.completion_mask_BxT,
            temperature=hp.temperature, chunk=hp.logprob_chunk, share=hp.prompt_share)
        loss, aux = grpo.grpo_loss(
            logp_BxT, mb.old_logp_BxT, mb.ref_logp_BxT, mb.adv_B, mb.completion_mask_BxT,
            clip_low=hp.clip_low, clip_high=hp.clip_high, kl_coef=hp.kl_coef, kl_kind=hp.kl_kind,
            aggregation=hp.aggregation, max_len=hp.max_len, importance=hp.importance,
            dual_clip=hp.dual_clip, log_ratio_clamp=hp.log_ratio_clamp, normalizer=normalizer,
            loss_type=hp.loss_type, is_weights_BxT=mb.is_weights_BxT)
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
        loss, grad_norm = jnp.sum(losses), optax.tree.norm(grads)
        new_state, finite = apply_if_finite(state, grads, loss, grad_norm)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "nonfinite_updates": (~finite).astype(jnp.int32),
            # Token means of the parts, weighted by their token counts: the minibatch's exact means.
            **{name: jnp.sum(getattr(auxes, field) * auxes.valid_tokens) / jnp.maximum(jnp.sum(auxes.valid_tokens), 1)
               for name, field in (("clip_low_frac", "clip_low_frac"), ("clip_high_frac", "clip_high_frac"),
                                   ("ratio_mean", "ratio_mean"), ("kl", "kl_mean"))},
            **{k: (jnp.max(v) if k == "gap_max" else jnp.sum(v)) for k, v in stats.items()},
        }
        return new_state, metrics

    def epoch(state, epoch_key):
        blocks = jax.random.permutation(epoch_key, B // hp.prompt_share)
        perm = (blocks[:, None] * hp.prompt_share + jnp.arange(hp.prompt_share)).reshape(-1)
        shuffled = jax.tree.map(lambda x: _split(x[perm], hp.minibatches), batch)
        return jax.lax.scan(minibatch_step, state, shuffled)

    state, metrics = jax.lax.scan(epoch, state, jax.random.split(key, hp.mu))
    # metrics: [mu, minibatches]. The sampler/trainer gap is read before any update.
    first = jax.tree.map(lambda x: x[0, 0], metrics)
    out = {k: jnp.mean(v) for k, v in metrics.items()
           if k not in ("entropy_sum", "gap_sum", "gap_max", "tokens", "nonfinite_updates")}
    out["nonfinite_updates"] = jnp.sum(metrics["nonfinite_updates"])
    out["kl"] = first["kl"] if hp.kl_coef else out["kl"]
    tokens = jnp.maximum(first["tokens"], 1)
    out.update(entropy=first["entropy_sum"] / tokens, logp_gap_mean=first["gap_sum"] / tokens,
               logp_gap_max=first["gap_max"], ratio_mean_last=jnp.mean(metrics["ratio_mean"][-1]),
               clip_frac_last=jnp.mean(metrics["clip_low_frac"][-1] + metrics["clip_high_frac"][-1]))
    return state, out


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "chunk", "share"))
def rollout_logprobs(graphdef, params, prompt_BxTp, prompt_mask_BxTp, completion_BxT, completion_mask_BxT,
                     *, temperature: float, chunk: int = 256, share: int = 1):
    """Log-probs of sampled completions under `params` (reference model, or recomputed old policy); `share` as
    in `completion_logprobs`."""
    model = nnx.merge(graphdef, params)
    logp_BxT, _ = completion_logprobs(model, prompt_BxTp, prompt_mask_BxTp, completion_BxT,
                                      completion_mask_BxT, temperature=temperature, chunk=chunk, share=share)
    return logp_BxT


@struct.dataclass
class SFTBatch:
    tokens_BxS: jax.Array
    mask_BxS: jax.Array  # real tokens (prompt and completion)
    loss_mask_BxS: jax.Array  # tokens whose prediction is trained (the completion)
    # The loss is sum(token losses) / normalizer: the dataset's mean trained tokens per row
    # times B, not this batch's count, so every token weighs the same in expectation even
    # when batches are grouped by length (a per-batch mean would overweight short rows).
    # None: this batch's own count of trained tokens, what packed batches use (their rows
    # hold about the same number of tokens each).
    normalizer: jax.Array | None = None
    # Packed rows (r1jax.packing): 0 on padding, 1..n for a row's examples, each attending only
    # to itself; positions restart at each example (derived from the segment ids when None).
    segment_ids_BxS: jax.Array | None = None
    positions_BxS: jax.Array | None = None


def sft_weight(batch: SFTBatch) -> jax.Array:
    """w_BxS': the positions whose next token is trained (targets are tokens[:, 1:]; a packed example's first
    token is never predicted)."""
    w_BxS = batch.loss_mask_BxS[:, 1:]
    if batch.segment_ids_BxS is not None:
        w_BxS = w_BxS & (batch.segment_ids_BxS[:, 1:] == batch.segment_ids_BxS[:, :-1])
    return w_BxS


def sft_hidden(model: Transformer, batch: SFTBatch) -> jax.Array:
    """h_BxS'xD: the final hidden state at each position but the last (each predicts the token after it)."""
    inputs, mask = batch.tokens_BxS[:, :-1], batch.mask_BxS[:, :-1]
    if batch.segment_ids_BxS is None:
        segments, positions = None, positions_from_mask(mask)
    else:  # without positions, hidden() restarts them at each segment
        segments = batch.segment_ids_BxS[:, :-1]
        positions = None if batch.positions_BxS is None else batch.positions_BxS[:, :-1]
    h_BxSxD, _ = model.hidden(inputs, positions, mask, segment_ids_BxT=segments)
    return h_BxSxD


def accumulate_grads(grad_fn, params, batch, microbatches: int, *, strided: bool = True):
    """(loss, grads) of `grad_fn(params, part) -> (loss, grads)` summed over `microbatches` parts of `batch`;
    each part's loss must already be divided by the whole batch's normalizer, so the sums equal the one-pass loss
    and gradient. Strided parts (part j holds rows j, j + n, j + 2n, ...) keep each device's rows on it;
    `strided=False` takes consecutive rows (blocks of rows sharing a prompt stay whole)."""
    if microbatches == 1:
        return grad_fn(params, batch)
    B = jax.tree.leaves(batch)[0].shape[0]
    if strided:
        split = lambda x: x.reshape(B // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731
    else:
        split = lambda x: _split(x, microbatches)  # noqa: E731

    def add(carry, part):
        loss, g = grad_fn(params, part)
        return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], g)), None

    parts = jax.tree.map(split, batch)
    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], parts))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (loss, grads), _ = jax.lax.scan(add, zeros, parts)
    return loss, grads


@functools.partial(jax.jit, donate_argnames="state", static_argnames=("chunk", "microbatches"))
def sft_step(state: TrainState, batch: SFTBatch, chunk: int = 256, microbatches: int = 1):
    """One optimizer step of next-token cross-entropy over the trained tokens.

    With `microbatches` > 1 the gradient is accumulated over that many parts of the batch
    (part j holds rows j, j + n, j + 2n, ..., so each device keeps its own rows), each part's
    loss divided by the whole batch's normalizer: the sum equals the one-pass loss and gradient.
    """
    B = batch.tokens_BxS.shape[0]
    if B % microbatches:
        raise ValueError(f"batch of {B} rows does not split into {microbatches} microbatches")

    normalizer = batch.normalizer
    if normalizer is None:
        normalizer = jnp.maximum(jnp.sum(sft_weight(batch)), 1).astype(jnp.float32)

    def loss_fn(params, b):
        model = nnx.merge(state.graphdef, params)
        logp_BxS, _ = chunked_logprobs(sft_hidden(model, b), model.head_weight_DxV(), b.tokens_BxS[:, 1:],
                                       chunk=chunk)
        return -jnp.sum(jnp.where(sft_weight(b), logp_BxS, 0.0)) / normalizer

    loss, grads = accumulate_grads(jax.value_and_grad(loss_fn), state.params, batch.replace(normalizer=None),
                                   microbatches)
    return apply_grads(state, loss, grads)
