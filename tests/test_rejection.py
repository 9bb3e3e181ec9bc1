"""Rejection sampling's filter: which samples are kept and why the others are dropped, counted by hand; the chat
records and the mixed dataset file."""
import json
import os
import random

import pytest

from r1jax.rejection import REASONS, RejectionConfig, describe, select, to_chat, write_dataset, write_stats
from r1jax.sft_data import RecordSource

CFG = RejectionConfig(keep_per_prompt=2, max_tokens=50)


def _s(id_, j, task, text, acc=1.0, fmt=1.0, lang=1.0, tokens=10, truncated=False, scores=None):
    return {"id": id_, "sample": j, "prompt": f"question {id_}", "answer": "1", "task": task, "completion": text,
            "tokens": tokens, "truncated": truncated,
            "scores": {"accuracy": acc, "format": fmt, "language": lang} if scores is None else scores}


SAMPLES = [
    # Prompt 0 (arith): one kept, every check but the quota fails once.
    _s(0, 0, "arith", "<think>a</think> A"),
    _s(0, 1, "arith", "wrong", acc=0.0),  # incorrect
    _s(0, 2, "arith", "no tags", fmt=0.0),  # malformed
    _s(0, 3, "arith", "both", acc=0.0, fmt=0.0),  # incorrect: the first reason counts
    _s(0, 4, "arith", "mixed", lang=0.9),  # mixed_language
    _s(0, 5, "arith", "cut", truncated=True),  # overlong
    _s(0, 6, "arith", "  <think>a</think>\n A \t"),  # duplicate of sample 0
    _s(0, 7, "arith", "long", tokens=51),  # overlong: over max_tokens
    # Prompt 2 (arith): the quota of two fills.
    _s(2, 0, "arith", "C"),
    _s(2, 1, "arith", "D"),
    _s(2, 2, "arith", "E"),  # over_quota
    _s(2, 3, "arith", "C\t"),  # duplicate comes before over_quota
    _s(2, 4, "arith", "F", tokens=50),  # at max_tokens: fine, but over_quota
    _s(2, 5, "arith", "G", lang=0.95),  # at min_language: fine, but over_quota
    # Prompt 5 (math): absent score names skip their checks.
    _s(5, 0, "math", "wrong", acc=0.0),  # incorrect
    _s(5, 1, "math", "G", scores={"accuracy": 1.0, "format": 1.0}),  # kept: no language score
    _s(5, 2, "math", "H", scores={}),  # kept: no scores at all
    _s(5, 3, "math", "half", fmt=0.5),  # malformed
    _s(5, 4, "math", "cut wrong", acc=0.0, truncated=True),  # incorrect
    _s(5, 5, "math", "G "),  # duplicate
    # Prompt 7 (math): nothing kept.
    *[_s(7, j, "math", f"w{j}", acc=0.0, fmt=float(j % 2), truncated=j == 3) for j in range(6)],
]


def _keys(samples):
    return [(s["id"], s["sample"]) for s in samples]


def _stats(samples, kept, prompts, any_kept, **dropped):
    return {"samples": samples, "kept": kept, "kept_share": kept / samples, "prompts": prompts,
            "prompts_with_any_kept": any_kept, "dropped": {r: dropped.get(r, 0) for r in REASONS}}


def test_select_keeps_and_counts_by_hand():
    kept, stats = select(SAMPLES, CFG)
    assert _keys(kept) == [(0, 0), (2, 0), (2, 1), (5, 1), (5, 2)]
    assert stats == {
        "total": _stats(26, 5, 4, 3, incorrect=10, malformed=2, mixed_language=1, overlong=2, duplicate=3,
                        over_quota=3),
        "tasks": {
            "arith": _stats(14, 3, 2, 2, incorrect=2, malformed=1, mixed_language=1, overlong=2, duplicate=2,
                            over_quota=3),
            "math": _stats(12, 2, 2, 1, incorrect=8, malformed=1, duplicate=1),
        },
    }
    assert list(stats["tasks"]) == ["arith", "math"]
    # The input's order does not matter: samples are judged in (id, sample) order.
    shuffled = SAMPLES[:]
    random.Random(0).shuffle(shuffled)
    assert select(shuffled, CFG) == (kept, stats)


def test_quota_dedupe_and_checks_can_be_turned_off():
    one = RejectionConfig(keep_per_prompt=1, max_tokens=50)
    assert _keys(select(SAMPLES, one)[0]) == [(0, 0), (2, 0), (5, 1)]
    # Without dedupe, prompt 0's whitespace variant is kept, and the quota drops prompt 2's "C\t".
    no_dedupe = RejectionConfig(keep_per_prompt=2, max_tokens=50, dedupe=False)
    kept, stats = select(SAMPLES, no_dedupe)
    assert _keys(kept) == [(0, 0), (0, 6), (2, 0), (2, 1), (5, 1), (5, 2)]
    assert stats["total"]["dropped"] == {"incorrect": 10, "malformed": 2, "mixed_language": 1, "overlong": 2,
                                         "duplicate": 0, "over_quota": 5}
    loose = RejectionConfig(keep_per_prompt=3, max_tokens=0, dedupe=False, require_correct=False,
                            require_format=False, min_language=0.0)
    kept, stats = select(SAMPLES, loose)
    assert _keys(kept) == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1), (2, 2), (5, 0), (5, 1), (5, 2),
                           (7, 0), (7, 1), (7, 2)]
    # Truncated completions are dropped even with max_tokens=0 (the cut-off answer is lost), before the quota.
    assert stats["total"]["dropped"] == {"incorrect": 0, "malformed": 0, "mixed_language": 0, "overlong": 3,
                                         "duplicate": 0, "over_quota": 11}
    # With room for all, prompt 0 loses only its truncated sample and the duplicate; max_tokens=0 keeps 51 tokens.
    quota = RejectionConfig(keep_per_prompt=8, dedupe=True, require_correct=False, require_format=False,
                            min_language=0.0)
    kept, stats = select(SAMPLES, quota)
    assert [j for i, j in _keys(kept) if i == 0] == [0, 1, 2, 3, 4, 7]
    assert stats["tasks"]["arith"]["dropped"]["overlong"] == 1 and stats["tasks"]["arith"]["dropped"]["duplicate"] == 2


def test_config_is_validated():
    for bad in ({"keep_per_prompt": 0}, {"max_tokens": -1}, {"min_language": 1.5}, {"language": ""}):
        with pytest.raises(ValueError):
            RejectionConfig(**bad)


def test_chat_record():
    assert to_chat(SAMPLES[0]) == {
        "messages": [{"role": "user", "content": "question 0"},
                     {"role": "assistant", "content": "<think>a</think> A"}],
        "task": "arith", "id": 0}


def test_general_set_streamed_from_files(tmp_path):
    """A general set on disk (a folder of JSONL) is read record by record: the dataset equals the one written from
    the same records in memory, and `general_limit` takes the first records of the files."""
    kept, _ = select(SAMPLES, CFG)
    general = [{"prompt": f"Say {i}.", "completion": f"{i}.", "task": "chat" if i % 2 else None} for i in range(7)]
    folder = tmp_path / "general"
    folder.mkdir()
    for name, part in (("a.jsonl", general[:4]), ("b.jsonl", general[4:])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part) + "\n")  # a blank line too
    read = lambda p: open(p, "rb").read()  # noqa: E731
    counts = write_dataset(str(tmp_path / "files.jsonl"), kept, RecordSource(str(folder)), seed=5)
    assert counts == write_dataset(str(tmp_path / "memory.jsonl"), kept, general, seed=5)
    assert read(tmp_path / "files.jsonl") == read(tmp_path / "memory.jsonl")
    assert counts["chat"] == 3 and counts["general"] == 4
    limited = write_dataset(str(tmp_path / "limited.jsonl"), kept, RecordSource(str(folder)), seed=5, general_limit=2)
    assert limited == write_dataset(str(tmp_path / "first2.jsonl"), kept, general[:2], seed=5)
    assert read(tmp_path / "limited.jsonl") == read(tmp_path / "first2.jsonl")


def test_mixed_dataset_file_is_complete_and_deterministic(tmp_path):
    kept, stats = select(SAMPLES, CFG)
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "task": "chat"}
    pair = {"prompt": "Name a colour.", "completion": "Blue.", "source": "x"}
    path = str(tmp_path / "out" / "sft.jsonl")
    counts = write_dataset(path, kept, [chat, pair], seed=3)
    assert counts == {"arith": 3, "chat": 1, "general": 1, "math": 2}
    with open(path) as f:
        lines = f.read().splitlines()
    expected = [to_chat(s) for s in kept] + [chat, {
        "messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
        "source": "x", "task": "general"}]
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(json.loads, lines), key=key) == sorted(expected, key=key)
    assert os.listdir(tmp_path / "out") == ["sft.jsonl"]  # no temporary file left behind
    with open(path, "rb") as f:
        first = f.read()
    write_dataset(path, kept, [chat, pair], seed=3)
    with open(path, "rb") as f:
        assert f.read() == first
    write_dataset(path, kept, [chat, pair], seed=4)
    with open(path, "rb") as f:
        other = f.read()
    assert other != first  # another seed, another order (same lines)
    with pytest.raises(ValueError, match="needs 'messages'"):
        write_dataset(path, kept, [{"text": "x"}], seed=3)
    assert os.listdir(tmp_path / "out") == ["sft.jsonl"]  # the failed write left no temporary file
    with open(path, "rb") as f:
        assert f.read() == other  # and the dataset written before it untouched

    write_stats(str(tmp_path / "stats.json"), stats)
    with open(tmp_path / "stats.json") as f:
        assert json.load(f) == stats
    table = describe(stats).splitlines()
    assert len(table) == 4 and table[0].split()[:3] == ["task", "samples", "kept"]
    assert table[-1].split() == ["total", "26", "5", "19.2%", "4", "3", "10", "2", "1", "2", "3", "3"]
