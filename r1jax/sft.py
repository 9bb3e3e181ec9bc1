"""Supervised fine-tuning on streamed examples: the toy base model's pretraining, R1's cold start,
rejection-sampling SFT and distillation all use it.

`data` is one source, or a weighted mixture written as a list of (source, weight) tuples whose
weight is a number. A source is a .jsonl/.parquet path, folder or list of them (read lazily), a list
of record dicts (r1jax.sft_data: chat or prompt/completion), or a list of (prompt text, completion
text) tuples. Every process reads its own share, packs its own rows and places them on its devices.

Shapes: B rows, S sequence length.
"""
import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from r1jax import sharding, train
from r1jax.checkpoint import Checkpointer
from r1jax.metrics import MetricsLogger, Progress
from r1jax.packing import PackedBatches
from r1jax.run import NonFiniteError, Preempted
from r1jax.sft_data import ExampleStream, mixture
from r1jax.tokenizer import Tokenizer

ESTIMATE_EXAMPLES = 256  # examples read from each source to estimate examples per step (epochs > 0)
_BUCKET = 16  # unpacked batches are cut to their longest row rounded up to this many columns


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    steps: int = 1000  # optimizer steps; ignored when epochs > 0
    batch_size: int = 64  # global rows per optimizer step
    max_len: int = 512  # S: row length; longer examples keep their first S tokens
    microbatches: int = 1  # gradient accumulation inside a step (exact: same loss and gradient)
    pack: bool = True  # several examples per row (segment ids keep them apart); False: one per row
    # > 0: steps = ceil(epochs * records / examples per step), records summed over the sources (in a
    # mixture each is then drawn by its weight, not once per epoch), examples per step estimated by
    # packing the first ESTIMATE_EXAMPLES examples of each source as training will.
    epochs: float = 0.0
    optim: train.OptimConfig = train.OptimConfig(lr=1e-5, warmup_steps=50, schedule="cosine")
    log_every: int = 25
    checkpoint_every: int = 200
    checkpoint_keep: int = 2
    max_nonfinite_steps: int = 10  # updates in a row skipped for a NaN/inf loss or gradient before the run stops
    shuffle_window: int | None = 4096  # rows shuffled together (None: a global shuffle); see ExampleStream

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_len", "microbatches", "log_every", "checkpoint_every",
                     "checkpoint_keep", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not (math.isfinite(self.epochs) and self.epochs >= 0):
            raise ValueError(f"epochs={self.epochs} must be >= 0 (0: train for `steps` steps)")
        if self.shuffle_window is not None and self.shuffle_window < 1:
            raise ValueError(f"shuffle_window={self.shuffle_window} must be >= 1 (or None for a global shuffle)")

    def check_mesh(self, mesh) -> None:
        """Before any compute: each microbatch's rows split over the mesh's data and fsdp axes, and the
        batch over the processes (each packs its own rows)."""
        data, processes = mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count()
        if self.batch_size % (self.microbatches * data):
            raise ValueError(f"batch_size={self.batch_size} rows do not split into microbatches={self.microbatches} "
                             f"parts of a multiple of mesh data x fsdp = {data} devices; change one of them")
        if data % processes:
            raise ValueError(f"mesh data x fsdp = {data} devices do not split over {processes} processes, so the "
                             "processes cannot each feed their own rows; change the mesh")


Source = str | os.PathLike | Sequence[str] | Sequence[dict] | Sequence[tuple[str, str]]
Step = Callable[[train.TrainState, train.SFTBatch], tuple[train.TrainState, dict]]
Evaluation = Callable[..., None]  # evaluation(ctx, model, tokenizer, stage, step): samples and logs one eval record


def _weighted(item) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], int | float) \
        and not isinstance(item[1], bool)


def _records(source: Source):
    """What ExampleStream reads: paths as they are, (prompt, completion) tuples as records."""
    if isinstance(source, str | os.PathLike):
        return source
    items = list(source)
    if items and all(isinstance(x, tuple) for x in items):
        bad = next((x for x in items if len(x) != 2 or not all(isinstance(t, str) for t in x)), None)
        if bad is not None:
            raise ValueError(f"a pair is (prompt text, completion text); got {str(bad)[:120]}")
        return [{"prompt": p, "completion": c} for p, c in items]
    return items


def data_sources(data: Source | Sequence[tuple[Source, float]]) -> list[tuple[Source, float]]:
    """[(source, weight)]: a mixture when `data` is a list of (source, number) tuples, else one source."""
    if isinstance(data, list | tuple) and any(_weighted(d) for d in data):
        if not all(_weighted(d) for d in data):
            raise ValueError("a mixture is a list of (source, weight) tuples, every item of it; got "
                             f"{[type(d).__name__ for d in data][:10]}")
        return [(_records(s), float(w)) for s, w in data]
    return [(_records(data), 1.0)]


def _packer(sources: list, weights: list[float], cfg: SFTConfig, rows: int, seed: int, pad_id: int):
    source = sources[0] if len(sources) == 1 else mixture(list(zip(sources, weights)), seed)
    # Unpacked rows need no window: each example has its own row whatever comes next.
    return PackedBatches(source, seq_len=cfg.max_len, batch_size=rows, window_batches=4 if cfg.pack else 1,
                         pad_id=pad_id, pack=cfg.pack)


def sft_batches(data, tokenizer: Tokenizer, cfg: SFTConfig, *, seed: int) -> PackedBatches:
    """This process's batches (batch_size / process_count rows each) of its share of `data`."""
    sources = data_sources(data)
    streams = [ExampleStream(s, tokenizer, seed=seed + i, shuffle_window=cfg.shuffle_window)
               for i, (s, _) in enumerate(sources)]
    return _packer(streams, [w for _, w in sources], cfg, cfg.batch_size // jax.process_count(), seed,
                   tokenizer.pad_id)


class _Cycle:
    """A list of examples, endlessly: the epoch estimate packs it as training packs the streams."""

    def __init__(self, examples: list):
        self.examples, self.next = examples, itertools.cycle(examples).__next__

    def get_state(self) -> dict:  # the estimate never resumes
        return {}


def epoch_steps(data, tokenizer: Tokenizer, cfg: SFTConfig, *, seed: int) -> tuple[int, float, int]:
    """(steps, estimated records read per step, records) for `cfg.epochs` over `data` (see SFTConfig.epochs).

    Every process computes it alike from the whole data's first examples (each reads them itself), so
    all agree on the number of steps without talking.
    """
    sources, samples, records = data_sources(data), [], 0
    for i, (s, _) in enumerate(sources):
        stream = ExampleStream(s, tokenizer, seed=seed + i, shuffle_window=cfg.shuffle_window, process_index=0,
                               process_count=1, read_threads=0)
        samples.append(_Cycle([stream.next() for _ in range(min(ESTIMATE_EXAMPLES, stream.num_records))]))
        records += stream.num_records
    rows = cfg.batch_size // jax.process_count()
    packer = _packer(samples, [w for _, w in sources], cfg, rows, seed, tokenizer.pad_id)
    sampled, batches = sum(len(s.examples) for s in samples), 0
    while True:  # whole windows, so the count is exact: read = packed + dropped + the one carried
        for _ in range(packer.rows // rows):
            packer.next()
        batches += packer.rows // rows
        read = packer.stats.examples + packer.stats.dropped - 1
        if read >= sampled:
            break
    per_step = read / batches * jax.process_count()
    return max(1, math.ceil(cfg.epochs * records / per_step)), per_step, records


def _put_rows(x_local: np.ndarray, mesh) -> jax.Array:
    """This process's rows of the global batch onto the training shardings (rows over data and fsdp); on
    one process the same as sharding.put_rows of the whole batch."""
    shape = (x_local.shape[0] * jax.process_count(), *x_local.shape[1:])
    spec = sharding.logical_to_spec(("batch",) + (None,) * (x_local.ndim - 1), sharding.TRAIN_RULES, shape, mesh)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x_local, shape)


def device_batch(packed, mesh, pack: bool) -> train.SFTBatch:
    """The global SFTBatch from this process's Packed rows. Unpacked rows are cut to the longest row
    rounded up to 16 columns (fewer compiled shapes, less padding); on several processes they keep S,
    since every process would have to agree on the width."""
    width = packed.tokens_BxS.shape[1]
    if not pack and jax.process_count() == 1:
        width = min(-(-int(packed.mask_BxS.sum(axis=1).max()) // _BUCKET) * _BUCKET, width)
    put = lambda x: _put_rows(np.ascontiguousarray(x[:, :width]), mesh)  # noqa: E731
    if not pack:  # one example per row: the plain causal path, positions from the mask
        return train.SFTBatch(put(packed.tokens_BxS), put(packed.mask_BxS), put(packed.loss_mask_BxS))
    return train.SFTBatch(put(packed.tokens_BxS), put(packed.mask_BxS), put(packed.loss_mask_BxS),
                          segment_ids_BxS=put(packed.segment_ids_BxS), positions_BxS=put(packed.positions_BxS))


@jax.jit
def _batch_stats(batch: train.SFTBatch) -> dict:
    B = batch.tokens_BxS.shape[0]
    # A packed example's first token is never trained (packing clears it), so this is sft_step's count.
    examples = B if batch.segment_ids_BxS is None else jnp.sum(jnp.max(batch.segment_ids_BxS, axis=1))
    return {"trained_tokens": jnp.sum(batch.loss_mask_BxS), "examples": examples,
            "padding_share": 1.0 - jnp.mean(batch.mask_BxS)}


def sft_stage(ctx, policy, data, cfg: SFTConfig, *, name: str, seed: int, evaluation: Evaluation | None = None,
              evaluate_start: bool = False, step_fn: Step | None = None):
    """Train `policy` on `data` (see the module docstring) and return it; resumes from the stage's last
    checkpoint, which holds the train state and every process's data position.

    `step_fn(state, batch) -> (state, metrics)` replaces the cross-entropy step (logit distillation:
    r1jax.distill); its metrics must hold "loss", "grad_norm" and "nonfinite_updates".

    Per-step metrics go to the stage's own metrics.jsonl (run_dir/<name>/), so the run's main file holds
    the RL steps and evaluations that DESIGN.md's contract describes. `evaluation(ctx, model, tokenizer,
    name, step)` runs at the last step, and at step 0 with `evaluate_start`, unless the run already
    logged an evaluation for that step.
    """
    mesh, tok = ctx.mesh, policy.tokenizer
    cfg.check_mesh(mesh)
    batches = sft_batches(data, tok, cfg, seed=seed)
    steps = cfg.steps
    if cfg.epochs > 0:
        steps, per_step, records = epoch_steps(data, tok, cfg, seed=seed)
        if jax.process_index() == 0:
            print(f"[r1jax] {name}: epochs={cfg.epochs:g} of {records} records at ~{per_step:.1f} records per step "
                  f"(estimated from the first {ESTIMATE_EXAMPLES} of each source) -> {steps} steps")
    lrs = np.asarray(jax.vmap(train.lr_schedule(cfg.optim, steps))(jnp.arange(steps)))  # no device sync later
    policy.model.act_sharding = sharding.ActivationSharding(mesh, sharding.TRAIN_RULES)
    state = train.create_train_state(policy.model, train.make_optimizer(cfg.optim, steps))
    ckpt = Checkpointer(ctx.stage_dir(name) + "/checkpoints", keep=cfg.checkpoint_keep)
    start, last_saved, skipped, nonfinite_run = 0, None, 0, 0
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, extras = restored
        if len(extras["data"]) != jax.process_count():
            raise ValueError(f"{name}: the checkpoint holds the data positions of {len(extras['data'])} processes; "
                             f"this run has {jax.process_count()}, so it cannot resume the data exactly")
        batches.set_state(extras["data"][jax.process_index()])
        start = last_saved = extras["step"]
        skipped = extras["skipped"]
        print(f"[r1jax] {name}: resumed at step {start}")
    logger = MetricsLogger(ctx.stage_dir(name), validate=False, tensorboard=False, purge_step=start + 1)
    progress = Progress(total=steps, initial=start, desc=name, every=cfg.log_every)

    def save(step: int) -> None:
        nonlocal last_saved
        positions = sharding.allgather_json(batches.get_state())  # a collective: saves happen at the same steps
        ckpt.save(step, state, {"step": step, "data": positions, "skipped": skipped}, force=True)
        ckpt.raise_if_failed()
        last_saved = step

    def evaluate(step: int) -> None:
        if evaluation is None or step in ctx.evaluated_steps(name):
            return
        try:
            evaluation(ctx, state.model(), tok, name, step)
        except Preempted:  # stopped inside it: the steps done must not be lost
            if step > 0 and last_saved != step:
                save(step)
            ckpt.wait()
            raise

    def finish(step: int, metrics: dict, pack_counts: tuple[int, int]) -> None:
        """Read a step's metrics (a step late, so dispatch never waits on them), log them, count skips."""
        nonlocal skipped, nonfinite_run
        # Replicated scalars: this process's copy, no collective.
        values = {k: np.asarray(v.addressable_data(0)).item() for k, v in metrics.items()}
        bad = values["nonfinite_updates"]
        if step % cfg.log_every == 0 or step == steps:
            # Examples cut to S or left out, so far in the stage, over all processes.
            truncated, dropped = np.sum(sharding.allgather_json(pack_counts), axis=0).tolist()
            record = {"step": step, "stage": name, "lr": float(lrs[step - 1 - skipped]), **values,
                      "pack_truncated": truncated, "pack_dropped": dropped}
            logger.log_step(record)
            progress.update(step, record)
        skipped, nonfinite_run = skipped + bad, nonfinite_run + 1 if bad else 0
        if nonfinite_run >= cfg.max_nonfinite_steps:
            ckpt.wait()
            raise NonFiniteError(name, f"the last {nonfinite_run} updates", step, last_saved, ckpt.directory)

    if evaluate_start and start == 0:
        evaluate(0)
    pending = None
    for step in range(start, steps):
        batch = device_batch(batches.next(), mesh, cfg.pack)
        pack_counts = (batches.stats.truncated, batches.stats.dropped)
        if step_fn is None:
            state, metrics = train.sft_step(state, batch, microbatches=cfg.microbatches)
        else:
            state, metrics = step_fn(state, batch)
        metrics = {**metrics, **_batch_stats(batch)}
        if pending is not None:
            finish(*pending)
        pending = (step + 1, metrics, pack_counts)
        stopping = ctx.stop.stop_everywhere()
        # The last step is saved too: a stop during the final evaluation must not cost the stage's training.
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps or stopping:
            finish(*pending)  # saving waits for this step anyway; its skip count goes into the checkpoint
            pending = None
            save(step + 1)
        if stopping:
            ckpt.wait()
            progress.close()
            logger.close()
            raise Preempted(f"{name}: stopped by signal at step {step + 1}; re-run the command to resume")
    if pending is not None:
        finish(*pending)
    progress.close()
    logger.close()
    evaluate(steps)
    ckpt.wait()
    ckpt.close()
    return dataclasses.replace(policy, model=state.model())
