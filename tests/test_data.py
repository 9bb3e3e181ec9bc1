"""Prompt data: GSM8K JSONL as is, Parquet, deterministic resumable streams, per-process slices."""
import os

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import GSM8K_DIR
from r1jax.data import PromptStream, read_records


def test_gsm8k_jsonl_reads_as_is():
    records = read_records(os.path.join(GSM8K_DIR, "test.jsonl"))
    assert len(records) == 1319
    assert all(r["prompt"] and r["answer"] and "####" not in r["answer"] for r in records)
    assert records[0]["answer"] == records[0]["answer"].strip()


def test_parquet_and_field_names(tmp_path):
    table = pa.table({"q": ["1+1?", "2+2?"], "gold": ["2", "4"], "task": ["arith", "arith"]})
    pq.write_table(table, tmp_path / "d.parquet")
    records = read_records(str(tmp_path / "d.parquet"), prompt_field="q", answer_field="gold")
    assert [(r["prompt"], r["answer"], r["task"]) for r in records] == [("1+1?", "2", "arith"), ("2+2?", "4", "arith")]


def test_stream_is_deterministic_resumable_and_sliced_per_process():
    records = [{"prompt": str(i), "answer": str(i)} for i in range(50)]
    a = PromptStream(records, seed=3, process_index=0, process_count=1)
    first = a.take(7)
    state = a.get_state()
    rest = a.take(60)  # past one epoch: the stream repeats
    b = PromptStream(records, seed=3, process_index=0, process_count=1)
    assert b.take(7) == first
    b.set_state(state)
    assert b.take(60) == rest
    assert PromptStream(records, seed=4, process_index=0, process_count=1).take(7) != first
    halves = [PromptStream(records, seed=3, process_index=i, process_count=2).take(25) for i in range(2)]
    assert sorted(r["prompt"] for h in halves for r in h) == sorted(r["prompt"] for r in records)

