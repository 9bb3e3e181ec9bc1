"""The generation stage: k sampled completions for every prompt of a dataset, written as JSONL after every
batch, resumable exactly and incremental (records appended to the dataset are sampled on the next run; rejection
sampling and distillation's teacher traces use it).

Shapes: P prompts per batch, G = k samples per prompt, B = P*G rows (prompt-major), T completion length.

On disk, in the stage directory:
  samples-<p>-of-<n>.jsonl  process p's share of every batch's rows, batch after batch, one completion a line
  generation.json           the settings and data the shards were written with; a re-run with others fails

Progress: each shard is its own progress record. Which rows process p writes for batch b is known before the
batch runs (its `process_slice` of that batch's rows, in order), so on restart each process reads its shard and
keeps the longest run of complete leading batches, dropping a torn last line and the lines of an unfinished
batch. Every process then truncates back to the smallest count among them and continues from there: generate is
a collective, so all processes must run the same batches. No separate counter can disagree with the data it
counts; the price is one read of the shard per restart.
"""
import dataclasses
import glob
import hashlib
import json
import os
import re
from collections.abc import Callable

import jax

from r1jax import rollout, sampler, sharding
from r1jax.metrics import Progress
from r1jax.rewards import RewardSet, task_of
from r1jax.run import Context, Policy

_SHARD = re.compile(r"samples-(\d+)-of-(\d+)\.jsonl$")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    samples: int = 4  # k completions per prompt
    temperature: float = 0.6  # DeepSeek's recommended sampling settings for R1
    top_p: float = 0.95
    top_k: int = 0  # 0: off
    max_prompt_len: int = 512  # longer prompts (with the template) are dropped and counted
    max_new_tokens: int = 1024
    batch_prompts: int = 64  # prompts per generate call (and per resumable batch on disk)
    stop_strings: tuple[str, ...] = ()  # completions also end on these texts (e.g. </answer>), kept in them
    slots: int = 0  # > 0: continuous batching over this many decode slots (r1jax.engine); 0: lockstep batches

    def __post_init__(self):
        for name in ("samples", "max_prompt_len", "max_new_tokens", "batch_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (k samples of one prompt should differ)")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] and top_k={self.top_k} >= 0 (0: off)")


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    samples: list[dict]  # every completion of every process, in (id, sample) order
    prompts: int  # records that fit max_prompt_len
    too_long: int  # records dropped for not fitting
    batches: int
    resumed_at: int  # batches already complete on disk when the call started


def shard_path(directory: str, index: int, count: int) -> str:
    return os.path.join(directory, f"samples-{index}-of-{count}.jsonl")


def read_samples(directory: str) -> list[dict]:
    """Every shard's lines merged in (id, sample) order. A last line without its newline (a write that a stop cut
    short) is left out; all `count` shards of one process count must be there."""
    found = {}
    for path in glob.glob(os.path.join(directory, "samples-*-of-*.jsonl")):
        index, count = map(int, _SHARD.search(path).groups())
        found.setdefault(count, {})[index] = path
    if len(found) > 1:
        raise ValueError(f"{directory} holds shards of several process counts {sorted(found)}; keep one set")
    rows = []
    for count, shards in found.items():
        if sorted(shards) != list(range(count)):
            raise FileNotFoundError(f"{directory}: shards {sorted(set(range(count)) - set(shards))} of {count} missing")
        for path in shards.values():
            with open(path, "rb") as f:
                rows += [json.loads(line) for line in f if line.endswith(b"\n")]
    return sorted(rows, key=lambda r: (r["id"], r["sample"]))


def _batch_rows(ids: list[int], cfg: GenerationConfig) -> list[list[tuple[int, int]]]:
    """The (id, sample) of this process's rows of each batch, in the order it writes them."""
    out = []
    for start in range(0, len(ids), cfg.batch_prompts):
        rows = len(ids[start : start + cfg.batch_prompts]) * cfg.samples
        mine = rollout.process_slice(rows)
        out.append([(ids[start + r // cfg.samples], r % cfg.samples) for r in range(mine.start, mine.stop)])
    return out


def _complete_ends(path: str, batch_rows: list[list[tuple[int, int]]]) -> list[int]:
    """The shard's byte length after each of its leading complete batches."""
    ends = []
    if not os.path.exists(path):
        return ends
    offset = 0
    with open(path, "rb") as f:
        for rows in batch_rows:
            for key in rows:
                line = f.readline()
                try:
                    row = json.loads(line) if line.endswith(b"\n") else None
                except ValueError:  # the garbage a crash can leave after the last fsync
                    row = None
                if not isinstance(row, dict) or (row.get("id"), row.get("sample")) != key:
                    return ends
                offset += len(line)
            ends.append(offset)
    return ends


def _check_settings(directory: str, settings: dict, records: list[dict]) -> None:
    """Write the settings on the first run; later runs must match them (lines of other settings are not
    resumable), except that the records may have grown: when the earlier records are the first ones of the new
    list, the run is incremental (finished batches are kept; new and unfinished ones are sampled)."""
    path = os.path.join(directory, "generation.json")
    settings = json.loads(json.dumps(settings))  # as read back: tuples are lists
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        # A setting added since `before` was written counts as its default there.
        defaults = json.loads(json.dumps(dataclasses.asdict(GenerationConfig())))
        changed = sorted(k for k in settings.keys() | before.keys()
                         if settings.get(k) != before.get(k, defaults.get(k)))
        grown = (set(changed) <= {"records", "records_sha256"} and settings["records"] > before.get("records", 0)
                 and _fingerprint(records[: before["records"]]) == before.get("records_sha256"))
        if changed and not grown:
            raise ValueError(f"{directory} was generated with other settings ({', '.join(changed)} differ); "
                             "restore them (or only append records), or remove the directory to start over")
        if not changed:
            return
        print(f"[r1jax] {directory}: {settings['records'] - before['records']} records appended since the last run; "
              "sampling them")
    # Every process writes the same content (the directory may or may not be shared): a unique tmp, then replace.
    tmp = f"{path}.tmp-{jax.process_index()}"
    with open(tmp, "w") as f:
        json.dump(settings, f, indent=2)
    os.replace(tmp, path)


def _fingerprint(records: list[dict]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, default=str).encode() + b"\n")
    return h.hexdigest()


def _line(record: dict, key: tuple[int, int], text: str, tokens: int, truncated: bool, scores: dict) -> bytes:
    row = {"id": key[0], "sample": key[1], "prompt": record["prompt"], "answer": record.get("answer"),
           "task": task_of(record)}
    if "language" in record:
        row["language"] = record["language"]
    row.update(completion=text, tokens=tokens, truncated=truncated, scores=scores)
    return (json.dumps(row, ensure_ascii=False) + "\n").encode()


def generate_samples(ctx: Context, policy: Policy, records: list[dict], *, name: str, cfg: GenerationConfig,
                     render: Callable[[str], str], rewards: RewardSet | None = None,
                     seed_offset: int = 0) -> GenerationResult:
    """k = cfg.samples completions of every record that fits, scored by `rewards` (if given), into
    `ctx.stage_dir(name)`; resumes where a stopped run left off and returns every process's samples.

    A record is a dict with "prompt" and "answer", optionally "task" and "language"; its id is its index in
    `records`. `render(prompt) -> text` applies the template. Batch b samples with
    `fold_in(key(ctx.seed + seed_offset), b)`, so a resumed run writes the same lines as an uninterrupted one.
    SIGTERM (`ctx.poll`) stops between batches or decode segments with `Preempted`; finished batches stay on
    disk. The result merges all shards, so every process must see the stage directory (a shared filesystem).
    """
    tok = policy.tokenizer
    stubs = [{"prompt": r["prompt"], "id": i} for i, r in enumerate(records)]
    kept, prompts, too_long = rollout.encode_prompts(stubs, render, tok, cfg.max_prompt_len)
    if not kept:
        raise ValueError(f"{name}: no prompt fits max_prompt_len={cfg.max_prompt_len} ({too_long} too long)")
    ids = [s["id"] for s in kept]
    directory = ctx.stage_dir(name)
    os.makedirs(directory, exist_ok=True)
    _check_settings(directory, {**dataclasses.asdict(cfg), "seed": ctx.seed + seed_offset,
                                "processes": jax.process_count(), "records": len(records),
                                "records_sha256": _fingerprint(records)}, records)
    shard = shard_path(directory, jax.process_index(), jax.process_count())
    batch_rows = _batch_rows(ids, cfg)
    ends = _complete_ends(shard, batch_rows)
    done = min(sharding.allgather_json(len(ends)))
    if done:
        print(f"[r1jax] {name}: {done} of {len(batch_rows)} generation batches already on disk")

    scfg = sampler.SamplerConfig(max_prompt_len=cfg.max_prompt_len, max_new_tokens=cfg.max_new_tokens,
                                 group_size=cfg.samples, temperature=cfg.temperature, top_p=cfg.top_p,
                                 top_k=cfg.top_k, stop_ids=tuple(tok.stop_ids), pad_id=tok.pad_id,
                                 slots=cfg.slots, stop_strings=cfg.stop_strings)
    rng = jax.random.key(ctx.seed + seed_offset)
    model = sharding.for_sampling(policy.model, ctx.mesh) if done < len(batch_rows) else None
    progress = Progress(total=len(batch_rows), initial=done, desc=name)
    with open(shard, "ab") as out:  # appends go to the end, wherever truncate leaves it
        out.truncate(ends[done - 1] if done else 0)
        os.fsync(out.fileno())
        for b in range(done, len(batch_rows)):
            ctx.poll()
            start = b * cfg.batch_prompts
            got = rollout.complete(model, [records[i] for i in ids[start : start + cfg.batch_prompts]],
                                      prompts[start : start + cfg.batch_prompts], jax.random.fold_in(rng, b),
                                      scfg, tok, rewards, poll=ctx.poll, local=True)
            # This process decoded and scored only its own rows (`batch_rows[b]`); the others write theirs.
            scores = got.scored.scores if got.scored is not None else {}
            # A float32 score is written as the shortest decimal that reads back as it: 19/20 words in the
            # language is 0.95 on disk (not 0.949999988, which a 0.95 threshold would reject).
            lines = [_line(records[key[0]], key, text, int(got.lengths_B[i]), bool(got.truncated_B[i]),
                           {n: float(str(s[j])) for n, s in scores.items()})
                     for j, (i, key, text) in enumerate(zip(got.rows, batch_rows[b], got.texts))]
            out.write(b"".join(lines))
            out.flush()
            os.fsync(out.fileno())
            progress.update(b + 1, {"completion_len_mean": float(got.lengths_B.mean())})
    progress.close()

    # A barrier (every shard is complete before anyone reads the others) and a check of what each wrote.
    written = sum(sharding.allgather_json(sum(map(len, batch_rows))))
    samples = read_samples(directory)
    if len(samples) != written or written != len(ids) * cfg.samples:
        raise RuntimeError(f"{name}: read {len(samples)} samples from {directory}, expected {len(ids) * cfg.samples}; "
                           "every process must see the stage directory (a shared filesystem)")
    return GenerationResult(samples, prompts=len(ids), too_long=too_long, batches=len(batch_rows), resumed_at=done)
