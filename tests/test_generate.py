"""The generation stage on a tiny random model over 8 devices: k lines per prompt that fits, scored by the right
record; a stopped run, resumed (with a torn last line in its shard), writes the same bytes as an uninterrupted one;
a finished one does no generation."""
import dataclasses
import json
import os

import numpy as np
import pytest

from r1jax import generate, sampler, sharding
from r1jax.generate import GenerationConfig, generate_samples, read_samples
from r1jax.metrics import MetricsLogger
from r1jax.model import ModelConfig, create_model
from r1jax.rejection import RejectionConfig, select
from r1jax.rewards import Reward, RewardSet
from r1jax.run import Context, Policy, Preempted
from r1jax.tokenizer import train_sentencepiece

CFG = GenerationConfig(samples=4, temperature=1.0, top_p=1.0, max_prompt_len=32, max_new_tokens=12,
                       batch_prompts=2)
RECORDS = [{"prompt": f"Compute {a}+{b}", "answer": str(a + b), "task": "arith"} for a, b in
           ((1, 2), (3, 4), (5, 6), (7, 8))]
RECORDS.insert(2, {"prompt": "Compute " + "+".join(["9"] * 40), "answer": "360"})  # too long: dropped, counted
RECORDS.append({"prompt": "What is 2 times 3?", "answer": "6", "language": "en"})  # no task: "math"
KEPT_IDS = [0, 1, 3, 4, 5]  # three batches: 2, 2 and 1 prompts
REWARDS = RewardSet([Reward("length", lambda c, e: np.array([len(t) for t in c], np.float32)),
                     Reward("answer", lambda c, e: np.array([float(x["answer"]) for x in e], np.float32)),
                     Reward("language", lambda c, e: np.full(len(c), 19 / 20, np.float32))])


def render(question):
    return f"User: {question}. Assistant:"


class Stop:
    """Stands in for SIGTERM: set once `shard` holds `lines` lines, seen on the `poll`-th poll from then on."""

    def __init__(self, shard=None, lines=0, poll=1):
        self.shard, self.lines, self.poll, self.polls = shard, lines, poll, 0

    def stop_everywhere(self):
        if self.shard is not None and os.path.exists(self.shard):
            with open(self.shard, "rb") as f:
                self.polls += f.read().count(b"\n") >= self.lines
        return self.shard is not None and self.polls >= self.poll


@pytest.fixture(scope="module")
def policy():
    corpus = [render(r["prompt"]) + " <think> 1 + 2 = 3 </think> <answer> 3 </answer>" for r in RECORDS] * 5
    tok = train_sentencepiece(corpus, None, vocab_size=400)
    mcfg = ModelConfig.toy().replace(vocab_size=tok.vocab_size, n_layers=2, d_model=32, d_ff=64, head_dim=8)
    mesh = sharding.MeshConfig(2, 2, 2).make()
    return Policy(mcfg, create_model(mcfg, mesh=mesh, seed=1), tok)


def _ctx(run_dir, policy, stop=None):
    mesh = policy.model.act_sharding.mesh
    return Context(run_dir=str(run_dir), mesh=mesh, seed=5, logger=MetricsLogger(str(run_dir), enabled=False),
                   stop=stop or Stop(), model_overrides={})


def _run(run_dir, policy, stop=None):
    return generate_samples(_ctx(run_dir, policy, stop), policy, RECORDS, name="gen", cfg=CFG, render=render,
                            rewards=REWARDS)


def _shard(run_dir):
    return os.path.join(run_dir, "gen", "samples-0-of-1.jsonl")


@pytest.fixture(scope="module")
def full(policy, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    return run_dir, _run(run_dir, policy)


def test_k_lines_per_prompt_that_fits_scored_against_their_record(full, policy, monkeypatch):
    run_dir, result = full
    assert (result.prompts, result.too_long, result.batches, result.resumed_at) == (5, 1, 3, 0)
    assert [(s["id"], s["sample"]) for s in result.samples] == [(i, j) for i in KEPT_IDS for j in range(4)]
    for s in result.samples:
        record = RECORDS[s["id"]]
        assert (s["prompt"], s["answer"], s["task"]) == (record["prompt"], record["answer"], record.get("task", "math"))
        assert s.get("language") == record.get("language")
        # float32 scores are written as their shortest decimal: 19/20 reads back as 0.95, not 0.949999988.
        assert s["scores"] == {"length": len(s["completion"]), "answer": float(record["answer"]), "language": 0.95}
        assert 1 <= s["tokens"] <= CFG.max_new_tokens and (not s["truncated"] or s["tokens"] == CFG.max_new_tokens)
    assert any(s["truncated"] for s in result.samples)  # a random model rarely stops: the flag is exercised
    assert len({s["completion"] for s in result.samples}) > 10  # sampled, not one completion repeated
    assert read_samples(os.path.join(run_dir, "gen")) == result.samples
    # The filter reads these lines as they are: every sample's 0.95 passes min_language=0.95 (checked before
    # length), no accuracy or format score means no such check, so only truncated ones are dropped.
    kept, stats = select(result.samples, RejectionConfig(keep_per_prompt=4, dedupe=False))
    truncated = sum(s["truncated"] for s in result.samples)
    assert stats["total"]["dropped"] == {"incorrect": 0, "malformed": 0, "mixed_language": 0, "overlong": truncated,
                                         "duplicate": 0, "over_quota": 0}
    assert sorted(os.listdir(os.path.join(run_dir, "gen"))) == ["generation.json", "samples-0-of-1.jsonl"]

    # Finished: a re-run generates nothing and returns the same samples.
    monkeypatch.setattr(sampler, "generate", lambda *a, **k: pytest.fail("generated again"))
    again = _run(run_dir, policy)
    assert again.samples == result.samples and again.resumed_at == 3


@pytest.mark.parametrize("where", ["between_batches", "inside_decode"])
def test_a_stopped_run_resumes_to_the_same_bytes(full, policy, tmp_path, monkeypatch, where):
    run_dir, result = full
    # Stop once batch 0's 8 lines are written: at the poll before batch 1, or at batch 1's first decode segment.
    monkeypatch.setattr(sampler, "POLL_EVERY", 4)
    stop = Stop(_shard(tmp_path), lines=8, poll=1 if where == "between_batches" else 2)
    with pytest.raises(Preempted) as stopped:
        _run(tmp_path, policy, stop)
    assert ("decode" in [entry.name for entry in stopped.traceback]) == (where == "inside_decode")
    with open(_shard(tmp_path), "rb") as f:
        lines = f.read().splitlines(keepends=True)
    with open(_shard(run_dir), "rb") as f:
        whole = f.read()
    assert len(lines) == 8 and b"".join(lines) == whole[: len(b"".join(lines))]
    # A kill in the middle of the next batch's write: one complete line of batch 1, then half of the next.
    with open(_shard(tmp_path), "ab") as f:
        f.write(whole.splitlines(keepends=True)[8] + whole.splitlines(keepends=True)[9][:20])
    resumed = _run(tmp_path, policy)
    assert resumed.resumed_at == 1 and resumed.samples == result.samples
    with open(_shard(tmp_path), "rb") as f:
        assert f.read() == whole


def test_other_settings_do_not_resume(full, policy):
    run_dir, _ = full
    with pytest.raises(ValueError, match="samples differ"):
        generate_samples(_ctx(run_dir, policy), policy, RECORDS, name="gen", cfg=dataclasses.replace(CFG, samples=2),
                         render=render, rewards=REWARDS)


def test_config_is_validated():
    for bad in ({"samples": 0}, {"batch_prompts": 0}, {"temperature": 0.0}, {"top_p": 0.0}, {"top_k": -1}):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)


def test_shard_reader_checks_the_set(tmp_path):
    for index, rows in ((0, [(1, 0), (0, 1)]), (1, [(0, 0)])):
        with open(generate.shard_path(str(tmp_path), index, 2), "w") as f:
            f.writelines(json.dumps({"id": i, "sample": j}) + "\n" for i, j in rows)
    with open(generate.shard_path(str(tmp_path), 1, 2), "a") as f:
        f.write('{"id": 2, "sam')  # torn: left out
    assert [(r["id"], r["sample"]) for r in read_samples(str(tmp_path))] == [(0, 0), (0, 1), (1, 0)]
    os.remove(generate.shard_path(str(tmp_path), 1, 2))
    with pytest.raises(FileNotFoundError, match=r"shards \[1\] of 2 missing"):
        read_samples(str(tmp_path))


def test_appended_records_are_sampled_incrementally(full, policy, tmp_path, monkeypatch):
    """Two batches' records first, then all: the first run's batches are kept as they are; a changed record is
    not an increment."""
    run_dir, result = full
    first = RECORDS[:4]  # ids 0, 1 (one batch), 2 too long, 3 (a second batch of one prompt, unfinished later)
    _ = generate_samples(_ctx(tmp_path, policy), policy, first, name="gen", cfg=CFG, render=render, rewards=REWARDS)
    with open(_shard(tmp_path), "rb") as f:
        before = f.read().splitlines(keepends=True)
    assert len(before) == 12
    calls = []
    real = sampler.generate
    monkeypatch.setattr(sampler, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    grown = _run(tmp_path, policy)
    # Batch 0 is kept; batch 1 now holds ids 3 and 4, so it is sampled again, and batch 2 (id 5) is new.
    assert grown.resumed_at == 1 and len(calls) == 2
    assert grown.samples == result.samples
    with open(os.path.join(tmp_path, "gen", "generation.json")) as f:
        assert json.load(f)["records"] == len(RECORDS)
    changed = [dict(RECORDS[0], answer="4"), *RECORDS[1:], {"prompt": "Compute 1+1", "answer": "2"}]
    with pytest.raises(ValueError, match="records, records_sha256 differ"):
        generate_samples(_ctx(tmp_path, policy), policy, changed, name="gen", cfg=CFG, render=render, rewards=REWARDS)
