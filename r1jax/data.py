"""Prompt datasets: JSONL/Parquet files and built-in tasks, through grain, sharded per process.

A record is a dict with `prompt` and `answer` (the gold final answer only) and maybe
`task`. GSM8K's own format ({"question", "answer": "... #### 18"}) is read as is.
A bad record is an error naming its file and line (Parquet: row index), or with
`on_error="skip"` is skipped and counted.
"""
import codecs
import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Literal

import grain
import jax

from r1jax.rewards import gsm8k_gold

_REASONS_KEPT = 5  # ReadStats keeps the first few reasons, not one per bad line of a huge file


@dataclasses.dataclass(frozen=True)
class ReadStats:
    read: int  # records returned
    skipped: int  # bad records skipped (on_error="skip")
    reasons: tuple[str, ...]  # the first few skipped, each "FILE:LINE: why"


class _BadRecord(Exception):
    """What is wrong with one record; the reader adds where it is."""


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _normalise(row, prompt_field: str, answer_field: str) -> dict:
    if not isinstance(row, dict):
        raise _BadRecord(f"expected an object with fields, got {_kind(row)}")
    if "question" in row and "prompt" not in row and prompt_field == "prompt":
        prompt_field = "question"
    for field in (prompt_field, answer_field):
        if field not in row:
            names = [str(k) for k in row]
            listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise _BadRecord(f"no field {field!r}; the record has: {listed or 'no fields'}")
    prompt, answer = row[prompt_field], row[answer_field]
    if not isinstance(prompt, str):
        raise _BadRecord(f"field {prompt_field!r} is {_kind(prompt)}, expected a string")
    if answer is None or isinstance(answer, (dict, list)):
        raise _BadRecord(f"field {answer_field!r} is {_kind(answer)}, expected a string or number")
    answer = str(answer)
    if "####" in answer:  # GSM8K: reasoning, then "#### <final answer>"
        try:
            answer = gsm8k_gold(answer)
        except ValueError as e:
            raise _BadRecord(str(e)) from None
    out = {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool, list))}
    out.update(prompt=prompt, answer=answer)
    return out


def _parse_line(raw: bytes):
    # Decoded line by line, so bad bytes are reported with their line, not as a whole-file error.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadRecord(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line: "
                         f"{e.reason})") from None
    try:
        return json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:  # its own "line 1 column N" counts within this line only
        raise _BadRecord(f"not valid JSON ({e.msg} at column {e.pos + 1})") from None


def _raw_records(file: str) -> Iterator[tuple[str, object]]:
    """(where, row) for a Parquet file, (where, undecoded line) for JSONL; blank lines dropped."""
    if file.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(file)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{file}: not a readable Parquet file ({e})") from e
        for index, row in enumerate(table.to_pylist()):
            yield f"{file}: row index {index}", row
        return
    with open(file, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if raw.strip():
                yield f"{file}:{number}", raw


def _first_reasons(stats: ReadStats) -> str:
    return "; ".join(stats.reasons[:3])


def read_records_with_stats(path: str, *, prompt_field: str = "prompt", answer_field: str = "answer",
                            on_error: Literal["raise", "skip"] = "raise") -> tuple[list[dict], ReadStats]:
    """`read_records`, silent, with counts of what was read and skipped."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: choose from ['raise', 'skip']")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".jsonl", ".parquet")))
    else:
        files = [path]
    records, skipped, reasons = [], 0, []
    for file in files:
        for where, raw in _raw_records(file):
            try:
                row = _parse_line(raw) if isinstance(raw, bytes) else raw
                records.append(_normalise(row, prompt_field, answer_field))
            except _BadRecord as e:
                if on_error == "raise":
                    raise ValueError(f"{where}: {e}") from None
                skipped += 1
                if len(reasons) < _REASONS_KEPT:
                    reasons.append(f"{where}: {e}")
    stats = ReadStats(read=len(records), skipped=skipped, reasons=tuple(reasons))
    if not records:
        raise ValueError(f"no records in {path}" + (
            f" (skipped {skipped} bad records; first: {_first_reasons(stats)})" if skipped else ""))
    return records, stats


def read_records(path: str, *, prompt_field: str = "prompt", answer_field: str = "answer",
                 on_error: Literal["raise", "skip"] = "raise") -> list[dict]:
    """Rows of a .jsonl or .parquet file (or every such file in a folder, sorted).

    A bad record raises ValueError naming its file and line; with on_error="skip" bad
    records are left out and one line says how many and why.
    """
    records, stats = read_records_with_stats(path, prompt_field=prompt_field, answer_field=answer_field,
                                             on_error=on_error)
    if stats.skipped:
        print(f"[r1jax] data: skipped {stats.skipped} bad records in {path} "
              f"(first: {_first_reasons(stats)})")
    return records


class PromptStream:
    """An endless, deterministically shuffled stream of records for this process.

    Each process reads its own slice (records i with i % process_count == index), so
    a multi-host run sees every record once per epoch across hosts. The iterator's
    position is part of every checkpoint (`get_state` / `set_state`).
    """

    def __init__(self, records: list[dict], *, seed: int, process_index: int | None = None,
                 process_count: int | None = None):
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        dataset = grain.MapDataset.source(records).shuffle(seed=seed).repeat()
        self._iter = iter(dataset[index::count].to_iter_dataset())

    def take(self, n: int) -> list[dict]:
        return [next(self._iter) for _ in range(n)]

    def get_state(self) -> dict:
        return self._iter.get_state()

    def set_state(self, state: dict) -> None:
        self._iter.set_state(state)

