"""Run logging: metrics.jsonl, TensorBoard, sampled completions, a progress line, reward.png, before/after table."""
import json
import re
import math
import os
import sys
import time
from typing import IO, Any

import jax
import numpy as np
import tqdm
from tensorboardX import SummaryWriter

# DESIGN.md's metrics.jsonl contract: outside checks read these keys.
TRAIN_KEYS = ("step", "stage", "reward_mean", "accuracy", "format_rate", "completion_len_mean", "kl")
EVAL_KEYS = ("step", "stage", "eval_accuracy", "eval_format_rate", "eval_completion_len_mean")

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


def _plain(value: Any, name: str) -> Any:
    """JSON-ready Python value; numpy/jax scalars become int/float/bool."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        if np.ndim(value) != 0:
            raise TypeError(f"metric {name!r} has shape {np.shape(value)}; log scalars (reduce it first)")
        return np.asarray(value).item()
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{name}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"metric {name!r} has type {type(value).__name__}; expected a scalar, str, list or dict")


def _strict_json(value: Any) -> Any:
    # NaN/Infinity are not JSON; null keeps every line readable by any JSON tool (TB keeps the float).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict_json(v) for v in value]
    return value


def _check_keys(record: dict, required: tuple[str, ...], kind: str) -> None:
    missing = [k for k in required if k not in record]
    if missing:
        raise ValueError(f"{kind} record at step {record.get('step')} lacks required keys {missing} "
                         f"(DESIGN.md's metrics.jsonl contract); it has {sorted(record)}")


def _purge(path: str, purge_step: int, stage: str | None = None) -> None:
    # A resumed run re-logs the steps after its checkpoint; drop the first attempt's copies
    # (of one stage only, when given: the stages of a recipe share the file).
    if not os.path.exists(path):
        return
    kept = [r for r in _read_jsonl(path)
            if r.get("step", -1) < purge_step or (stage is not None and r.get("stage") != stage)]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a write cut short by a kill; everything before it stands
                break
            raise
    return records


def _sample_markdown(samples: list[dict]) -> str:
    parts = []
    for i, sample in enumerate(samples):
        inline, blocks = [], []
        for k, v in sample.items():
            if isinstance(v, str) and ("\n" in v or "<" in v or len(v) > 80):
                # Indented code: TB's markdown would swallow <think> tags, and no text can close the block.
                blocks.append(f"{k}:\n\n" + "\n".join("    " + line for line in v.splitlines()))
            else:
                inline.append(f"{k}: `{v}`")
        parts.append(f"**sample {i}** " + ", ".join(inline) + "\n\n" + "\n\n".join(blocks))
    return "\n\n---\n\n".join(parts)


class MetricsLogger:
    """Writes run_dir/metrics.jsonl, run_dir/samples.jsonl and TensorBoard events in run_dir/tb.

    Only process 0 writes; elsewhere (or with enabled=False) calls only validate. With
    `purge_step` (resuming), records with step >= purge_step from an earlier attempt are
    dropped from the JSONL files and TensorBoard, so the run reads as one uninterrupted run.
    """

    def __init__(self, run_dir: str, *, enabled: bool = True, tensorboard: bool = True,
                 validate: bool = True, purge_step: int | None = None):
        self.run_dir = run_dir
        self.enabled = enabled and jax.process_index() == 0
        self.validate = validate
        self._metrics: IO[str] | None = None
        self._samples: IO[str] | None = None
        self._tb: SummaryWriter | None = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if purge_step is not None:
            _purge(os.path.join(run_dir, METRICS_FILE), purge_step)
            _purge(os.path.join(run_dir, SAMPLES_FILE), purge_step)
        # Line-buffered: `tail -f` and a crash both see every finished step.
        self._metrics = open(os.path.join(run_dir, METRICS_FILE), "a", buffering=1)
        if tensorboard:
            # tensorboardX names files by the second and opens them "wb": a resume within the same
            # second would wipe the previous file. A nanosecond suffix keeps names unique and in order.
            self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step, flush_secs=10,
                                     filename_suffix=f".{time.time_ns()}")

    def _write(self, record: dict, kind: str, required: tuple[str, ...], tb_prefix: str) -> None:
        if record.get("kind", kind) != kind:
            raise ValueError(f"a {kind} record cannot carry kind={record['kind']!r}")
        if self.validate:
            _check_keys(record, required, kind)
        clean = {k: _plain(v, k) for k, v in record.items()}
        step, stage = clean.get("step"), clean.get("stage")
        if not isinstance(step, int) or isinstance(step, bool):
            raise TypeError(f"step must be an int, got {record.get('step')!r}")
        if not self.enabled:
            return
        if self._metrics is None:
            raise ValueError("MetricsLogger is closed")
        line = {"step": step, "stage": stage, "kind": kind} | clean
        self._metrics.write(json.dumps(_strict_json(line)) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if k in ("step", "stage", "kind") or isinstance(v, str | list | dict) or v is None:
                    continue
                name = k.removeprefix("eval_") if kind == "eval" else k
                self._tb.add_scalar(f"{stage}/{tb_prefix}{name}", float(v), step)

    def purge(self, stage: str, after_step: int) -> None:
        """Drop `stage`'s records with step > after_step from metrics.jsonl and samples.jsonl: a stage
        resuming from its checkpoint at `after_step` re-logs what a killed attempt had logged after it,
        and the file on disk must hold each step once. (TensorBoard keeps the old points: its purge is
        per run, not per stage, and would drop the other stages' points too.)"""
        if not self.enabled:
            return
        for name in (METRICS_FILE, SAMPLES_FILE):
            handle = self._metrics if name == METRICS_FILE else self._samples
            if handle is not None:
                handle.close()
            _purge(os.path.join(self.run_dir, name), after_step + 1, stage)
            if name == METRICS_FILE:
                self._metrics = open(os.path.join(self.run_dir, METRICS_FILE), "a", buffering=1)
            else:
                self._samples = None  # reopened on the next write

    def log_step(self, record: dict) -> None:
        self._write(record, "train", TRAIN_KEYS, "")

    def log_eval(self, record: dict) -> None:
        """TensorBoard tags drop the `eval_` prefix: eval_accuracy -> `<stage>/eval/accuracy`."""
        self._write(record, "eval", EVAL_KEYS, "eval/")

    def log_samples(self, step: int, stage: str, samples: list[dict]) -> None:
        clean = [{k: _plain(v, k) for k, v in s.items()} for s in samples]
        if not self.enabled:
            return
        if self._samples is None:
            self._samples = open(os.path.join(self.run_dir, SAMPLES_FILE), "a", buffering=1)
        for sample in clean:
            self._samples.write(json.dumps(_strict_json({"step": step, "stage": stage} | sample)) + "\n")
        if self._tb is not None and clean:
            self._tb.add_text(f"{stage}/samples", _sample_markdown(clean), step)

    def close(self) -> None:
        for f in (self._metrics, self._samples):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        self._metrics = self._samples = self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str, *, kind: str | None = None, dedupe: bool = True) -> list[dict]:
    """Records of a metrics.jsonl (or of the run dir holding one), optionally of one kind ("train"/"eval").

    With `dedupe`, a (kind, stage, step) logged twice (a resume without purge_step) keeps
    its last record, placed where that last record stands.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    records = _read_jsonl(path)
    if dedupe:
        latest: dict[tuple, dict] = {}
        for r in records:
            key = (r.get("kind"), r.get("stage"), r.get("step"))
            latest.pop(key, None)
            latest[key] = r
        records = list(latest.values())
    if kind is not None:
        records = [r for r in records if r.get("kind") == kind]
    return records


def evaluated_steps(run_dir: str, stage: str) -> set[int]:
    """Steps at which `stage` logged an evaluation in run_dir/metrics.jsonl."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return set()
    return {r["step"] for r in _read_jsonl(path) if r.get("kind") == "eval" and r.get("stage") == stage}


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _summary(metrics: dict) -> str:
    parts = []
    for key, label, pct in (("loss", "loss", False), ("reward_mean", "reward", False), ("accuracy", "acc", True),
                            ("format_rate", "fmt", True), ("completion_len_mean", "len", False)):
        if key in metrics and metrics[key] is not None and not (key == "loss" and "reward_mean" in metrics):
            v = float(metrics[key])
            parts.append(f"{label} {v:.1%}" if pct else f"{label} {v:.3g}")
    return " ".join(parts)


class Progress:
    """A tqdm bar (step, reward, accuracy, format, length, ETA) on a terminal; elsewhere, a line every `every` steps.

    CI logs and `nohup` files get readable lines instead of carriage-return bar redraws.
    Only process 0 shows anything.
    """

    def __init__(self, total: int, *, initial: int = 0, desc: str = "", every: int = 10,
                 enabled: bool = True, file: IO[str] | None = None):
        self.total, self.initial, self.desc, self.every = total, initial, desc, max(every, 1)
        self.enabled = enabled and jax.process_index() == 0
        self.file = file if file is not None else sys.stderr
        self._start = time.monotonic()
        self._printed = False
        self._bar: tqdm.tqdm | None = None
        if self.enabled and self.file.isatty():
            self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc, unit="step",
                                  file=self.file, dynamic_ncols=True)

    def update(self, step: int, metrics: dict) -> None:
        """`step`: steps done so far (absolute, as logged), `metrics`: that step's record."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(_summary(metrics), refresh=False)
            self._bar.update(step - self._bar.n)
            return
        # The first step prints too: it includes compilation, and shows the run is alive.
        if step % self.every and step != self.total and self._printed:
            return
        self._printed = True
        done = step - self.initial
        elapsed = time.monotonic() - self._start
        rate = elapsed / done if done > 0 else float("nan")
        eta = _fmt_duration(rate * (self.total - step)) if done > 0 else "?"
        head = f"{self.desc} " if self.desc else ""
        print(f"{head}step {step}/{self.total} | {_summary(metrics)} | {rate:.2f} s/step | ETA {eta}",
              file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in points], [float(v) for _, v in points]


def plot_run(metrics_path: str, out_png: str) -> None:
    """reward.png: reward, accuracy, format rate, completion length against step (a line per stage), evals on top."""
    if os.path.isdir(metrics_path):
        metrics_path = os.path.join(metrics_path, METRICS_FILE)
    records = read_metrics(metrics_path)
    if not records:
        raise ValueError(f"no records in {metrics_path}")
    fig = run_figure(records, title=os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))  # the run dir
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=100)


def run_figure(records: list[dict], *, title: str = ""):
    """The matplotlib Figure behind reward.png."""
    # Imported here: matplotlib costs a second of startup that runs which never plot should not pay.
    # Figure + the Agg canvas, not pyplot: no global backend switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    stages = list(dict.fromkeys(r["stage"] for r in train))
    panels = (
        ("reward_mean", "reward", []),
        ("accuracy", "accuracy", [("eval_accuracy", "eval pass@1", "o"), ("eval_maj_accuracy", "eval maj@k", "s")]),
        ("format_rate", "format rate", [("eval_format_rate", "eval", "o")]),
        ("completion_len_mean", "completion length (tokens)", [("eval_completion_len_mean", "eval", "o")]),
    )
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for ax, (key, title, overlays) in zip(axes, panels):
        for stage in stages:
            steps, values = _series([r for r in train if r["stage"] == stage], key)
            if steps:
                ax.plot(steps, values, lw=1.2, label=stage if len(stages) > 1 else "train")
        for eval_key, label, marker in overlays:
            if eval_key == "eval_maj_accuracy":  # logged as eval_maj<k>_accuracy, k = samples per prompt
                eval_key = next((k for r in evals for k in r if re.fullmatch(r"eval_maj\d*_accuracy", k)), eval_key)
            steps, values = _series(evals, eval_key)
            if steps:
                ax.plot(steps, values, marker=marker, ls="--", lw=0.8, ms=5, label=label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[2:]:
        ax.set_xlabel("step")
    fig.suptitle(title)
    return fig


def before_after_table(evals: list[dict]) -> str:
    """First vs last evaluation as a text table: pass@1, maj@k (if logged), format rate, mean length."""
    evals = [r for r in evals if "eval_accuracy" in r]
    if not evals:
        raise ValueError("before_after_table needs at least one eval record (with eval_accuracy)")
    return _table([("base", evals[0])] + ([("after RL", evals[-1])] if len(evals) > 1 else []))


def stage_table(evals: list[dict], stages: list[str]) -> str:
    """One row per stage, its last evaluation, after a "base" row: the run's first evaluation (a
    stage's step 0, before any training). Stages that logged no evaluation have no row."""
    evals = [r for r in evals if "eval_accuracy" in r]
    if not evals:
        raise ValueError("stage_table needs at least one eval record (with eval_accuracy)")
    rows = [("base", evals[0])]
    for name in stages:
        mine = [r for r in evals if r.get("stage") == name]
        if mine and mine[-1] is not evals[0]:
            rows.append((name, mine[-1]))
    return _table(rows)


def metrics_table(rows: list[tuple[str, dict]]) -> str:
    """Eval metrics as a table, one labelled row each (no step column)."""
    return _table(rows, steps=False)


def _table(rows: list[tuple[str, dict]], steps: bool = True) -> str:
    columns = [("eval_accuracy", "accuracy (pass@1)", True)]
    # maj@k is logged as eval_maj<k>_accuracy (e.g. eval_maj4_accuracy), or eval_maj_accuracy.
    maj = sorted({k for _, r in rows for k in r if re.fullmatch(r"eval_maj\d*_accuracy", k)})
    for key in maj:
        k = key.removeprefix("eval_maj").removesuffix("_accuracy") or "k"
        columns.append((key, f"maj@{k}", True))
    columns.append(("eval_format_rate", "format", True))
    if any("eval_language_consistency" in r for _, r in rows):
        columns.append(("eval_language_consistency", "language", True))
    columns.append(("eval_completion_len_mean", "mean length", False))
    if any("eval_rm_score" in r for _, r in rows):
        columns.append(("eval_rm_score", "RM score (general)", False))

    def cell(record: dict, key: str, pct: bool) -> str:
        v = record.get(key)
        if v is None:
            return "-"
        return f"{float(v):.1%}" if pct else f"{float(v):.2f}" if key == "eval_rm_score" else f"{float(v):.1f}"

    table = [[""] + [title for _, title, _ in columns]]
    table += [[f"{label} (step {r['step']})" if steps else label] + [cell(r, k, pct) for k, _, pct in columns]
              for label, r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in table]
    return "\n".join(line.rstrip() for line in lines)
