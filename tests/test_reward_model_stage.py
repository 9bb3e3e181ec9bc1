"""Reward-model training stage: learns a separable preference, saves a folder that scores as the trained
model, resumes exactly after a stop, and trains on exactly what `as_reward` will show it."""
import dataclasses
import math
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from r1jax import sharding, train
from r1jax import reward_model_stage as stage_lib
from r1jax.metrics import MetricsLogger, read_metrics
from r1jax.model import ModelConfig, create_model
from r1jax.reward_model import Scorer, as_reward, load_scorer, render_plain, reward_inputs
from r1jax.reward_model_stage import PairBatches, RMConfig, reward_model_from_policy, reward_model_stage
from r1jax.run import Context, Policy, Preempted
from r1jax.tokenizer import train_sentencepiece

NAMES = ["Anna", "Ben", "Carla", "Dev", "Ella", "Finn", "Gus", "Hana", "Ivan", "Jo", "Kim", "Lea", "Max", "Nora",
         "Omar", "Pia"]
WARM = ["Hello {}! So lovely to see you.", "Hi {}, what a joy to meet you!", "Welcome, dear {}! Great to see you."]
CURT = ["What.", "Go away.", "Not now.", "Hm, you again."]


def _greetings(n: int) -> list[dict]:
    """Chosen: a warm greeting with the right name; rejected: a curt one. The reasoning is the same in both,
    so only the answer tells them apart."""
    pairs = []
    for i in range(n):
        name = NAMES[i % len(NAMES)]
        think = f" <think> {name} says hi, I greet {name} </think>"
        pairs.append({"prompt": f"Greet {name}.",
                      "chosen": f"{think} <answer> {WARM[i % len(WARM)].format(name)} </answer>",
                      "rejected": f"{think} <answer> {CURT[i % len(CURT)]} </answer>"})
    return pairs


PAIRS = _greetings(48)
# Shared by the tests that train with Adam, so they share one compiled step (its optimizer is part of the
# jit key); their texts are 33..64 tokens long, so every batch pads to the same width, 64.
LEARN = RMConfig(steps=24, batch_size=8, max_len=64, optim=train.OptimConfig(lr=3e-3), log_every=4,
                 checkpoint_every=100, eval_pairs=8)


@pytest.fixture(scope="module")
def mesh():
    return sharding.MeshConfig(data=2, fsdp=2, tensor=2).make()


@pytest.fixture(scope="module")
def policy(mesh):
    corpus = [render_plain(p["prompt"], p[k]) for p in PAIRS for k in ("chosen", "rejected")]
    tokenizer = train_sentencepiece(corpus, None, 400)
    # Untied embeddings: the policy has an LM head the reward model must leave behind.
    cfg = ModelConfig("tiny", vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=8, d_ff=64, dtype="float32", tie_embeddings=False)
    return Policy(cfg, create_model(cfg, mesh=mesh, seed=7), tokenizer)


class StopAfter:
    """Stands in for SIGTERM: set on the `steps`-th poll (the stage polls once per step)."""

    def __init__(self, steps: int | None = None):
        self.steps, self.polls = steps, 0

    def stop_everywhere(self) -> bool:
        self.polls += 1
        return self.steps is not None and self.polls >= self.steps


def _ctx(run_dir, mesh, stop=None) -> Context:
    return Context(run_dir=str(run_dir), mesh=mesh, seed=3, logger=MetricsLogger(str(run_dir), enabled=False),
                   stop=stop or StopAfter(), model_overrides={})


def _host(module) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module))]


@pytest.fixture(scope="module")
def trained(policy, mesh, tmp_path_factory):
    """One learning run (Adam), with the model the stage saved caught on its way to the folder."""
    run_dir = tmp_path_factory.mktemp("learn")
    before = _host(policy.model)
    saved = []
    original = stage_lib.save_reward_model

    def spy(cfg, rm, path, **kwargs):
        saved.append(rm)
        original(cfg, rm, path, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage_lib, "save_reward_model", spy)
        path = reward_model_stage(_ctx(run_dir, mesh), policy, PAIRS, LEARN, name="rm_helpful")
    return run_dir, path, saved[0], before


def test_stage_learns_a_separable_preference(trained, policy):
    run_dir, path, _, before = trained
    assert path == os.path.join(str(run_dir), "rm_helpful", "final")
    records = read_metrics(os.path.join(str(run_dir), "rm_helpful"))
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [4, 8, 12, 16, 20, 24]
    assert all({"loss", "accuracy", "margin", "grad_norm"} <= r.keys() for r in steps)
    assert steps[-1]["loss"] < 0.1 * math.log(2) and steps[-1]["accuracy"] == 1.0
    (heldout,) = [r for r in records if r["kind"] == "eval"]
    assert heldout["step"] == 24 and heldout["heldout_pairs"] == 8
    assert heldout["heldout_accuracy"] == 1.0 and heldout["heldout_loss"] < 0.1 * math.log(2)
    # The policy's own weights are untouched (the RM trained on a copy; its donated buffers were its own).
    for x, y in zip(before, _host(policy.model)):
        np.testing.assert_array_equal(x, y)


def test_saved_folder_scores_as_the_trained_model(trained, mesh, policy):
    _, path, rm, _ = trained
    assert os.path.exists(os.path.join(path, "tokenizer.model"))
    texts = reward_inputs([p["prompt"] for p in PAIRS[:6]], [p["chosen"] for p in PAIRS[:3]]
                          + [p["rejected"] for p in PAIRS[3:6]], "full")
    loaded = load_scorer(path, mesh, batch_size=8, max_len=64)(texts)
    direct = Scorer(rm, policy.tokenizer, mesh, batch_size=8, max_len=64)(texts)
    assert np.abs(direct).max() > 0.5  # real scores, not a model that outputs ~0 for everything
    np.testing.assert_allclose(loaded, direct, atol=1e-5, rtol=0)
    # Through the reward contract, on held-out pairs: the warm greeting wins every time.
    reward = as_reward(load_scorer(path, mesh, batch_size=8, max_len=64), "full")
    held = PAIRS[-8:]
    chosen = reward([p["chosen"] for p in held], held)
    rejected = reward([p["rejected"] for p in held], held)
    assert np.all(chosen > rejected)


def test_stop_and_resume_equals_an_uninterrupted_run(policy, mesh, tmp_path, monkeypatch):
    # Plain SGD: each update is proportional to its gradient, not normalised by Adam's tiny early moments.
    sgd = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05))
    monkeypatch.setattr(train, "make_optimizer", lambda optim, steps: sgd)
    cfg = RMConfig(steps=6, batch_size=8, max_len=64, log_every=1, checkpoint_every=100, eval_pairs=8)
    pairs = PAIRS[:16] + PAIRS[-8:]  # 16 to train on: two batches an epoch, so step 3 stops mid-epoch
    full = reward_model_stage(_ctx(tmp_path / "full", mesh), policy, pairs, cfg, name="rm")
    with pytest.raises(Preempted, match="step 3"):
        reward_model_stage(_ctx(tmp_path / "cut", mesh, StopAfter(3)), policy, pairs, cfg, name="rm")
    assert not os.path.exists(os.path.join(str(tmp_path / "cut"), "rm", "final"))
    resumed = reward_model_stage(_ctx(tmp_path / "cut", mesh), policy, pairs, cfg, name="rm")

    a, b = (read_metrics(os.path.dirname(path), kind="train") for path in (full, resumed))
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert a == b
    assert a[-1]["loss"] < a[0]["loss"]  # it trained
    texts = reward_inputs([p["prompt"] for p in pairs[:8]], [p["chosen"] for p in pairs[:8]], "full")
    np.testing.assert_allclose(load_scorer(resumed, mesh, batch_size=8, max_len=64)(texts),
                               load_scorer(full, mesh, batch_size=8, max_len=64)(texts), atol=1e-5, rtol=0)


def test_answer_view_trains_on_the_answer_block_only(policy, mesh, tmp_path):
    # The reasoning differs, the answer is the same: under view="answer" chosen and rejected read the same.
    answer = "Hello {0}! So lovely to see you, {0}. Welcome, dear {0}!"
    pairs = [{"prompt": f"Greet {n}.",
              "chosen": f" <think> be warm to {n} </think> <answer> {answer.format(n)} </answer>",
              "rejected": f" <think> be rude to {n} </think> <answer> {answer.format(n)} </answer>"} for n in NAMES[:8]]
    cfg = dataclasses.replace(LEARN, eval_pairs=0)
    out = str(tmp_path / "elsewhere")
    assert reward_model_stage(_ctx(tmp_path, mesh), policy, pairs, cfg, name="rm_answer", view="answer",
                              out_dir=out) == out
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    stage_dir = os.path.join(str(tmp_path), "rm_answer")
    samples = read_metrics(os.path.join(stage_dir, "samples.jsonl"), dedupe=False)
    assert len(samples) == 4
    for s in samples:
        name = s["prompt"].removeprefix("Greet ").removesuffix(".")
        assert s["chosen"] == s["rejected"] == f"User: Greet {name}.\n\nAssistant: {answer.format(name)}"
    # Identical inputs score identically: the loss is log 2 and no pair is won, at every step.
    for r in read_metrics(stage_dir, kind="train"):
        assert abs(r["loss"] - math.log(2)) < 1e-6 and r["accuracy"] == 0.0 and r["margin"] == 0.0


def test_reward_inputs_are_what_as_reward_shows_the_scorer():
    seen = []

    def scorer(texts):
        seen.extend(texts)
        return np.zeros(len(texts), np.float32)

    prompts, responses = [p["prompt"] for p in PAIRS[:3]], [p["chosen"] for p in PAIRS[:3]]
    for view in ("answer", "full"):
        seen.clear()
        as_reward(scorer, view)(responses, [{"prompt": p, "answer": ""} for p in prompts])
        assert reward_inputs(prompts, responses, view) == seen
    assert reward_inputs(prompts[:1], responses[:1], "answer") == ["User: Greet Anna.\n\nAssistant: Hello Anna! So "
                                                                   "lovely to see you."]
    assert reward_inputs(prompts[:1], responses[:1], "full") == [f"User: Greet Anna.\n\nAssistant: {responses[0]}"]


def test_reward_model_from_policy_copies_the_backbone(policy, mesh):
    rm = reward_model_from_policy(policy, mesh, seed=0)
    src, dst = nnx.state(policy.model), nnx.state(rm)
    assert "lm_head" in src and "lm_head" not in dst["backbone"]
    for key in ("embed", "final_norm"):
        np.testing.assert_array_equal(np.asarray(dst["backbone"][key].get_value()), np.asarray(src[key].get_value()))
    for key in src["layers"]:
        got, want = dst["backbone"]["layers"][key].get_value(), src["layers"][key].get_value()
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == want.sharding  # the policy sits on the training rules too
    head = dst["score"].get_value()
    assert head.shape == (32, 1) and 0 < float(np.abs(np.asarray(head)).max()) < 1.0
    other = reward_model_from_policy(policy, mesh, seed=1)
    assert not np.array_equal(np.asarray(other.score.get_value()), np.asarray(head))


def test_pair_batches_are_seeded_epochs_that_resume_mid_epoch():
    a = PairBatches(10, 3, seed=5)
    epoch0 = [a.next().tolist() for _ in range(3)]  # 3 batches an epoch; the pair left over is dropped
    assert len(set(sum(epoch0, []))) == 9
    epoch1 = [a.next().tolist() for _ in range(3)]
    assert epoch1 != epoch0 and len(set(sum(epoch1, []))) == 9
    b = PairBatches(10, 3, seed=5)
    b.set_state({"epoch": 0, "index": 1})
    assert [b.next().tolist() for _ in range(5)] == epoch0[1:] + epoch1
    assert a.get_state() == b.get_state() == {"epoch": 1, "index": 3}
    with pytest.raises(ValueError, match="cannot fill"):
        PairBatches(2, 3, seed=0)


def test_config_and_pairs_are_checked_before_any_compute(policy, mesh, tmp_path):
    for bad, message in ((dict(steps=0), "steps=0"), (dict(batch_size=0), "batch_size=0"),
                         (dict(max_len=1), "max_len=1"), (dict(eval_pairs=-1), "eval_pairs=-1")):
        with pytest.raises(ValueError, match=message):
            RMConfig(**bad)
    with pytest.raises(ValueError, match="eval_pairs=4 leaves none of the 4"):
        reward_model_stage(_ctx(tmp_path, mesh), policy, PAIRS[:4], RMConfig(eval_pairs=4), name="rm")
    with pytest.raises(ValueError, match=r"pair 1 lacks .*'rejected'"):
        reward_model_stage(_ctx(tmp_path, mesh), policy, [PAIRS[0], {"prompt": "p", "chosen": "c"}], RMConfig(),
                           name="rm")
