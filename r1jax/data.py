"""Prompt datasets: JSONL/Parquet files and built-in tasks, through grain, sharded per process.

A record is a dict with `prompt` and `answer` (the gold final answer only) and maybe
`task`. GSM8K's own format ({"question", "answer": "... #### 18"}) is read as is.
"""
import json
import os

import grain
import jax

from r1jax.rewards import gsm8k_gold


def _normalise(row: dict, prompt_field: str, answer_field: str) -> dict:
    if "question" in row and "prompt" not in row and prompt_field == "prompt":
        prompt_field = "question"
    prompt, answer = row[prompt_field], str(row[answer_field])
    if "####" in answer:  # GSM8K: reasoning, then "#### <final answer>"
        answer = gsm8k_gold(answer)
    out = {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool, list))}
    out.update(prompt=prompt, answer=answer)
    return out


def read_records(path: str, *, prompt_field: str = "prompt", answer_field: str = "answer") -> list[dict]:
    """Rows of a .jsonl or .parquet file (or every such file in a folder, sorted)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".jsonl", ".parquet")))
    else:
        files = [path]
    rows = []
    for file in files:
        if file.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(file).to_pylist())
        else:
            with open(file) as f:
                rows.extend(json.loads(line) for line in f if line.strip())
    if not rows:
        raise ValueError(f"no records in {path}")
    return [_normalise(r, prompt_field, answer_field) for r in rows]


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

