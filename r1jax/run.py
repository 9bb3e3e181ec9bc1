"""Running a recipe: the run directory, the policy handed from stage to stage, and
resumption (finished stages are skipped; the current one continues from its checkpoint).
"""
import dataclasses
import json
import os
from collections.abc import Callable

import jax
from jax.sharding import Mesh

from r1jax import hf, sharding
from r1jax.checkpoint import graceful_sigterm
from r1jax.metrics import MetricsLogger, evaluated_steps
from r1jax.model import ModelConfig, Transformer, create_model
from r1jax.tokenizer import Tokenizer, load_tokenizer


@dataclasses.dataclass
class Policy:
    """What flows between stages: the model, its config and its tokenizer."""

    cfg: ModelConfig
    model: Transformer
    tokenizer: Tokenizer


@dataclasses.dataclass
class Context:
    run_dir: str
    mesh: Mesh
    seed: int
    logger: MetricsLogger
    stop: graceful_sigterm
    model_overrides: dict  # dtype / remat settings applied to every loaded model

    def poll(self) -> None:
        """Raise Preempted when any process got SIGTERM. A collective: long loops (evaluation batches,
        decode segments, generation) call it at the same points on every process."""
        if self.stop.stop_everywhere():
            raise Preempted("stopped by signal; re-run the command to resume")

    def evaluated_steps(self, stage: str) -> set[int]:
        """Steps of `stage` whose evaluation is in metrics.jsonl, as process 0 reads it (every process
        must agree on whether to run an evaluation: it is a collective)."""
        steps = sorted(evaluated_steps(self.run_dir, stage)) if jax.process_index() == 0 else []
        return set(sharding.allgather_json(steps)[0])

    def stage_dir(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def final_dir(self, name: str) -> str:
        return os.path.join(self.run_dir, name, "final")


Stage = Callable[[Context, "Policy | None"], "Policy | None"]


class Preempted(Exception):
    """A stage saved a checkpoint and stopped early (SIGTERM); the run resumes later."""


class NonFiniteError(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient; the last good checkpoint is kept."""

    def __init__(self, stage: str, what: str, step: int, last_saved: int | None, directory: str):
        kept = (f"The last good checkpoint, step {last_saved}, is kept in {directory}." if last_saved is not None
                else "No checkpoint was saved.")
        super().__init__(f"{stage}: {what} had a non-finite loss or gradient and were skipped (step {step}); "
                         f"stopping. {kept} Lower the learning rate or check the rewards and data.")


def load_policy(path_or_preset: str, ctx: Context, tokenizer_path: str = "") -> Policy:
    """An HF folder (weights + tokenizer) or a preset name (random weights)."""
    if os.path.isdir(path_or_preset):
        cfg, model = hf.load_hf(path_or_preset, ctx.model_overrides.get("param_dtype", "float32"), mesh=ctx.mesh)
        cfg = cfg.replace(**{k: v for k, v in ctx.model_overrides.items() if k != "param_dtype"})
        model.cfg = cfg
        tokenizer = load_tokenizer(tokenizer_path or path_or_preset)
        return Policy(cfg, model, tokenizer)
    cfg = ModelConfig.preset(path_or_preset).replace(**ctx.model_overrides)
    if not tokenizer_path:
        raise ValueError(f"model={path_or_preset!r} is a preset with random weights; set tokenizer=PATH")
    return Policy(cfg, create_model(cfg, mesh=ctx.mesh, seed=ctx.seed), load_tokenizer(tokenizer_path))


def save_policy(policy: Policy, path: str) -> None:
    hf.save_hf(policy.cfg, policy.model, path, tokenizer=policy.tokenizer)


def run_stages(ctx: Context, stages: list[tuple[str, Stage]]) -> Policy | None:
    """Run each named stage in order; a stage recorded as done in run_dir/stages.json is
    skipped, and the next one starts from its saved final policy."""
    record_path = os.path.join(ctx.run_dir, "stages.json")
    done = []
    if os.path.exists(record_path):
        with open(record_path) as f:
            done = json.load(f)["done"]
    policy = None
    for i, (name, stage) in enumerate(stages):
        if name in done:
            following = [n for n, _ in stages[i + 1 :]]
            if following and following[0] not in done:
                print(f"[r1jax] stage {name}: done, loading {ctx.final_dir(name)}")
                policy = load_policy(ctx.final_dir(name), ctx)
            continue
        print(f"[r1jax] stage {name}: starting")
        policy = stage(ctx, policy)
        save_policy(policy, ctx.final_dir(name))
        done.append(name)
        if jax.process_index() == 0:
            with open(record_path, "w") as f:
                json.dump({"done": done}, f)
    return policy


def make_context(run_dir: str, mesh_cfg: sharding.MeshConfig, seed: int, model_overrides: dict,
                 stop: graceful_sigterm) -> Context:
    sharding.initialize_distributed()
    os.makedirs(run_dir, exist_ok=True)
    logger = MetricsLogger(run_dir, enabled=jax.process_index() == 0)
    return Context(run_dir=run_dir, mesh=mesh_cfg.make(), seed=seed, logger=logger, stop=stop,
                   model_overrides=model_overrides)
