"""Running a recipe, once for all recipes: the run dir, the resolved config, SIGTERM, the
policy handed from stage to stage, resumption (finished stages are skipped; the current one
continues from its checkpoint), `start_at=<stage>`, and the final table, plot and paths.

A recipe module is its config (a `RunConfig` subclass), `PRESETS` and `stages(cfg)`; optionally
`evaluation(cfg)` (what `python -m r1jax eval` measures) and `table(cfg, evals, seconds)` (the final table, from
the run's eval records and each stage's wall time).
"""
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable

import jax
from jax.sharding import Mesh

from r1jax import config as config_lib
from r1jax import hf, sharding
from r1jax.checkpoint import CheckpointError, graceful_sigterm
from r1jax.metrics import MetricsLogger, evaluated_steps, metrics_table, plot_run, read_metrics, stage_table
from r1jax.model import ModelConfig, Transformer, create_model
from r1jax.tokenizer import Tokenizer, load_tokenizer

STAGES_FILE = "stages.json"


@dataclasses.dataclass
class Policy:
    """What flows between stages: the model, its config and its tokenizer."""

    cfg: ModelConfig
    model: Transformer
    tokenizer: Tokenizer


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The settings every recipe has; a recipe's config subclasses this."""

    run_dir: str = "runs/run"
    seed: int = 0
    start_at: str = ""  # re-run from this stage on, from the previous stages' kept outputs (once per run dir)
    param_dtype: str = "float32"
    dtype: str = "auto"
    remat: str = "none"
    scan_layers: bool = True  # false: unrolled layers (faster on CPU; compile time grows with depth)
    mesh: sharding.MeshConfig = sharding.MeshConfig()

    def model_overrides(self) -> dict:
        return {"param_dtype": self.param_dtype, "dtype": self.dtype, "remat": self.remat,
                "scan_layers": self.scan_layers}


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


StageFn = Callable[[Context, "Policy | None"], "Policy | None"]
PREVIOUS = "<previous>"


@dataclasses.dataclass(frozen=True)
class Stage:
    """`fn(ctx, policy) -> policy`. `start_from`: the stage whose output `policy` is (the previous one by
    default; None: no input). `fn` may return None: its output is then its input (a stage that writes a
    dataset). `keep=False` marks a cheap loader (e.g. of an HF folder): never recorded, run again when a
    later stage needs its output, and its policy is not copied into the run dir."""

    name: str
    fn: StageFn
    start_from: str | None = PREVIOUS
    keep: bool = True


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


def _as_stage(item) -> Stage:
    return item if isinstance(item, Stage) else Stage(*item)


def _input_names(stages: list[Stage]) -> dict[str, str | None]:
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique: {names}")
    inputs = {}
    for i, s in enumerate(stages):
        src = (names[i - 1] if i else None) if s.start_from == PREVIOUS else s.start_from
        if src is not None and src not in names[:i]:
            raise ValueError(f"stage {s.name} starts from {src!r}, which is not an earlier stage of {names}")
        inputs[s.name] = src
    return inputs


def _write_record(ctx: Context, record: dict) -> None:
    if jax.process_index() == 0:
        tmp = os.path.join(ctx.run_dir, STAGES_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, os.path.join(ctx.run_dir, STAGES_FILE))


def _apply_start_at(ctx: Context, stages: list[Stage], record: dict, start_at: str) -> None:
    """Forget `start_at` and every later stage (their folders are moved aside, their metrics purged)."""
    names = [s.name for s in stages]
    if start_at not in names:
        raise ValueError(f"start_at={start_at!r}: the stages are {', '.join(names)}")
    i = names.index(start_at)
    missing = [s.name for s in stages[:i] if s.keep and s.name not in record["done"]]
    if missing:
        raise ValueError(f"start_at={start_at}: the earlier stage(s) {', '.join(missing)} have not finished in "
                         f"{ctx.run_dir}; run the recipe without start_at first")
    if jax.process_index() == 0:
        for name in names[i:]:
            path = ctx.stage_dir(name)
            if os.path.exists(path):
                n = 1
                while os.path.exists(f"{path}.replaced-{n}"):
                    n += 1
                os.replace(path, f"{path}.replaced-{n}")
                print(f"[r1jax] start_at={start_at}: moved {path} to {path}.replaced-{n}")
    for name in names[i:]:
        ctx.logger.purge(name, -1)
    record["done"] = [n for n in record["done"] if n in names[:i]]
    record["outputs"] = {n: v for n, v in record["outputs"].items() if n in names[:i]}
    record["seconds"] = {n: v for n, v in record.get("seconds", {}).items() if n in names[:i]}
    record["start_at"] = start_at
    _write_record(ctx, record)
    sharding.allgather_json(None)  # every process waits for the moves


def _add_seconds(ctx: Context, record: dict, name: str, seconds: float) -> None:
    """A stage's wall time, summed over the attempts that ran it (loading its input included), in stages.json."""
    seconds_by_stage = record.setdefault("seconds", {})
    seconds_by_stage[name] = seconds_by_stage.get(name, 0.0) + seconds
    _write_record(ctx, record)


def stage_seconds(run_dir: str) -> dict[str, float]:
    """Each stage's wall time as `run_stages` recorded it ({} for a run without the record)."""
    path = os.path.join(run_dir, STAGES_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f).get("seconds", {})


def run_stages(ctx: Context, stages: list, start_at: str = "") -> Policy | None:
    """Run each stage in order; a stage recorded as done in run_dir/stages.json is skipped, and a stage's
    input is loaded from the kept output of the stage it starts from. `start_at` is applied once per
    run dir (it is recorded): re-running the same command resumes instead of starting over again."""
    stages = [_as_stage(s) for s in stages]
    inputs = _input_names(stages)
    by_name = {s.name: s for s in stages}
    path = os.path.join(ctx.run_dir, STAGES_FILE)
    record = {"done": [], "outputs": {}, "start_at": ""}
    if os.path.exists(path):
        with open(path) as f:
            record.update(json.load(f))
    if start_at and record["start_at"] != start_at:
        _apply_start_at(ctx, stages, record, start_at)
    outputs: dict[str, Policy | None] = {}

    def output_of(name: str | None) -> Policy | None:
        if name is None:
            return None
        if name not in outputs:
            stage = by_name[name]
            if not stage.keep:
                outputs[name] = stage.fn(ctx, output_of(inputs[name]))
            elif record["outputs"].get(name) == "final":
                print(f"[r1jax] stage {name}: done, loading {ctx.final_dir(name)}")
                outputs[name] = load_policy(ctx.final_dir(name), ctx)
            else:
                outputs[name] = output_of(inputs[name])
        return outputs[name]

    last = None
    for i, stage in enumerate(stages):
        if not stage.keep or stage.name in record["done"]:
            continue
        print(f"[r1jax] stage {stage.name}: starting")
        started = time.monotonic()
        try:
            policy = output_of(inputs[stage.name])
            out = stage.fn(ctx, policy)
        finally:  # a stopped (or failed) attempt's time counts too
            _add_seconds(ctx, record, stage.name, time.monotonic() - started)
        if out is None:
            record["outputs"][stage.name] = "input"
            out = policy
        else:
            # A stage that trained its input donated the input's buffers: a later stage starting from the
            # same output gets it again from disk (or from its loader).
            outputs.pop(inputs[stage.name], None)
            save_policy(out, ctx.final_dir(stage.name))
            record["outputs"][stage.name] = "final"
        outputs[stage.name] = last = out
        record["done"].append(stage.name)
        _write_record(ctx, record)
        # Drop policies no later stage starts from (a real model's weights are large).
        wanted = {inputs[s.name] for s in stages[i + 1:]}
        for name in [n for n in outputs if n not in wanted]:
            del outputs[name]
    return last


def make_context(run_dir: str, mesh_cfg: sharding.MeshConfig, seed: int, model_overrides: dict,
                 stop: graceful_sigterm, *, log: bool = True) -> Context:
    """`log=False`: nothing is written to the run's metrics (an evaluation of a finished run adds nothing)."""
    sharding.initialize_distributed()
    os.makedirs(run_dir, exist_ok=True)
    logger = MetricsLogger(run_dir, enabled=log and jax.process_index() == 0)
    return Context(run_dir=run_dir, mesh=mesh_cfg.make(), seed=seed, logger=logger, stop=stop,
                   model_overrides=model_overrides)


def _check_mesh(cfg, mesh) -> None:
    """Every nested setting that relates itself to the mesh (`check_mesh`) is checked before any compute."""
    if hasattr(cfg, "check_mesh"):
        cfg.check_mesh(mesh)
    if dataclasses.is_dataclass(cfg):
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if dataclasses.is_dataclass(value):
                _check_mesh(value, mesh)


def train(recipe, cfg: RunConfig, *, stop=None) -> int:
    """Run (or resume) a recipe's stages. `stop`: an object whose `stop_everywhere()` says when to
    checkpoint and leave; by default SIGTERM sets it (TPU preemption). 0 when finished or stopped
    cleanly, 1 on a run-stopping error (non-finite updates, an unwritable checkpoint)."""
    with contextlib.ExitStack() as scope:
        stop = stop if stop is not None else scope.enter_context(graceful_sigterm())
        ctx = make_context(cfg.run_dir, cfg.mesh, cfg.seed, cfg.model_overrides(), stop)
        _check_mesh(cfg, ctx.mesh)
        print(f"[r1jax] run dir: {os.path.abspath(cfg.run_dir)}")
        print("[r1jax] resolved config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in config_lib.flatten(cfg).items()))
        if jax.process_index() == 0:
            with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
                f.write(config_lib.to_json(cfg))
        stages = [_as_stage(s) for s in recipe.stages(cfg)]
        try:
            run_stages(ctx, stages, cfg.start_at)
        except Preempted as e:
            print(f"[r1jax] {e}")
            return 0
        except (NonFiniteError, CheckpointError) as e:
            print(f"[r1jax] error: {e}", file=sys.stderr)
            return 1
        finally:
            ctx.logger.close()
    if jax.process_index() == 0:
        metrics_path = os.path.join(cfg.run_dir, "metrics.jsonl")
        records = read_metrics(metrics_path)
        if records:  # a run of SFT stages only, without evaluations, logs nothing here
            plot_run(metrics_path, os.path.join(cfg.run_dir, "reward.png"))
        evals = [r for r in records if r.get("kind") == "eval"]
        names = [s.name for s in stages]
        if not evals:
            print("[r1jax] no evaluations were run (eval.every=0 or no eval data)")
        elif hasattr(recipe, "table"):  # a recipe may print its own comparison
            print(recipe.table(cfg, evals, stage_seconds(cfg.run_dir)))
        else:
            print(stage_table(evals, names))
        finals = [s.name for s in stages if s.keep and os.path.isdir(ctx.final_dir(s.name))]
        if finals:
            print(f"[r1jax] final checkpoint: {os.path.abspath(ctx.final_dir(finals[-1]))}")
        print(f"[r1jax] run dir: {os.path.abspath(cfg.run_dir)}")
    return 0


def config(recipe, preset: str | None, overrides: list[str]):
    """The recipe's preset (default: its CPU default, `cpu`) with each "a.b=value" applied."""
    presets = recipe.PRESETS
    if preset is not None and preset not in presets:
        raise SystemExit(f"unknown preset {preset!r}; presets: {', '.join(presets)}")
    return config_lib.override(presets[preset or "cpu"](), overrides)


def evaluate(recipe, cfg: RunConfig, model: str = "", out: str = "") -> int:
    """Evaluate an HF folder (`model`, or the config's `model=` when it is one), else the run's last kept
    policy, on the recipe's evaluation (`recipe.evaluation(cfg)`: its `data.eval` and `eval.*` settings, R1's
    temperature 0.6 and top-p 0.95 by default). Prints a table and the metrics as JSON, and writes them with the
    settings to `out` (default: eval-<model folder name>.json in the run dir)."""
    path = model or (cfg.model if os.path.isdir(getattr(cfg, "model", "")) else "")
    if not path:
        stages = [_as_stage(s) for s in recipe.stages(cfg)]
        finals = [s.name for s in stages if os.path.isdir(os.path.join(cfg.run_dir, s.name, "final"))]
        if not finals:
            raise SystemExit(f"nothing to evaluate in {cfg.run_dir} (train first, or set model=<HF folder>)")
        path = os.path.join(cfg.run_dir, finals[-1], "final")
    evaluation = recipe.evaluation(cfg)
    if not evaluation.records:
        raise SystemExit("no evaluation records (set data.eval=<file>)")
    with graceful_sigterm() as stop:
        ctx = make_context(cfg.run_dir, cfg.mesh, cfg.seed, cfg.model_overrides(), stop, log=False)
        policy = load_policy(path, ctx, getattr(cfg, "tokenizer", ""))
        metrics, samples = evaluation.measure(ctx, policy.model, policy.tokenizer, step=0)
        ctx.logger.close()
    result = {"model": os.path.abspath(path), "settings": dataclasses.asdict(evaluation.cfg),
              "data": getattr(getattr(cfg, "data", None), "eval", "") or "(the recipe's built-in split)", **metrics}
    name = os.path.basename(os.path.normpath(path)) if os.path.basename(os.path.normpath(path)) != "final" \
        else os.path.basename(os.path.dirname(os.path.normpath(path)))
    out = out or os.path.join(cfg.run_dir, f"eval-{name}.json")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    print(metrics_table([(name, metrics)]))
    print(json.dumps(result, indent=2))
    for s in samples[:2]:
        print(f"--- {s['prompt']!r} -> {s['completion']!r}")
    print(f"[r1jax] results: {os.path.abspath(out)}")
    return 0
