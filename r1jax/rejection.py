"""Rejection sampling (R1 stage 3): keep the sampled completions that are correct, well-formed, in one language,
not over-long and not repeated, at most n per prompt; mix them with general SFT data into one chat JSONL.

Pure functions over the sample dicts `generation.generate_samples` writes: {"id", "sample", "prompt", "task",
"completion", "tokens", "truncated", "scores": {name: float}, ...}.
"""
import collections
import dataclasses
import json
import os
import random
from collections.abc import Iterable

from r1jax.sft_data import RecordSource

# In the order they are checked; a dropped sample counts under the first that applies.
REASONS = ("incorrect", "malformed", "mixed_language", "overlong", "duplicate", "over_quota")


@dataclasses.dataclass(frozen=True)
class RejectionConfig:
    """Which samples `select` keeps. A check whose score name is absent from a sample's "scores" is skipped for
    that sample (e.g. no language reward was run), so name only scores the generation stage computed."""

    keep_per_prompt: int = 4  # n: at most this many kept per prompt
    min_language: float = 0.95  # language-consistency score a kept sample reaches
    max_tokens: int = 0  # longer completions are dropped; 0: no limit (truncated ones are always dropped)
    require_correct: bool = True
    require_format: bool = True
    dedupe: bool = True  # drop a completion equal to one kept for the same prompt (whitespace collapsed)
    accuracy: str = "accuracy"  # score names
    format: str = "format"
    language: str = "language"

    def __post_init__(self):
        if self.keep_per_prompt < 1 or self.max_tokens < 0:
            raise ValueError(f"keep_per_prompt={self.keep_per_prompt} must be >= 1 and max_tokens={self.max_tokens} "
                             ">= 0 (0: no limit)")
        if not 0 <= self.min_language <= 1:
            raise ValueError(f"min_language={self.min_language} must be in [0, 1] (0: no language check)")
        if not all((self.accuracy, self.format, self.language)):
            raise ValueError("score names must be non-empty")


def _normalised(text: str) -> str:
    return " ".join(text.split())


def _below(sample: dict, name: str, floor: float) -> bool:
    score = sample["scores"].get(name)
    return score is not None and score < floor


def _drop_reason(sample: dict, kept: list[str], cfg: RejectionConfig) -> str | None:
    """Why `sample` is dropped (the first reason that applies), or None; `kept`: this prompt's kept texts."""
    if cfg.require_correct and _below(sample, cfg.accuracy, 1.0):
        return "incorrect"
    if cfg.require_format and _below(sample, cfg.format, 1.0):
        return "malformed"
    if _below(sample, cfg.language, cfg.min_language):
        return "mixed_language"
    if sample["truncated"] or (cfg.max_tokens and sample["tokens"] > cfg.max_tokens):
        return "overlong"
    if cfg.dedupe and _normalised(sample["completion"]) in kept:
        return "duplicate"
    if len(kept) >= cfg.keep_per_prompt:
        return "over_quota"
    return None


def _empty_stats() -> dict:
    return {"samples": 0, "kept": 0, "kept_share": 0.0, "prompts": 0, "prompts_with_any_kept": 0,
            "dropped": dict.fromkeys(REASONS, 0)}


def select(samples: list[dict], cfg: RejectionConfig) -> tuple[list[dict], dict]:
    """(kept samples, stats). Samples are judged in (id, sample) order, so the result does not depend on the
    order they come in. stats = {"total": s, "tasks": {task: s}} where s = {"samples", "kept", "kept_share",
    "prompts", "prompts_with_any_kept", "dropped": {reason: count}} (every reason, zeros included)."""
    kept, kept_texts = [], collections.defaultdict(list)
    stats = {"total": _empty_stats(), "tasks": collections.defaultdict(_empty_stats)}
    seen = set()
    for sample in sorted(samples, key=lambda s: (s["id"], s["sample"])):
        prompt = sample["id"]
        reason = _drop_reason(sample, kept_texts[prompt], cfg)
        parts = (stats["total"], stats["tasks"][sample["task"]])
        for part in parts:
            part["samples"] += 1
            part["prompts"] += prompt not in seen
            if reason is None:
                part["kept"] += 1
                part["prompts_with_any_kept"] += not kept_texts[prompt]
            else:
                part["dropped"][reason] += 1
        seen.add(prompt)
        if reason is None:
            kept.append(sample)
            kept_texts[prompt].append(_normalised(sample["completion"]))
    stats["tasks"] = dict(sorted(stats["tasks"].items()))
    for part in (stats["total"], *stats["tasks"].values()):
        part["kept_share"] = part["kept"] / part["samples"] if part["samples"] else 0.0
    return kept, stats


def to_chat(sample: dict) -> dict:
    """A kept sample as a chat SFT record (r1jax.sft_data reads it)."""
    return {"messages": [{"role": "user", "content": sample["prompt"]},
                         {"role": "assistant", "content": sample["completion"]}],
            "task": sample["task"], "id": sample["id"]}


def _general_chat(record: dict) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"a general SFT record must be an object, got {type(record).__name__}")
    if "messages" in record:
        return record
    if "prompt" in record and "completion" in record:
        chat = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
        return {"messages": [{"role": "user", "content": record["prompt"]},
                             {"role": "assistant", "content": record["completion"]}], **chat}
    raise ValueError(f"a general SFT record needs 'messages' or 'prompt' and 'completion'; it has {sorted(record)}")


def write_atomically(path: str, parts: Iterable[str]) -> None:
    """Write `parts` (produced as they are written) to a temporary file, then put it in place; if producing them
    fails, `path` is left as it was and no temporary file remains."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(parts)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_dataset(path: str, reasoning_kept: list[dict], general: RecordSource | list[dict], *, seed: int,
                  general_limit: int = 0) -> dict:
    """One chat JSONL of the kept samples and the general records (chats, or prompt/completion pairs made chats;
    task "general" unless they name one), shuffled with `seed`, written atomically. Returns {task: records}.

    `general` may be files read one record at a time (`RecordSource`): a large general set is never held in
    memory, only the shuffled order of its indices. `general_limit` > 0 takes only its first that many records.
    """
    general = general if isinstance(general, RecordSource) else RecordSource(general)
    n_general = min(len(general), general_limit) if general_limit else len(general)
    counts = collections.Counter()
    order = list(range(len(reasoning_kept) + n_general))
    random.Random(seed).shuffle(order)

    def lines():
        for i in order:
            if i < len(reasoning_kept):
                record = to_chat(reasoning_kept[i])
            else:
                row = general.record(i - len(reasoning_kept))
                record = {**_general_chat(row), "task": row.get("task") or "general"}
            counts[record["task"]] += 1
            yield json.dumps(record, ensure_ascii=False) + "\n"

    write_atomically(path, lines())
    return dict(sorted(counts.items()))


def write_stats(path: str, stats: dict) -> None:
    write_atomically(path, [json.dumps(stats, indent=2) + "\n"])


def describe(stats: dict) -> str:
    """A short table: per task and in total, kept share, prompts with any kept, and drops by reason."""
    head = ["task", "samples", "kept", "share", "prompts", "any_kept", *REASONS]
    rows = [[task, s["samples"], s["kept"], f"{s['kept_share']:.1%}", s["prompts"], s["prompts_with_any_kept"],
             *(s["dropped"][r] for r in REASONS)] for task, s in [*stats["tasks"].items(), ("total", stats["total"])]]
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(v).rjust(w) for v, w in zip(row, widths)) for row in [head, *rows])
