"""The SFT stage on streamed data: exact resume (data position included), exact gradient accumulation,
mixture weights, epochs -> steps, evaluation at the right steps once, learning packed and unpacked,
bad records named by file and line."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from r1jax import sharding, sft, train
from r1jax.checkpoint import Checkpointer
from r1jax.metrics import MetricsLogger, read_metrics
from r1jax.model import ModelConfig, create_model
from r1jax.packing import PackedBatches
from r1jax.run import Context, Policy, Preempted
from r1jax.sft_data import ExampleStream

SGD = optax.sgd(0.1)  # one object: the optimizer is part of the jit cache key, so every SGD run shares a compile


class _Chars:
    """A character tokenizer: a test can read back which record each token came from."""

    bos_id, eos_id, pad_id, stop_ids, chat_template, vocab_size = 1, 2, 0, (2,), None, 128

    def encode(self, text, *, add_bos=False):
        return [1] * add_bos + [ord(c) for c in text]

    def encode_batch(self, texts, *, add_bos=False):
        return [self.encode(t, add_bos=add_bos) for t in texts]


class _Stop:
    """stop_everywhere() turns True at its `after`-th poll (never when None)."""

    def __init__(self, after=None):
        self.after, self.polls = after, 0

    def stop_everywhere(self):
        self.polls += 1
        return self.after is not None and self.polls >= self.after


MESH = sharding.MeshConfig(4, 2, 1)  # rows over data x fsdp = 8; weights split over fsdp too
MODEL_CFG = ModelConfig.toy().replace(vocab_size=128, n_layers=2, d_model=64, d_ff=128, head_dim=16)


@pytest.fixture(scope="module")
def mesh():
    return MESH.make()


@pytest.fixture(scope="module")
def base_model(mesh):
    return create_model(MODEL_CFG, mesh=mesh, seed=1)


def _policy(model):
    """A policy on a copy of the weights (the stage's train step donates them)."""
    graphdef, params = nnx.split(model)
    return Policy(MODEL_CFG, nnx.merge(graphdef, jax.tree.map(jnp.copy, params)), _Chars())


def _ctx(run_dir, mesh, stop=None):
    logger = MetricsLogger(str(run_dir), tensorboard=False, validate=False)
    return Context(run_dir=str(run_dir), mesh=mesh, seed=0, logger=logger, stop=stop or _Stop(), model_overrides={})


def _pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["two", "plus", "three", "is", "five", "x", "=", "7", "so"]
    phrase = lambda k: " ".join(rng.choice(words, rng.integers(1, k)))  # noqa: E731
    return [(phrase(4) + "?", " " + phrase(5)) for _ in range(n)]


def _losses(run_dir, name="sft"):
    return [(r["step"], r["loss"]) for r in read_metrics(str(run_dir / name), dedupe=False)]


@pytest.fixture
def sgd(monkeypatch):
    """SGD instead of Adam: parameters then differ by the gradients' rounding noise only (Adam would
    turn that noise into full-size steps)."""
    monkeypatch.setattr(train, "make_optimizer", lambda cfg, steps: SGD)


@pytest.fixture
def recorded(monkeypatch):
    """The stage's train step replaced by one that records the host batches and changes nothing."""
    batches = []

    def step(state, batch, chunk=256, microbatches=1):
        batches.append(jax.tree.map(sharding.host_array, batch))
        zero = jnp.zeros((), jnp.float32)
        return state, {"loss": zero, "grad_norm": zero, "nonfinite_updates": jnp.zeros((), jnp.int32)}

    monkeypatch.setattr(train, "sft_step", step)
    return batches


FAST = sft.SFTConfig(steps=6, batch_size=16, max_len=48, log_every=1, checkpoint_every=100, shuffle_window=8)


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, mesh, base_model, sgd):
    # With examples cut to S (their start kept) and left out (no completion token within S), counted.
    data = _pairs(150) + [("long?", " " + "x" * 60)] * 4 + [("y" * 60, " z")] * 2
    whole = sft.sft_stage(_ctx(tmp_path / "a", mesh), _policy(base_model), data, FAST, name="sft", seed=3)
    with pytest.raises(Preempted, match="step 3"):  # inside a packing window (4 batches): resumed by re-packing it
        sft.sft_stage(_ctx(tmp_path / "b", mesh, _Stop(after=3)), _policy(base_model), data, FAST, name="sft", seed=3)
    assert [s for s, _ in _losses(tmp_path / "b")] == [1, 2, 3]
    resumed = sft.sft_stage(_ctx(tmp_path / "b", mesh), _policy(base_model), data, FAST, name="sft", seed=3)
    expected = read_metrics(str(tmp_path / "a" / "sft"))
    assert len(expected) == 6 and read_metrics(str(tmp_path / "b" / "sft"), dedupe=False) == expected
    assert all(r["examples"] > 16 and 0 < r["padding_share"] < 0.3 for r in expected)  # packed: several per row
    assert expected[-1]["pack_truncated"] >= 4 and expected[-1]["pack_dropped"] >= 2  # an epoch was read
    for x, y in zip(jax.tree.leaves(nnx.state(whole.model)), jax.tree.leaves(nnx.state(resumed.model))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)


def test_microbatches_equal_one_batch(tmp_path, mesh, base_model, sgd, monkeypatch):
    data = _pairs(150, seed=1)
    step, seen = train.sft_step, []
    monkeypatch.setattr(train, "sft_step", lambda state, batch, **kw: seen.append(kw) or step(state, batch, **kw))
    runs = []
    for micro in (1, 2):
        cfg = dataclasses.replace(FAST, steps=3, microbatches=micro)
        policy = sft.sft_stage(_ctx(tmp_path / str(micro), mesh), _policy(base_model), data, cfg, name="sft", seed=0)
        runs.append((_losses(tmp_path / str(micro)), jax.tree.leaves(nnx.state(policy.model))))
    assert seen == [{"microbatches": 1}] * 3 + [{"microbatches": 2}] * 3
    (loss_1, params_1), (loss_2, params_2) = runs
    np.testing.assert_allclose([v for _, v in loss_1], [v for _, v in loss_2], atol=1e-6, rtol=0)
    assert loss_1[0][1] != loss_1[2][1]
    for x, y in zip(params_1, params_2):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"batch_size=16 rows do not split into microbatches=4 .* = 8 devices"):
        sft.sft_stage(_ctx(tmp_path / "bad", mesh), _policy(base_model), data,
                      dataclasses.replace(FAST, microbatches=4), name="sft", seed=0)


def test_mixture_weights_are_honoured_by_the_stage(tmp_path, mesh, base_model, recorded):
    with open(tmp_path / "a.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"q{i % 10}", "completion": "a" * (1 + i % 4)}) + "\n")
    pairs = [(f"p{i}", "b" * (1 + i % 3)) for i in range(7)]
    data = [(str(tmp_path / "a.jsonl"), 3.0), (pairs, 1)]
    assert [w for _, w in sft.data_sources(data)] == [3.0, 1.0]
    cfg = dataclasses.replace(FAST, steps=20)
    sft.sft_stage(_ctx(tmp_path, mesh), _policy(base_model), data, cfg, name="sft", seed=0)
    kinds = []
    for b in recorded:
        for r in range(b.tokens_BxS.shape[0]):
            for s in range(1, b.segment_ids_BxS[r].max() + 1):
                trained = b.tokens_BxS[r][(b.segment_ids_BxS[r] == s) & b.loss_mask_BxS[r]]
                kinds.append(chr(trained[0]))  # the completion's first character names its source
    assert set(kinds) == {"a", "b"} and len(kinds) > 1500
    assert abs(np.mean(np.array(kinds) == "a") - 0.75) < 0.04
    logged = read_metrics(str(tmp_path / "sft"))
    assert sum(r["examples"] for r in logged) == len(kinds)
    assert sum(r["trained_tokens"] for r in logged) == sum(int(b.loss_mask_BxS.sum()) for b in recorded)


def test_what_counts_as_a_mixture():
    pairs = [("a", "b"), ("c", "d")]
    assert sft.data_sources(pairs) == [([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}], 1.0)]
    assert sft.data_sources("x.jsonl") == [("x.jsonl", 1.0)]
    assert sft.data_sources([("x.jsonl", 2), (pairs, 0.5)])[1] == (sft.data_sources(pairs)[0][0], 0.5)
    with pytest.raises(ValueError, match="every item"):
        sft.data_sources([("x.jsonl", 2), "y.jsonl"])
    with pytest.raises(ValueError, match="prompt text, completion text"):
        sft.data_sources([("a", "b"), ("c", 3, "d")])


def test_epochs_set_the_steps_from_the_data(tmp_path, mesh, base_model, recorded, capsys):
    same = [("ab", "cd")] * 300  # 6 tokens each (BOS, a, b, c, d, EOS): 8 per 48-token row, 128 per packed step
    cfg = dataclasses.replace(FAST, epochs=1.5)
    assert sft.epoch_steps(same, _Chars(), cfg, seed=0) == (4, 128.0, 300)  # ceil(450 / 128)
    unpacked = dataclasses.replace(cfg, pack=False, epochs=0.5)
    assert sft.epoch_steps(same, _Chars(), unpacked, seed=0) == (10, 16.0, 300)  # ceil(150 / 16)
    mix = [(same[:200], 1.0), (same[:100], 5.0)]  # records summed over the sources
    assert sft.epoch_steps(mix, _Chars(), dataclasses.replace(cfg, epochs=1.0), seed=0) == (3, 128.0, 300)
    # Longer examples: fewer per step, more steps.
    longer = [("abcd", "efghij")] * 300  # 12 tokens: 4 per row, 64 per step
    assert sft.epoch_steps(longer, _Chars(), cfg, seed=0) == (8, 64.0, 300)
    sft.sft_stage(_ctx(tmp_path, mesh), _policy(base_model), same, cfg, name="sft", seed=0)
    assert [r["step"] for r in read_metrics(str(tmp_path / "sft"))] == [1, 2, 3, 4]
    assert "epochs=1.5 of 300 records at ~128.0 records per step" in capsys.readouterr().out


def test_evaluation_runs_at_start_and_end_once(tmp_path, mesh, base_model, sgd):
    calls = []

    def evaluation(ctx, model, tokenizer, stage, step):
        calls.append((stage, step, jax.tree.map(np.asarray, nnx.state(model))))
        if step == 2 and len(calls) == 2:  # SIGTERM during the final evaluation of the first attempt
            raise Preempted("stopped")
        ctx.logger.log_eval({"step": step, "stage": stage, "eval_accuracy": 0.5})

    cfg = dataclasses.replace(FAST, steps=2)
    data = _pairs(60, seed=2)

    def run():
        return sft.sft_stage(_ctx(tmp_path, mesh), _policy(base_model), data, cfg, name="sft", seed=0,
                             evaluation=evaluation, evaluate_start=True)

    with pytest.raises(Preempted):
        run()
    assert [(s, t) for s, t, _ in calls] == [("sft", 0), ("sft", 2)]
    assert Checkpointer(str(tmp_path / "sft" / "checkpoints")).latest_step() == 2  # the finished steps are kept
    policy = run()  # the re-run: no training, the end's evaluation only, on the model trained before
    assert [t for _, t, _ in calls] == [0, 2, 2]
    assert [r["step"] for r in read_metrics(str(tmp_path / "sft"), dedupe=False)] == [1, 2]
    start, first, again = (c[2] for c in calls)
    trained = jax.tree.map(np.asarray, nnx.state(policy.model))
    for s, f, a, t in zip(*map(jax.tree.leaves, (start, first, again, trained))):
        np.testing.assert_array_equal(f, a)
        np.testing.assert_array_equal(a, t)
    assert max(np.abs(s - t).max() for s, t in zip(jax.tree.leaves(start), jax.tree.leaves(trained))) > 1e-3
    run()  # both evaluations are logged: none runs again
    assert len(calls) == 3
    assert [r["step"] for r in read_metrics(str(tmp_path), kind="eval")] == [0, 2]


def test_packed_and_unpacked_rows_both_learn_a_small_set(tmp_path, mesh, base_model):
    data = [(f"Q{i}:", f" answer {i * 7 % 10}{i}") for i in range(8)]  # 15 tokens each
    losses = {}
    for pack in (True, False):
        cfg = sft.SFTConfig(steps=20, batch_size=16, max_len=48, pack=pack, log_every=1, checkpoint_every=100,
                            optim=train.OptimConfig(lr=2e-2, warmup_steps=2, schedule="cosine"))
        sft.sft_stage(_ctx(tmp_path / str(pack), mesh), _policy(base_model), data, cfg, name="sft", seed=0)
        records = read_metrics(str(tmp_path / str(pack) / "sft"))
        losses[pack] = [r["loss"] for r in records]
        assert losses[pack][-1] < 0.15 * losses[pack][0], losses[pack]
        # Packed: 3 examples per 48-token row; unpacked: one per row, cut to 16 columns.
        assert all(r["examples"] == (48 if pack else 16) for r in records)
        assert all(r["padding_share"] == pytest.approx(1 / 16, abs=1e-6) for r in records)
    # Every batch holds each record equally often (6 times packed, twice unpacked), so the token-mean
    # losses are the same function of the weights: the two runs agree up to Adam-amplified rounding.
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4, atol=0)


def test_batches_go_onto_the_training_shardings(mesh):
    packer = PackedBatches(ExampleStream([{"prompt": "ab", "completion": "c" * k} for k in range(1, 9)], _Chars(),
                                         seed=0), seq_len=48, batch_size=16, window_batches=1, pack=False)
    packed = packer.next()
    batch = sft.device_batch(packed, mesh, pack=False)
    assert np.all(packed.segment_ids_BxS.max(axis=1) == 1)  # unpacked: one example per row
    assert batch.tokens_BxS.shape == (16, 16) and batch.segment_ids_BxS is None  # longest row 12 -> 16 columns
    for got, rows in ((batch.tokens_BxS, packed.tokens_BxS), (batch.loss_mask_BxS, packed.loss_mask_BxS)):
        want = sharding.put_rows(rows[:, :16], mesh, sharding.TRAIN_RULES)
        assert got.sharding == want.sharding and got.sharding.spec[0] == ("data", "fsdp")
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    batch = sft.device_batch(packed, mesh, pack=True)
    assert batch.tokens_BxS.shape == (16, 48) and batch.positions_BxS.sharding == batch.tokens_BxS.sharding


def test_a_bad_record_stops_the_stage_naming_file_and_line(tmp_path, mesh, base_model, recorded):
    lines = [json.dumps({"prompt": f"q{i}", "completion": "a"}) for i in range(30)]
    lines[17] = json.dumps({"question": "q"})
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl:18: expected 'messages'"):
        sft.sft_stage(_ctx(tmp_path, mesh), _policy(base_model), str(tmp_path / "data.jsonl"), FAST, name="sft",
                      seed=0)


def test_config_is_checked():
    for bad in ({"epochs": -1.0}, {"microbatches": 0}, {"shuffle_window": 0}, {"checkpoint_keep": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sft.SFTConfig(**bad)
