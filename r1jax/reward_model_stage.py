"""Training a reward model on preference pairs (Bradley-Terry), starting from a policy's weights: how the
embedded default gets the helpfulness and harmlessness judges of R1's last RL stage.

Shapes: B pairs per step, S tokens per text, D width.
"""
import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import numpy as np
from flax import nnx

from r1jax import sharding, train
from r1jax.checkpoint import Checkpointer
from r1jax.metrics import MetricsLogger, Progress
from r1jax.reward_model import (PreferenceBatch, RewardModel, Scorer, bucket_len, encode_for_scoring, render_plain,
                                reward_inputs, rm_step, save_reward_model)
from r1jax.rewards.template import R1_TAGS, Tags
from r1jax.run import NonFiniteError, Preempted

SAMPLES_SHOWN = 4  # rendered training pairs written to the stage's samples.jsonl, to see what the RM reads


@dataclasses.dataclass(frozen=True)
class RMConfig:
    steps: int = 200
    batch_size: int = 16  # pairs per step (each step scores 2 * batch_size texts)
    max_len: int = 256  # tokens per text; a longer one keeps its END, as the Scorer reads it
    optim: train.OptimConfig = train.OptimConfig(lr=1e-5, warmup_steps=10, schedule="cosine")
    log_every: int = 10
    checkpoint_every: int = 100
    eval_pairs: int = 0  # the last pairs given, held out; their accuracy is logged at the end (0: none)
    max_nonfinite_steps: int = 10  # updates in a row skipped for a NaN/inf loss or gradient before the run stops

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_len < 2:
            raise ValueError(f"max_len={self.max_len} must be >= 2 (BOS and one token of text)")
        if self.eval_pairs < 0:
            raise ValueError(f"eval_pairs={self.eval_pairs} must be >= 0")


def reward_model_from_policy(policy, mesh: jax.sharding.Mesh, seed: int) -> RewardModel:
    """A RewardModel whose backbone is a copy of `policy.model`'s weights (its LM head, if untied, dropped:
    a reward model has none) and whose score head is freshly initialised from `seed`, on the training
    shardings. A copy, not a view: the train step donates the RM's buffers, and the policy must outlive it."""
    act = sharding.ActivationSharding(mesh, sharding.TRAIN_RULES)
    make = lambda: RewardModel(policy.cfg, rngs=nnx.Rngs(seed), act_sharding=act,  # noqa: E731
                               pad_token_id=policy.tokenizer.pad_id)
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = sharding.state_shardings(abstract, mesh, sharding.TRAIN_RULES)
    source = nnx.state(policy.model)

    def fill(key_path, var, target):
        path = tuple(k.key for k in key_path)
        if path == ("score",):  # only the head survives jit's dead-code elimination of the full init
            return var.replace(value=jax.jit(lambda: make().score.get_value(), out_shardings=target)())
        node = source
        for key in path[1:]:
            node = node[key]
        value, want = node.get_value(), var.get_value()
        if (value.shape, value.dtype) != (want.shape, want.dtype):
            raise ValueError(f"policy weight {'.'.join(map(str, path[1:]))} is {value.dtype}{list(value.shape)}; "
                             f"a reward model of policy.cfg ({policy.cfg.name}) wants {want.dtype}{list(want.shape)}")
        return var.replace(value=jax.device_put(value, target, may_alias=False))

    state = jax.tree_util.tree_map_with_path(fill, abstract, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


class PairBatches:
    """Deterministic shuffled epochs of `batch_size` pair indices (the last partial batch of an epoch is
    dropped); the position is (epoch, batch index), so a resume continues mid-epoch."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise ValueError(f"{n} training pairs cannot fill a batch of {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._batches(0)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng((self.seed, epoch)).permutation(self.n)
        return [order[i:i + self.batch_size] for i in range(0, self.n - self.batch_size + 1, self.batch_size)]

    def next(self) -> np.ndarray:
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._batches(self.epoch)
        self.index += 1
        return self._order[self.index - 1]

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._batches(self.epoch)


def preference_batch(chosen: Sequence[list[int]], rejected: Sequence[list[int]], pad_id: int, mesh, *,
                     max_len: int, min_len: int = 16) -> PreferenceBatch:
    """Token rows left-padded (as the Scorer pads them) to one width for chosen and rejected alike, so
    `rm_step` scores both in one forward; rows over the data and fsdp axes."""
    S = bucket_len(max(map(len, [*chosen, *rejected])), min_len=min(min_len, max_len), max_len=max_len)

    def pad(rows):
        tokens_BxS = np.full((len(rows), S), pad_id, np.int32)
        mask_BxS = np.zeros((len(rows), S), bool)
        for i, row in enumerate(rows):
            tokens_BxS[i, S - len(row):], mask_BxS[i, S - len(row):] = row, True
        return tokens_BxS, mask_BxS

    arrays = (*pad(chosen), *pad(rejected))
    return PreferenceBatch(*(sharding.put_rows(a, mesh, sharding.TRAIN_RULES) for a in arrays))


def _bt_numbers(chosen_B: np.ndarray, rejected_B: np.ndarray) -> dict:
    diff_B = chosen_B.astype(np.float64) - rejected_B
    return {"heldout_loss": float(np.mean(np.logaddexp(0.0, -diff_B))), "heldout_accuracy": float(np.mean(diff_B > 0)),
            "heldout_margin": float(np.mean(diff_B)), "heldout_pairs": int(len(diff_B))}


def reward_model_stage(ctx, policy, pairs: list[dict], cfg: RMConfig, *, name: str,
                       view: Literal["answer", "full"] = "full", render: Callable[[str, str], str] = render_plain,
                       tags: Tags = R1_TAGS, out_dir: str | None = None) -> str:
    """Train a reward model from `policy`'s weights on `pairs` ({"prompt", "chosen", "rejected"}, the
    responses as the policy writes them), save it with the tokenizer as an HF folder in `out_dir`
    (default `ctx.final_dir(name)`) and return that path. Resumes from the stage's last checkpoint.

    Each response is shown to the model as `as_reward(scorer, view, render=render, tags=tags)` will show
    it when scoring (view="answer": the final answer only; "full": the whole response). The last
    `cfg.eval_pairs` pairs are held out; their accuracy, loss and margin, scored through a `Scorer` (the
    path the RL stage uses), are logged at the end. Per-step losses and the held-out numbers go to the
    stage's own metrics.jsonl (run_dir/<name>/), a few rendered pairs to its samples.jsonl.
    """
    for i, pair in enumerate(pairs):
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(pair.get(k), str)]
        if missing:
            raise ValueError(f"{name}: preference pair {i} lacks string field(s) {missing}")
    if cfg.eval_pairs >= len(pairs):
        raise ValueError(f"{name}: eval_pairs={cfg.eval_pairs} leaves none of the {len(pairs)} pairs to train on")
    mesh, tokenizer = ctx.mesh, policy.tokenizer
    prompts = [p["prompt"] for p in pairs]
    chosen_texts = reward_inputs(prompts, [p["chosen"] for p in pairs], view, render=render, tags=tags)
    rejected_texts = reward_inputs(prompts, [p["rejected"] for p in pairs], view, render=render, tags=tags)
    n_train = len(pairs) - cfg.eval_pairs
    chosen_rows = encode_for_scoring(tokenizer, chosen_texts[:n_train], cfg.max_len)
    rejected_rows = encode_for_scoring(tokenizer, rejected_texts[:n_train], cfg.max_len)
    batches = PairBatches(n_train, cfg.batch_size, ctx.seed)

    state = train.create_train_state(reward_model_from_policy(policy, mesh, ctx.seed),
                                      train.make_optimizer(cfg.optim, cfg.steps))
    ckpt = Checkpointer(ctx.stage_dir(name) + "/checkpoints", keep=2)
    start, last_saved = 0, None
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, extras = restored
        batches.set_state(extras["data"])
        start = last_saved = extras["step"]
    # From scratch, purge everything an attempt killed before its first checkpoint logged (samples at step 0).
    logger = MetricsLogger(ctx.stage_dir(name), validate=False, tensorboard=False,
                           enabled=jax.process_index() == 0, purge_step=start + 1 if start else 0)
    if start == 0:
        logger.log_samples(0, name, [{"prompt": prompts[i], "chosen": chosen_texts[i], "rejected": rejected_texts[i]}
                                     for i in range(min(SAMPLES_SHOWN, n_train))])
    progress = Progress(total=cfg.steps, initial=start, desc=name, every=cfg.log_every)
    nonfinite_run, pending = 0, None
    for step in range(start, cfg.steps):
        idx = batches.next()
        batch = preference_batch([chosen_rows[i] for i in idx], [rejected_rows[i] for i in idx], tokenizer.pad_id,
                                 mesh, max_len=cfg.max_len)
        state, metrics = rm_step(state, batch)
        # The previous step's skip flag is read a step late, so dispatch never waits on it.
        if pending is not None:
            nonfinite_run = nonfinite_run + 1 if int(pending[1]) else 0
            if nonfinite_run >= cfg.max_nonfinite_steps:
                ckpt.close()
                logger.close()
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
            ckpt.close()
            logger.close()
            progress.close()
            raise Preempted(f"{name}: stopped by signal at step {step + 1}; re-run the command to resume")
    progress.close()
    ckpt.close()

    rm = state.model()
    if cfg.eval_pairs:
        scorer = Scorer(rm, tokenizer, mesh, cfg.batch_size, cfg.max_len)
        numbers = _bt_numbers(scorer(chosen_texts[n_train:]), scorer(rejected_texts[n_train:]))
        logger.log_eval({"step": cfg.steps, "stage": name, **numbers})
        if jax.process_index() == 0:
            print(f"[r1jax] {name}: held-out pair accuracy {numbers['heldout_accuracy']:.1%} "
                  f"over {numbers['heldout_pairs']} pairs, loss {numbers['heldout_loss']:.4f}", flush=True)
    logger.close()
    path = ctx.final_dir(name) if out_dir is None else out_dir
    save_reward_model(policy.cfg, rm, path, tokenizer=tokenizer)
    return path
