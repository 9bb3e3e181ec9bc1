"""Supervised fine-tuning on (prompt, completion) text pairs: the toy base model's
pretraining, R1's cold start, rejection-sampling SFT and distillation all use it.

Shapes: B rows, S sequence length.
"""
import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from r1jax import sharding, train
from r1jax.checkpoint import Checkpointer
from r1jax.metrics import MetricsLogger, Progress
from r1jax.run import NonFiniteError, Preempted
from r1jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    steps: int = 1000
    batch_size: int = 64
    max_len: int = 512
    optim: train.OptimConfig = train.OptimConfig(lr=1e-5, warmup_steps=50, schedule="cosine")
    log_every: int = 25
    checkpoint_every: int = 200
    max_nonfinite_steps: int = 10  # updates in a row skipped for a NaN/inf loss or gradient before the run stops

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_len", "log_every", "checkpoint_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def tokenize_pairs(pairs: list[tuple[str, str]], tokenizer: Tokenizer, max_len: int):
    """Right-padded (tokens, mask, loss_mask) arrays [n, max_len]: prompt, completion, EOS;
    the loss covers the completion and its EOS. Longer rows keep their start."""
    n = len(pairs)
    tokens = np.full((n, max_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((n, max_len), bool)
    loss_mask = np.zeros((n, max_len), bool)
    prompts = tokenizer.encode_batch([p for p, _ in pairs], add_bos=True)
    completions = tokenizer.encode_batch([c for _, c in pairs])
    for i, (p, c) in enumerate(zip(prompts, completions)):
        row = (p + c + [tokenizer.eos_id])[:max_len]
        tokens[i, : len(row)] = row
        mask[i, : len(row)] = True
        loss_mask[i, len(p) : len(row)] = True
    return tokens, mask, loss_mask


class SFTBatches:
    """Deterministic epochs of shuffled batches; the position is (epoch, batch index).

    Each batch is cut to its longest row rounded up to `bucket` columns, so short
    batches cost less and only max_len / bucket programs are compiled. (Rows are not
    grouped by length: that saves more compute but makes batches of one kind of row,
    which slowed the toy model's learning markedly.)
    """

    def __init__(self, arrays: tuple[np.ndarray, ...], batch_size: int, seed: int, bucket: int = 16):
        self.arrays, self.batch_size, self.seed, self.bucket = arrays, batch_size, seed, bucket
        self.lengths = arrays[1].sum(axis=1)
        self.normalizer = float(batch_size * arrays[2].sum() / len(arrays[2]))
        if len(self.lengths) < batch_size:
            raise ValueError(f"{len(self.lengths)} rows cannot fill a batch of {batch_size}")
        self.epoch, self.index = 0, 0
        self._order = self._batches(0)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.lengths))
        return [order[i : i + self.batch_size] for i in range(0, len(order) - self.batch_size + 1, self.batch_size)]

    def next(self) -> tuple[np.ndarray, ...]:
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._batches(self.epoch)
        rows = self._order[self.index]
        self.index += 1
        width = min(-(-int(self.lengths[rows].max()) // self.bucket) * self.bucket, self.arrays[0].shape[1])
        return tuple(a[rows, :width] for a in self.arrays)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._batches(self.epoch)


def to_device_batch(arrays: tuple[np.ndarray, ...], normalizer: float, mesh) -> train.SFTBatch:
    """Rows over the data and fsdp axes (replicated where they do not divide)."""
    tokens, mask, loss_mask = (sharding.put_rows(a, mesh, sharding.TRAIN_RULES) for a in arrays)
    norm = sharding.put_global(np.float32(normalizer), NamedSharding(mesh, PartitionSpec()))
    return train.SFTBatch(tokens_BxS=tokens, mask_BxS=mask, loss_mask_BxS=loss_mask, normalizer=norm)


def sft_stage(ctx, policy, pairs: list[tuple[str, str]], cfg: SFTConfig, *, name: str, seed: int):
    """`cfg.steps` optimizer steps over `pairs`; resumes from the stage's last checkpoint.

    Per-step losses go to the stage's own metrics.jsonl (run_dir/<name>/), so the run's
    main file holds the RL steps and evaluations that DESIGN.md's contract describes.
    """
    mesh = ctx.mesh
    policy.model.act_sharding = sharding.ActivationSharding(mesh, sharding.TRAIN_RULES)
    state = train.create_train_state(policy.model, train.make_optimizer(cfg.optim, cfg.steps))
    batches = SFTBatches(tokenize_pairs(pairs, policy.tokenizer, cfg.max_len), cfg.batch_size, seed)
    ckpt = Checkpointer(ctx.stage_dir(name) + "/checkpoints", keep=2)
    start, last_saved = 0, None
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, extras = restored
        batches.set_state(extras["data"])
        start = last_saved = extras["step"]
    logger = MetricsLogger(ctx.stage_dir(name), validate=False, tensorboard=False,
                           enabled=jax.process_index() == 0, purge_step=start + 1)
    progress = Progress(total=cfg.steps, initial=start, desc=name, every=cfg.log_every)
    nonfinite_run, pending = 0, None
    for step in range(start, cfg.steps):
        state, metrics = train.sft_step(state, to_device_batch(batches.next(), batches.normalizer, mesh))
        # The previous step's skip flag is read a step late, so dispatch never waits on it.
        if pending is not None:
            nonfinite_run = nonfinite_run + 1 if int(pending[1]) else 0
            if nonfinite_run >= cfg.max_nonfinite_steps:
                ckpt.wait()
                raise NonFiniteError(name, f"the last {nonfinite_run} updates", pending[0], last_saved,
                                     ckpt.directory)
        pending = (step + 1, metrics["nonfinite_updates"])
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            record = {"step": step + 1, "stage": name, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
            logger.log_step(record)
            progress.update(step + 1, record)
        stopping = ctx.stop.stop_everywhere()
        if (step + 1) % cfg.checkpoint_every == 0 or stopping:
            ckpt.save(step + 1, state, {"step": step + 1, "data": batches.get_state()}, force=True)
            ckpt.raise_if_failed()
            last_saved = step + 1
        if stopping:
            ckpt.wait()
            raise Preempted(f"{name}: stopped by signal at step {step + 1}; re-run the command to resume")
    progress.close()
    logger.close()
    ckpt.wait()
    ckpt.close()
    return dataclasses.replace(policy, model=state.model())
