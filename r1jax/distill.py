"""Distillation losses and steps: a student learns a teacher's next-token distributions.

Three ways to distill share r1jax's stages (recipes/distill.py chains them):
  traces     the teacher samples; its correct, well-formed completions become SFT data, kept as text so a student
             with another tokenizer can use them (`teacher_traces`, then r1jax.sft)
  logit      forward KL(teacher || student) at every trained position of the traces, over the full vocabulary
             or the teacher's top-k tokens (`logit_kd_step`)
  on_policy  the student samples, the teacher scores every position of the student's completions, and the loss
             is the per-token reverse KL(student || teacher) over the vocabulary (`on_policy_step`; the sampling
             and the loop are r1jax.rl's, with this step in place of the GRPO update)

The KL is taken one chunk of positions at a time from the two models' final hidden states and head weights, so no
B x T x V fp32 tensor exists at once (`chunked_kl`). Both logit modes need the student and the teacher to share one
vocabulary (`check_same_vocab`). The teacher's parameters enter the jitted steps as arguments, so they keep
whatever sharding they have on the mesh (the student's training layout or another).

Shapes: B rows, T positions, D width, V vocab (shared), k the teacher's top-k tokens.
"""
import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from r1jax import generate, rejection, train
from r1jax.model import HEAD_REMAT_BYTES, Transformer
from r1jax.rewards import RewardSet

Kind = Literal["forward", "reverse"]


@dataclasses.dataclass(frozen=True)
class KDConfig:
    """How the student is pulled toward the teacher (static: part of the jit cache key)."""

    top_k: int = 0  # forward KL over the teacher's top-k tokens, renormalised (0: the full vocabulary)
    temperature: float = 1.0  # both distributions are softmax(logits / temperature)
    ce_weight: float = 0.0  # logit mode: plus this times the next-token cross-entropy on the traces
    chunk: int = 256  # positions per head chunk

    def __post_init__(self):
        if self.top_k < 0 or self.chunk < 1 or self.ce_weight < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0: full vocabulary), chunk={self.chunk} >= 1 and "
                             f"ce_weight={self.ce_weight} >= 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")


def token_kl(s_logits_BxTxV, t_logits_BxTxV, *, kind: Kind, top_k: int = 0) -> jax.Array:
    """kl_BxT at each position from fp32 logits (the student's differentiable, the teacher's held fixed).

    "forward": KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v)). With `top_k` > 0 the sum runs over the
    teacher's k most likely tokens with the teacher renormalised over them (p~_t) and the student's full-vocabulary
    log-probs: sum_k p~_t (log p~_t - log p_s) >= 0, zero only when the student puts exactly p~_t on those tokens.
    "reverse": KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v)) (on-policy distillation; full vocabulary).
    """
    t_logits_BxTxV = jax.lax.stop_gradient(t_logits_BxTxV)
    logp_s = jax.nn.log_softmax(s_logits_BxTxV, axis=-1)
    if kind == "reverse":
        if top_k:
            raise ValueError("the reverse KL is over the full vocabulary (top_k applies to the forward KL)")
        logp_t = jax.nn.log_softmax(t_logits_BxTxV, axis=-1)
        return jnp.sum(jnp.exp(logp_s) * (logp_s - logp_t), axis=-1)
    if kind != "forward":
        raise ValueError(f"kind={kind!r}: choose 'forward' or 'reverse'")
    if top_k:
        t_top_BxTxk, idx_BxTxk = jax.lax.top_k(t_logits_BxTxV, top_k)
        logp_t = jax.nn.log_softmax(t_top_BxTxk, axis=-1)
        logp_s = jnp.take_along_axis(logp_s, idx_BxTxk, axis=-1)
    else:
        logp_t = jax.nn.log_softmax(t_logits_BxTxV, axis=-1)
    return jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)


def chunked_kl(h_s_BxTxD, w_s_DxV, h_t_BxTxD, w_t_DxV, targets_BxT, *, kind: Kind, top_k: int = 0,
               temperature: float = 1.0, chunk: int = 256) -> tuple[jax.Array, jax.Array]:
    """(kl_BxT, logp_BxT): `token_kl` between the student's head over `h_s` and the teacher's over `h_t`, and the
    student's log-prob of `targets`, one chunk of T at a time (the widths D of the two models may differ)."""
    B, T, _ = h_s_BxTxD.shape
    V = w_s_DxV.shape[1]
    if w_t_DxV.shape[1] != V:
        raise ValueError(f"the student's vocabulary has {V} tokens and the teacher's {w_t_DxV.shape[1]}: logit "
                         "distillation needs one shared vocabulary (use trace SFT for different tokenizers)")
    chunk = min(chunk, T)
    n = -(-T // chunk)

    def split(x):  # [B, T, ...] -> [n, B, chunk, ...], zero-padded
        x = jnp.pad(x, [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(B, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    w_s_DxV = w_s_DxV.astype(h_s_BxTxD.dtype)
    w_t_DxV = jax.lax.stop_gradient(w_t_DxV).astype(h_t_BxTxD.dtype)

    f32 = jnp.promote_types(h_s_BxTxD.dtype, jnp.float32)  # fp32 logits (fp64 where the inputs are)

    def one(args):
        h_s, h_t, tgt = args
        s = jnp.einsum("BTD,DV->BTV", h_s, w_s_DxV, preferred_element_type=f32) / temperature
        t = jnp.einsum("BTD,DV->BTV", jax.lax.stop_gradient(h_t), w_t_DxV, preferred_element_type=f32) / temperature
        logp = jnp.take_along_axis(s, tgt[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(s, axis=-1)
        return token_kl(s, t, kind=kind, top_k=top_k), logp

    if 2 * B * chunk * V * 4 > HEAD_REMAT_BYTES:  # two models' logits per chunk
        one = jax.checkpoint(one)
    kl_nxBxc, logp_nxBxc = jax.lax.map(one, (split(h_s_BxTxD), split(h_t_BxTxD), split(targets_BxT)))
    merge = lambda x: x.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]  # noqa: E731
    return merge(kl_nxBxc), merge(logp_nxBxc)


def check_same_vocab(student, teacher) -> None:
    """Logit and on-policy distillation compare distributions token by token: one vocabulary, one tokenizer.
    `student` and `teacher` are r1jax.run.Policy objects."""
    vs, vt = student.cfg.vocab_size, teacher.cfg.vocab_size
    probe = "Compute 8+7+3. <think> 8+7=15. 15+3=18. </think> <answer> 18 </answer> 你好"
    same = vs == vt and student.tokenizer.encode(probe) == teacher.tokenizer.encode(probe)
    if not same:
        raise ValueError(f"logit and on-policy distillation need the student and the teacher to share a tokenizer "
                         f"(vocabularies of {vs} and {vt} tokens, or another encoding of the same text); use "
                         "mode=sft (trace SFT stores text) or a student of the teacher's family")


@functools.partial(jax.jit, donate_argnames="state", static_argnames=("teacher_graphdef", "kd", "microbatches"))
def logit_kd_step(state: train.TrainState, teacher_graphdef: nnx.GraphDef, teacher_params: nnx.State,
                  batch: train.SFTBatch, *, kd: KDConfig, microbatches: int = 1):
    """One optimizer step of forward KL(teacher || student) (plus `kd.ce_weight` x cross-entropy) averaged over the
    trained positions of a batch of (packed) SFT rows: the traces. Microbatches accumulate exactly, as sft_step's."""
    normalizer = jnp.maximum(jnp.sum(train.sft_weight(batch)), 1).astype(jnp.float32)
    teacher = nnx.merge(teacher_graphdef, teacher_params)

    def loss_fn(params, b):
        student = nnx.merge(state.graphdef, params)
        h_t = jax.lax.stop_gradient(train.sft_hidden(teacher, b))
        kl, logp = chunked_kl(train.sft_hidden(student, b), student.head_weight_DxV(), h_t, teacher.head_weight_DxV(),
                              b.tokens_BxS[:, 1:], kind="forward", top_k=kd.top_k, temperature=kd.temperature,
                              chunk=kd.chunk)
        w = train.sft_weight(b)
        kl_sum = jnp.sum(jnp.where(w, kl, 0.0))
        ce_sum = -jnp.sum(jnp.where(w, logp, 0.0))
        return (kl_sum + kd.ce_weight * ce_sum) / normalizer, (kl_sum, ce_sum)

    def grad_fn(params, b):  # accumulate_grads sums the first output: carry the parts' sums inside it
        (loss, sums), g = jax.value_and_grad(loss_fn, has_aux=True)(params, b)
        return jnp.stack([loss, *sums]), g

    totals, grads = train.accumulate_grads(grad_fn, state.params, batch.replace(normalizer=None), microbatches)
    state, metrics = train.apply_grads(state, totals[0], grads)
    return state, {**metrics, "distill_kl": totals[1] / normalizer, "ce": totals[2] / normalizer}


@dataclasses.dataclass(frozen=True)
class OnPolicyHyper:
    """Static options of the on-policy step."""

    kd: KDConfig = KDConfig()
    minibatches: int = 1  # optimizer steps per batch of the student's samples
    microbatches: int = 1
    prompt_share: int = 1  # see train.completion_logprobs


@functools.partial(jax.jit, donate_argnames="state", static_argnames=("teacher_graphdef", "hp"))
def on_policy_step(state: train.TrainState, teacher_graphdef: nnx.GraphDef, teacher_params: nnx.State,
                   batch: train.RLBatch, *, hp: OnPolicyHyper):
    """`hp.minibatches` optimizer steps of the per-token reverse KL(student || teacher), averaged over every
    completion token of the student's own samples (`batch.completion_mask_BxT`; the advantages and log-probs in
    `batch` are not used). The teacher runs on the same rows, without gradient."""
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    B = batch.completion_BxT.shape[0]
    if B % (hp.minibatches * hp.microbatches * hp.prompt_share):
        raise ValueError(f"batch of {B} rows does not split into {hp.minibatches} x {hp.microbatches} parts of "
                         f"whole blocks of prompt_share={hp.prompt_share} rows")

    def hidden(model, b):
        return train.completion_hidden(model, b.prompt_BxTp, b.prompt_mask_BxTp, b.completion_BxT,
                                       b.completion_mask_BxT, share=hp.prompt_share)

    def minibatch(state, mb):
        normalizer = jnp.maximum(jnp.sum(mb.completion_mask_BxT), 1).astype(jnp.float32)

        def loss_fn(params, b):
            student = nnx.merge(state.graphdef, params)
            h_t = jax.lax.stop_gradient(hidden(teacher, b))
            kl, _ = chunked_kl(hidden(student, b), student.head_weight_DxV(), h_t, teacher.head_weight_DxV(),
                               b.completion_BxT, kind="reverse", temperature=hp.kd.temperature, chunk=hp.kd.chunk)
            return jnp.sum(jnp.where(b.completion_mask_BxT, kl, 0.0)) / normalizer

        loss, grads = train.accumulate_grads(jax.value_and_grad(loss_fn), state.params, mb, hp.microbatches,
                                             strided=False)  # whole prompt-share blocks
        return train.apply_grads(state, loss, grads)

    parts = jax.tree.map(lambda x: x.reshape(hp.minibatches, B // hp.minibatches, *x.shape[1:]), batch)
    state, metrics = jax.lax.scan(minibatch, state, parts)
    # The first minibatch's loss is the KL of the policy that sampled: the figure to watch.
    return state, {"loss": jnp.mean(metrics["loss"]), "distill_kl": metrics["loss"][0],
                   "grad_norm": jnp.mean(metrics["grad_norm"]),
                   "nonfinite_updates": jnp.sum(metrics["nonfinite_updates"])}


def teacher_parts(model: Transformer) -> tuple[nnx.GraphDef, nnx.State]:
    """The teacher as the steps take it: its graph (static) and its parameters (on their own shardings)."""
    return nnx.split(model)


def logit_kd_update(teacher: Transformer, kd: KDConfig, microbatches: int = 1):
    """`logit_kd_step` against `teacher` as r1jax.sft's `step_fn(state, batch)`."""
    graphdef, params = teacher_parts(teacher)
    return lambda state, batch: logit_kd_step(state, graphdef, params, batch, kd=kd, microbatches=microbatches)


def on_policy_update(teacher: Transformer, hp: OnPolicyHyper):
    """`on_policy_step` against `teacher` as r1jax.rl's `update(state, batch, key)`."""
    graphdef, params = teacher_parts(teacher)
    return lambda state, batch, key: on_policy_step(state, graphdef, params, batch, hp=hp)


# --- teacher traces ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TracesConfig:
    """The teacher's k samples per prompt (R1's sampling settings by default) and which of them are kept."""

    prompts: int = 0  # the first N prompts (0: all)
    generation: generate.GenerationConfig = generate.GenerationConfig()
    filter: rejection.RejectionConfig = rejection.RejectionConfig(keep_per_prompt=1)


TRACES_FILE = "traces.jsonl"


def trace_record(sample: dict, render: Callable[[str], str], teacher: str, settings: dict) -> dict:
    """A kept sample as an SFT pair in text (any tokenizer reads it): the rendered prompt and the completion, with
    the question, its answer and task, and who wrote it how."""
    return {"prompt": render(sample["prompt"]), "completion": sample["completion"], "question": sample["prompt"],
            "answer": sample.get("answer"), "task": sample["task"], "id": sample["id"], "sample": sample["sample"],
            "teacher": teacher, "settings": settings}


def teacher_traces(ctx, teacher, records: list[dict], *, name: str, cfg: TracesConfig, render: Callable[[str], str],
                   rewards: RewardSet, teacher_name: str) -> dict:
    """Sample `cfg.generation.samples` completions of every record with `teacher` (an r1jax.run.Policy), score
    them with `rewards`, keep those `cfg.filter` accepts (correct, well-formed, not over-long, not repeated, at
    most n per prompt) and write them to run_dir/<name>/traces.jsonl as `trace_record`s; stats.json beside it.

    Sampling is r1jax.generate's: sharded over processes (each decodes and scores its own rows), resumable after
    a stop, and incremental (records appended since the last run are sampled; the rest are read back). Returns
    the selection's statistics (r1jax.rejection.select), with "traces" and "path".
    """
    records = records[: cfg.prompts] if cfg.prompts else records
    result = generate.generate_samples(ctx, teacher, records, name=name, cfg=cfg.generation, render=render,
                                       rewards=rewards)
    kept, stats = rejection.select(result.samples, cfg.filter)
    if not kept:
        raise ValueError(f"{name}: the filter kept none of the teacher's {len(result.samples)} samples "
                         f"(dropped: {stats['total']['dropped']}); check the teacher, its template and the data")
    settings = {k: v for k, v in dataclasses.asdict(cfg.generation).items() if k != "batch_prompts"}
    stage_dir = ctx.stage_dir(name)
    path = os.path.join(stage_dir, TRACES_FILE)
    rejection.write_atomically(path, (json.dumps(trace_record(s, render, teacher_name, settings), ensure_ascii=False)
                                      + "\n" for s in kept))
    stats = {**stats, "teacher": teacher_name, "settings": settings, "prompts_too_long": result.too_long}
    rejection.write_stats(os.path.join(stage_dir, "stats.json"), stats)
    print(f"[r1jax] {name}: kept {stats['total']['kept']} of {stats['total']['samples']} teacher samples "
          f"({stats['total']['prompts_with_any_kept']} of {stats['total']['prompts']} prompts) in {path}\n"
          f"{rejection.describe(stats)}")
    return {**stats, "traces": len(kept), "path": path}
