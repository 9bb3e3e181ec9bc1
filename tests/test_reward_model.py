"""Reward model: parity with transformers' *ForSequenceClassification, Bradley-Terry loss and step, Scorer."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from r1jax import sharding
from r1jax.model import ModelConfig
from r1jax.reward_model import (PreferenceBatch, Scorer, as_reward, bradley_terry_loss, create_reward_model,
                                load_reward_model, render_plain, rm_step, save_reward_model)
from r1jax.train import OptimConfig, create_train_state, make_optimizer

TOL = 1e-4  # fp32 scores, max abs difference
PAD = 0
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, num_labels=1, pad_token_id=PAD)
SMALL = ModelConfig("small", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=64, dtype="float32")


def _tiny_hf(kind: str, **overrides):
    torch.manual_seed(0)
    cls, config = {
        "llama": (transformers.LlamaForSequenceClassification, transformers.LlamaConfig),
        "qwen2": (transformers.Qwen2ForSequenceClassification, transformers.Qwen2Config),
        "qwen3": (transformers.Qwen3ForSequenceClassification, transformers.Qwen3Config),
    }[kind]
    extra = {"head_dim": 24, "num_attention_heads": 8} if kind == "qwen3" else {}
    model = cls(config(**{**TINY, **extra, **overrides}, rope_theta=1e6))
    with torch.no_grad():  # init leaves norms at 1 and biases at 0; perturb so the test sees them
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.score.weight.normal_()  # std 1, not 0.02: scores of order 1 make the 1e-4 bar a real one
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def hf_rm(request, tmp_path_factory):
    model = _tiny_hf(request.param)
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    return model, path


def _right_padded():
    """transformers scores the last token that is not pad_token_id: real tokens avoid PAD."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 97, size=(3, 12))
    mask = np.arange(12)[None, :] < np.array([12, 7, 3])[:, None]
    return np.where(mask, tokens, PAD), mask


def _ours(rm, tokens, mask):
    graphdef, state = nnx.split(rm)
    scores = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, m))(state, jnp.asarray(tokens), jnp.asarray(mask))
    return np.asarray(scores)


def _theirs(model, tokens, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)))
    return out.logits[:, 0].float().numpy()


def test_scores_match_transformers(hf_rm):
    model, path = hf_rm
    cfg, rm = load_reward_model(path)
    tokens, mask = _right_padded()
    ref = _theirs(model, tokens, mask)
    assert np.abs(_ours(rm, tokens, mask) - ref).max() <= TOL
    # The same rows left-padded (the sampler's layout) score the same: only the mask locates the last token.
    left = np.stack([np.roll(t, (~m).sum()) for t, m in zip(tokens, mask)])
    left_mask = np.stack([np.roll(m, (~m).sum()) for m in mask])
    assert np.abs(_ours(rm, left, left_mask) - ref).max() <= TOL
    _, rm16 = load_reward_model(path, dtype=jnp.bfloat16)
    assert rm16.score.get_value().dtype == jnp.bfloat16
    assert np.abs(_ours(rm16, tokens, mask) - ref).max() < 0.1  # bf16 weights: loose by construction


def test_save_roundtrip_loads_in_transformers(hf_rm, tmp_path):
    model, path = hf_rm
    cfg, rm = load_reward_model(path, mesh=sharding.MeshConfig(data=2, fsdp=2, tensor=2).make())
    out = str(tmp_path / "saved")
    save_reward_model(cfg, rm, out)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(reloaded) is type(model) and reloaded.config.pad_token_id == PAD
    tokens, mask = _right_padded()
    assert np.abs(_theirs(reloaded, tokens, mask) - _theirs(model, tokens, mask)).max() <= TOL
    _, rm2 = load_reward_model(out)
    for x, y in zip(jax.tree.leaves(nnx.state(rm)), jax.tree.leaves(nnx.state(rm2))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_load_errors_name_the_problem(tmp_path):
    two = str(tmp_path / "two")
    _tiny_hf("qwen2", num_labels=2).save_pretrained(two)
    with pytest.raises(ValueError, match="num_labels=2"):
        load_reward_model(two)
    causal = str(tmp_path / "causal")
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY)).save_pretrained(causal)
    with pytest.raises(ValueError, match="Qwen2ForCausalLM.*ForSequenceClassification"):
        load_reward_model(causal)
    # A CausalLM's tensors under a sequence-classification config: the head is named as missing.
    with open(os.path.join(causal, "config.json")) as f:
        config = json.load(f)
    config.update(architectures=["Qwen2ForSequenceClassification"], id2label={"0": "LABEL_0"})
    with open(os.path.join(causal, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="missing tensors.*score.weight"):
        load_reward_model(causal)


def test_bradley_terry_hand_worked():
    # Differences 0, log 3, -log 3: -log sigmoid gives log 2, log(1 + 1/3) = log(4/3), log(1 + 3) = log 4.
    chosen = jnp.array([0.0, math.log(3), 0.0])
    rejected = jnp.array([0.0, 0.0, math.log(3)])
    loss, aux = bradley_terry_loss(chosen, rejected)
    np.testing.assert_allclose(loss, (math.log(2) + math.log(4 / 3) + math.log(4)) / 3, rtol=1e-6)
    np.testing.assert_allclose(aux.accuracy, 1 / 3, rtol=1e-6)  # a tie is not a win
    np.testing.assert_allclose(aux.margin, 0.0, atol=1e-7)
    # A margin of log 3 on the second pair turns its difference into 0: loss log 2.
    loss, aux = bradley_terry_loss(chosen, rejected, margin_B=jnp.array([0.0, math.log(3), 0.0]))
    np.testing.assert_allclose(loss, (2 * math.log(2) + math.log(4)) / 3, rtol=1e-6)
    np.testing.assert_allclose(aux.accuracy, 1 / 3, rtol=1e-6)
    # d loss / d chosen_i = -(1 - sigmoid(diff_i)) / B: -1/2, -1/4, -3/4, each over 3.
    grad = jax.grad(lambda c: bradley_terry_loss(c, rejected)[0])(chosen)
    np.testing.assert_allclose(grad, np.array([-1 / 2, -1 / 4, -3 / 4]) / 3, rtol=1e-6)


def _preferences(rng, B, S, x):
    """Chosen rows contain token x, rejected rows do not; right padding, lengths 4..S."""
    def rows():
        tokens = rng.integers(x + 1, SMALL.vocab_size, size=(B, S))
        lengths = rng.integers(4, S + 1, size=B)
        return tokens, np.arange(S)[None, :] < lengths[:, None], lengths

    chosen, chosen_mask, lengths = rows()
    chosen[np.arange(B), rng.integers(0, lengths)] = x
    rejected, rejected_mask, _ = rows()
    return chosen, chosen_mask, rejected, rejected_mask


def test_rm_step_learns_a_preference():
    mesh = sharding.MeshConfig(data=2, fsdp=2, tensor=2).make()
    rm = create_reward_model(SMALL, mesh=mesh, seed=1)
    state = create_train_state(rm, make_optimizer(OptimConfig(lr=3e-3), 100))
    arrays = _preferences(np.random.default_rng(0), 64, 8, x=5)
    batch = PreferenceBatch(*(sharding.put_rows(a, mesh, sharding.TRAIN_RULES) for a in arrays))
    history = []
    for _ in range(12):
        state, metrics = rm_step(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    assert history[0]["loss"] > 0.5 and history[-1]["loss"] < 0.1
    assert history[-1]["accuracy"] == 1.0 and history[-1]["nonfinite_updates"] == 0
    assert int(state.step) == 12
    # Held-out pairs: the rule (contains x) was learned, not only the rows (0.91 here; chance is 0.5).
    c, cm, r, rmask = _preferences(np.random.default_rng(1), 64, 8, x=5)
    model = state.model()
    assert np.mean(_ours(model, c, cm) > _ours(model, r, rmask)) >= 0.75


class CharTokenizer:
    """What the Scorer needs of a Tokenizer: one token per character, BOS 1, pad 0."""

    bos_id, pad_id = 1, 0

    def encode_batch(self, texts, *, add_bos=False):
        return [[2 + ord(ch) % (SMALL.vocab_size - 2) for ch in t] for t in texts]


TEXTS = ["short", "", "a somewhat longer text", "x" * 40 + " the end matters", "mid length one", "b", "c" * 9]


def test_scorer_sharded_equals_single_device_and_direct_calls():
    mesh = sharding.MeshConfig(data=2, fsdp=2, tensor=2).make()
    rm = create_reward_model(SMALL, mesh=mesh, seed=3)
    tok = CharTokenizer()
    sharded = Scorer(rm, tok, mesh, batch_size=4, max_len=24)
    single = Scorer(rm, tok, sharding.MeshConfig().make(jax.devices()[:1]), batch_size=4, max_len=24)
    scores = sharded(TEXTS)
    assert scores.dtype == np.float32 and scores.shape == (len(TEXTS),)
    np.testing.assert_allclose(scores, single(TEXTS), atol=1e-5, rtol=0)
    # The model on right-padded rows of BOS + the LAST 23 tokens (an empty text: BOS alone).
    rows = [[1] + ids[-23:] for ids in tok.encode_batch(TEXTS)]
    tokens, mask = np.zeros((len(rows), 24), np.int32), np.zeros((len(rows), 24), bool)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], mask[i, :len(row)] = row, True
    np.testing.assert_allclose(_ours(rm, tokens, mask), scores, atol=1e-5, rtol=0)
    assert sharded.encode(["x" * 40 + " the end matters"])[0][-3:] == tok.encode_batch(["ers"])[0]
    bare = Scorer(rm, tok, mesh, batch_size=4, max_len=24, add_bos=False)
    assert bare.encode(["", "ab"]) == [[tok.pad_id], tok.encode_batch(["ab"])[0]]
    assert [sharded.bucket(n) for n in (1, 16, 17, 23, 24, 200)] == [16, 16, 24, 24, 24, 24]


def test_as_reward_shows_the_answer_or_the_whole_response():
    seen = []

    def scorer(texts):
        seen.append(list(texts))
        return np.arange(len(texts), dtype=np.float32)

    completions = ["<think>long reasoning</think> <answer>42</answer>", "no tags at all"]
    examples = [{"prompt": "What is 6*7?", "answer": "42"}, {"prompt": "Hi", "answer": ""}]
    np.testing.assert_array_equal(as_reward(scorer, "answer")(completions, examples), [0, 1])
    assert seen[-1] == [render_plain("What is 6*7?", "42"), render_plain("Hi", "no tags at all")]
    assert seen[-1][0] == "User: What is 6*7?\n\nAssistant: 42"
    as_reward(scorer, "full", render=lambda p, r: f"{p}|{r}")(completions, examples)
    assert seen[-1] == ["What is 6*7?|" + completions[0], "Hi|no tags at all"]
    with pytest.raises(ValueError, match="view"):
        as_reward(scorer, "reasoning")
    # End to end through a real Scorer.
    rm = create_reward_model(SMALL, seed=4)
    real = Scorer(rm, CharTokenizer(), sharding.MeshConfig().make(), batch_size=8, max_len=64)
    rewards = as_reward(real, "answer")(completions, examples)
    direct = real([render_plain("What is 6*7?", "42"), render_plain("Hi", "no tags at all")])
    np.testing.assert_allclose(rewards, direct, atol=1e-6)
