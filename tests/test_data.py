"""Prompt data: GSM8K JSONL as is, Parquet, bad records named by file and line (or skipped and
counted), deterministic resumable streams, per-process slices."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import GSM8K_DIR
from r1jax.data import PromptStream, ReadStats, read_records, read_records_with_stats


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



def _jsonl(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def _good(i: int) -> bytes:
    return json.dumps({"prompt": f"{i}+{i}?", "answer": str(2 * i)}).encode()


def _error(path: str, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        read_records(path, **kwargs)
    return str(info.value)


def test_bad_json_names_file_and_line_counting_blank_lines(tmp_path):
    file = _jsonl(tmp_path / "d.jsonl", [_good(i) for i in range(9)] + [b"", b'{"prompt": "x", "answer": '])
    assert _error(file) == f"{file}:11: not valid JSON (Expecting value at column 27)"


def test_missing_null_and_mistyped_fields_name_file_line_and_fields(tmp_path):
    cases = [
        (b'{"prompt": "1+1?", "solution": "2"}', "no field 'answer'; the record has: prompt, solution"),
        (b'{"question": "1+1?"}', "no field 'answer'; the record has: question"),
        (b'{"prompt": "1+1?", "answer": null}', "field 'answer' is null, expected a string or number"),
        (b'{"prompt": 7, "answer": "2"}', "field 'prompt' is int, expected a string"),
        (b'{"prompt": null, "answer": "2"}', "field 'prompt' is null, expected a string"),
        (b'["1+1?", "2"]', "expected an object with fields, got list"),
        (b'{"question": "q", "answer": "no gold #### "}', "no '#### <answer>' in GSM8K answer field"),
    ]
    for bad, reason in cases:
        file = _jsonl(tmp_path / "d.jsonl", [_good(0), _good(1), bad])
        assert _error(file).startswith(f"{file}:3: {reason}"), bad
    file = _jsonl(tmp_path / "q.jsonl", [b'{"q": "1+1?", "gold": "2"}', b'{"q": "2+2?"}'])
    assert _error(file, prompt_field="q", answer_field="gold") == f"{file}:2: no field 'gold'; the record has: q"


def test_non_utf8_names_the_line(tmp_path):
    file = _jsonl(tmp_path / "d.jsonl", [_good(0), _good(1), b'{"prompt": "caf\xe9?", "answer": "1"}', _good(3)])
    assert _error(file) == (f"{file}:3: not valid UTF-8 (byte 0xe9 at byte 16 of the line: "
                            "invalid continuation byte)")


def test_parquet_bad_row_names_file_and_row_index(tmp_path):
    file = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"q": ["1+1?", "2+2?"], "gold": ["2", None]}), file)
    assert _error(file, prompt_field="q", answer_field="gold") == (
        f"{file}: row index 1: field 'gold' is null, expected a string or number")
    assert _error(file, prompt_field="q", answer_field="answer") == (
        f"{file}: row index 0: no field 'answer'; the record has: q, gold")
    bad = tmp_path / "not.parquet"
    bad.write_bytes(b"not parquet at all")
    assert _error(str(bad)).startswith(f"{bad}: not a readable Parquet file (")


def test_skip_counts_bad_records_and_reports_the_first_reasons(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    a = _jsonl(folder / "a.jsonl", [_good(0), b"{oops", _good(2)])
    b = _jsonl(folder / "b.jsonl", [_good(3), b'{"prompt": "x"}', b"\xff\xfe", _good(6), b'{"answer": "1"}'] +
               [b"[]"] * 4)
    records, stats = read_records_with_stats(str(folder), on_error="skip")
    assert [r["prompt"] for r in records] == ["0+0?", "2+2?", "3+3?", "6+6?"]
    assert stats == ReadStats(read=4, skipped=8, reasons=(
        f"{a}:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{b}:2: no field 'answer'; the record has: prompt",
        f"{b}:3: not valid UTF-8 (byte 0xff at byte 1 of the line: invalid start byte)",
        f"{b}:5: no field 'prompt'; the record has: answer",
        f"{b}:6: expected an object with fields, got list"))
    assert capsys.readouterr().out == ""  # read_records_with_stats is silent
    assert read_records(str(folder), on_error="skip") == records
    assert capsys.readouterr().out == (
        f"[r1jax] data: skipped 8 bad records in {folder} (first: {'; '.join(stats.reasons[:3])})\n")
    assert _error(str(folder)).startswith(f"{a}:2: not valid JSON")  # the default still raises
    with pytest.raises(ValueError, match="on_error='ignore'"):
        read_records(str(folder), on_error="ignore")


def test_empty_or_all_bad_files_have_no_records(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert _error(str(empty)) == f"no records in {empty}"
    blank = _jsonl(tmp_path / "blank.jsonl", [b"", b"  "])
    assert _error(blank) == f"no records in {blank}"
    bad = _jsonl(tmp_path / "bad.jsonl", [b"{", b"{"])
    assert _error(bad, on_error="skip") == (
        f"no records in {bad} (skipped 2 bad records; first: {bad}:1: not valid JSON "
        f"(Expecting property name enclosed in double quotes at column 2); {bad}:2: not valid JSON "
        "(Expecting property name enclosed in double quotes at column 2))")


def test_good_files_read_as_before(tmp_path):
    # A UTF-8 byte-order mark, CRLF line ends, numeric answers and extra fields all read as before.
    file = tmp_path / "d.jsonl"
    file.write_bytes(b'\xef\xbb\xbf{"prompt": "caf\xc3\xa9?", "answer": 3, "task": "t", "meta": {"a": 1}}\r\n'
                     b'{"question": "q", "answer": "steps\\n#### 1,234"}\r\n')
    assert read_records(str(file)) == [{"prompt": "café?", "answer": "3", "task": "t"},
                                       {"question": "q", "prompt": "q", "answer": "1234"}]
    records, stats = read_records_with_stats(os.path.join(GSM8K_DIR, "train.jsonl"))
    assert stats == ReadStats(read=7473, skipped=0, reasons=())
    assert records[0]["answer"] == "72" and records[0]["prompt"].startswith("Natalia sold clips")
