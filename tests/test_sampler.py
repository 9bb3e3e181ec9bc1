"""Sampler: cached greedy equals re-forward, log-probs equal the trainer's, sampling matches the filtered
distribution, stop tokens, sharding invariance, no retrace, memory estimate, CLI and transformers parity.

Compilation dominates on the 2-core CI machine, so tests share a few module-scoped rollouts (each distinct
SamplerConfig or mesh compiles one prefill and one decode program).
"""
import argparse
import functools
import unittest.mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from r1jax import sample_cli, sampler, sharding
from r1jax.model import KVCache, ModelConfig, create_model
from r1jax.sampler import SamplerConfig
from r1jax.tokenizer import load_tokenizer, r1_zero_prompt

# Untied head so logits spread (std ~2 after the scaling below): top-k/top-p cut somewhere interesting.
# Sizes divide the 8 fake devices where they can; 4 kv heads stay whole on an 8-way tensor axis.
CFG = ModelConfig.toy().replace(vocab_size=64, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8,
                                d_ff=128, qkv_bias=True, tie_embeddings=False, max_seq_len=128)
PROMPTS = [[5, 9, 11], [7, 1, 2, 3, 4, 8, 9, 10, 12], [33], [2] * 6 + [40, 41, 42, 43, 44, 45, 46, 47]]  # bucket 16
G, N = 2, 8
BASE = SamplerConfig(max_prompt_len=32, max_new_tokens=N, group_size=G)
SAMPLED = {1.0: BASE.replace(temperature=1.0, top_k=20, top_p=0.9),
           0.7: BASE.replace(temperature=0.7, min_p=0.05)}
MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]


@pytest.fixture(scope="module")
def model():
    mesh = sharding.MeshConfig().make(jax.devices()[:1])
    model = create_model(CFG, mesh=mesh, rules=sharding.SAMPLE_RULES, seed=0)
    model.lm_head.set_value(model.lm_head.get_value() * 2.0)
    return model


def _on_mesh(model, shape):
    """The same weights moved onto a mesh (cheaper here than compiling a sharded init per mesh)."""
    mesh = sharding.MeshConfig(*shape).make()
    moved = sharding.reshard(model, mesh, sharding.SAMPLE_RULES)
    moved.act_sharding = sharding.ActivationSharding(mesh, sharding.SAMPLE_RULES)
    return moved


@functools.partial(jax.jit, static_argnums=0)
def _logits_1xW(graphdef, state, tokens_1xW):
    W = tokens_1xW.shape[1]
    logits, _ = nnx.merge(graphdef, state)(tokens_1xW, jnp.arange(W)[None], jnp.ones((1, W), bool))
    return logits[0]


def _next_logits(model, ids, width=32):
    """Logits after `ids` by a full forward without a cache. The prompt sits at the start of a fixed-width
    buffer (one compile); causality makes the filler after it invisible."""
    buf = np.zeros((1, width), np.int32)
    buf[0, :len(ids)] = ids
    return np.asarray(_logits_1xW(*nnx.split(model), jnp.asarray(buf))[len(ids) - 1])


def _np(rollout):
    return jax.tree.map(np.asarray, rollout)


# ---------------------------------------------------------------------------------------------------------------
# Greedy: cache vs re-forward, stop tokens, top_k=1, groups.


@pytest.fixture(scope="module")
def greedy(model):
    """The uncached greedy reference, a stop id chosen from it, and the sampler's greedy rollout."""
    ref_tokens, ref_logp = [], []
    for prompt in PROMPTS:
        ids, lps = list(prompt), []
        for _ in range(N):
            logits = _next_logits(model, ids)
            ids.append(int(np.argmax(logits)))
            lps.append(float(jax.nn.log_softmax(logits)[ids[-1]]))
            # The cached decode's logits differ from these by rounding (~1e-6): a near-tie could
            # flip its argmax and every token after it. Held to a margin, equality is well-posed.
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] > 1e-4, "greedy near-tie: pick other prompts or another seed"
        ref_tokens.append(ids[len(prompt):])
        ref_logp.append(lps)
    ref_tokens, ref_logp = np.array(ref_tokens), np.array(ref_logp)
    # A stop id that ends some rows early and leaves at least one row running to max_new_tokens.
    stop = next(int(t) for t in ref_tokens[0, 2:] if not (ref_tokens == t).any(axis=1).all())
    cfg = BASE.replace(greedy=True, stop_ids=(stop,), pad_id=63)
    rollout = _np(sampler.generate(model, PROMPTS, jax.random.key(0), cfg))
    return ref_tokens, ref_logp, stop, cfg, rollout


def test_greedy_cached_decode_equals_reforward(greedy):
    ref_tokens, ref_logp, stop, _, r = greedy
    for p in range(len(PROMPTS)):
        hits = np.flatnonzero(ref_tokens[p] == stop)
        n = hits[0] + 1 if hits.size else N
        for row in (p * G, p * G + 1):  # group-major rows, identical under greedy
            np.testing.assert_array_equal(r.tokens_BxT[row, :n], ref_tokens[p, :n])
            np.testing.assert_allclose(r.logp_BxT[row, :n], ref_logp[p, :n], atol=1e-5, rtol=0)
            assert r.lengths_B[row] == n and r.mask_BxT[row].sum() == n and r.mask_BxT[row, :n].all()
            assert r.finished_B[row] == bool(hits.size) and r.truncated_B[row] == (not hits.size)
            # After the stop token: padding, log-prob 0, masked.
            assert (r.tokens_BxT[row, n:] == 63).all() and (r.logp_BxT[row, n:] == 0).all()
    assert r.finished_B.any() and r.truncated_B.any()
    # The prompt columns are the left-padded bucket, repeated per row.
    assert r.prompt_tokens_BxT.shape == (len(PROMPTS) * G, 16)
    np.testing.assert_array_equal(r.prompt_mask_BxT.sum(1), np.repeat([len(p) for p in PROMPTS], G))


def test_top_k_1_equals_greedy(model, greedy):
    *_, cfg, r = greedy
    top1 = _np(sampler.generate(model, PROMPTS, jax.random.key(7), cfg.replace(greedy=False, top_k=1)))
    for name in ("tokens_BxT", "mask_BxT", "finished_B"):
        np.testing.assert_array_equal(getattr(top1, name), getattr(r, name))
    np.testing.assert_allclose(top1.logp_BxT, r.logp_BxT, atol=1e-6, rtol=0)


def test_sampling_view_decodes_like_the_stacked_model(model, greedy):
    """for_sampling's view holds each layer's weights as arrays of their own (no slice of a stacked weight per
    decode step) and decodes the same tokens, with the same log-probs up to rounding."""
    *_, cfg, r = greedy
    view = sharding.for_sampling(model, model.act_sharding.mesh)
    assert isinstance(view.layers, nnx.List) and len(view.layers) == CFG.n_layers
    assert isinstance(model.layers, nnx.Dict)  # the caller's module is left as it was
    got = _np(sampler.generate(view, PROMPTS, jax.random.key(0), cfg))
    np.testing.assert_array_equal(got.tokens_BxT, r.tokens_BxT)
    np.testing.assert_allclose(got.logp_BxT, r.logp_BxT, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Sampling: log-probs against the trainer, groups, determinism.


@pytest.fixture(scope="module")
def sampled(model):
    return {t: sampler.generate(model, PROMPTS, jax.random.key(1), cfg) for t, cfg in SAMPLED.items()}


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced_logits(graphdef, state, tokens, positions, mask):
    return nnx.merge(graphdef, state)(tokens, positions, mask)[0]


@pytest.fixture(scope="module")
def well_posed_sampled(model, sampled):
    """sampled[1.0], once every draw in it is shown to survive lowering the drawn token's logit by 1e-4
    (100x the logit rounding between meshes): only then may another mesh be held to the same tokens."""
    rollout, cfg = sampled[1.0], SAMPLED[1.0]
    logits = _teacher_forced_logits(*nnx.split(model), *rollout.sequences())
    start = rollout.prompt_tokens_BxT.shape[1] - 1
    draw = jax.jit(sampler.sample_tokens, static_argnames="cfg")
    drawn = np.asarray(rollout.tokens_BxT)
    for step in range(N):
        logits_BxV = logits[:, start + step]
        key = jax.random.fold_in(jax.random.key(1), step)  # the sampler's key for this step
        np.testing.assert_array_equal(draw(logits_BxV, key, cfg)[0], drawn[:, step], err_msg="key schedule changed?")
        lowered = logits_BxV - 1e-4 * jax.nn.one_hot(drawn[:, step], CFG.vocab_size)
        np.testing.assert_array_equal(draw(lowered, key, cfg)[0], drawn[:, step],
                                      err_msg="a draw sits on a near-tie: pick another seed")
    return rollout


@pytest.mark.parametrize("temperature", sorted(SAMPLED))
def test_logprobs_equal_trainer_recompute(model, sampled, temperature):
    rollout = sampled[temperature]
    graphdef, state = nnx.split(model)
    recompute = jax.jit(lambda s, r: sampler.recompute_logprobs(nnx.merge(graphdef, s), r, temperature=temperature))
    trainer = np.asarray(recompute(state, rollout))
    r = _np(rollout)
    assert r.mask_BxT.all()  # no stop ids: every row made N tokens
    assert np.abs(trainer - r.logp_BxT).max() <= 1e-5
    assert (r.logp_BxT < 0).all()


def test_group_rows_differ_when_sampling_and_calls_are_deterministic(model, sampled):
    r = _np(sampled[1.0])
    for p in range(len(PROMPTS)):
        assert not np.array_equal(r.tokens_BxT[p * G], r.tokens_BxT[p * G + 1])
    again = _np(sampler.generate(model, PROMPTS, jax.random.key(1), SAMPLED[1.0]))
    np.testing.assert_array_equal(again.tokens_BxT, r.tokens_BxT)
    other = _np(sampler.generate(model, PROMPTS, jax.random.key(2), SAMPLED[1.0]))
    assert not np.array_equal(other.tokens_BxT, r.tokens_BxT)


# ---------------------------------------------------------------------------------------------------------------
# Sampling distribution: chi-square of the first token of 4096 rows against the analytically filtered law.


def _filtered_probs(logits, temperature, top_k, top_p, min_p):
    """transformers' order, written independently in float64: temperature, top-k, top-p (on the renormalised
    survivors, keeping a token while the mass ranked strictly above it is < top_p), then min-p."""
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.ones(x.shape, bool)
    if top_k:
        assert x[order[top_k - 1]] - x[order[top_k]] > 1e-4, "top_k sits on a near-tie: pick another"
        keep[order[top_k:]] = False
    if top_p < 1:
        p = np.where(keep, np.exp(x - x.max()), 0.0)
        p /= p.sum()
        above = np.cumsum(p[order]) - p[order]
        assert np.abs(above[keep[order]] - top_p).min() > 1e-4, "top_p sits on a boundary: pick another"
        keep[order[above >= top_p]] = False
    if min_p:
        assert np.abs(x - x.max() - np.log(min_p)).min() > 1e-4, "min_p sits on a boundary: pick another"
        keep &= np.exp(x - x.max()) >= min_p
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    return p / p.sum()


CHI_P_MIN = 1e-3  # fixed seed, so the test is deterministic; a real mismatch gives p-values far below this
ROWS = 4096


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(0.7, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0),
                                                           (1.5, 0, 0.7, 0.02)])
def test_sampling_distribution_matches_filtered(model, temperature, top_k, top_p, min_p):
    prompt = [3, 14, 15, 9, 26]
    cfg = SamplerConfig(max_prompt_len=16, max_new_tokens=1, group_size=ROWS, temperature=temperature,
                        top_k=top_k, top_p=top_p, min_p=min_p)
    r = _np(sampler.generate(model, [prompt], jax.random.key(3), cfg))
    logits = _next_logits(model, prompt)
    probs = _filtered_probs(logits, temperature, top_k, top_p, min_p)
    counts = np.bincount(r.tokens_BxT[:, 0], minlength=CFG.vocab_size)
    assert counts[probs == 0].sum() == 0, "drew a token the filters remove"
    if top_k or top_p < 1:  # the filter removed something, and left a distribution to test
        assert 3 <= (probs > 0).sum() < CFG.vocab_size
    # Returned log-probs are the unfiltered log_softmax(logits / temperature).
    expected_logp = jax.nn.log_softmax(logits / temperature)[r.tokens_BxT[:, 0]]
    np.testing.assert_allclose(r.logp_BxT[:, 0], expected_logp, atol=1e-5, rtol=0)
    # Chi-square with bins of expected count < 5 pooled.
    expected = probs[probs > 0] * ROWS
    observed = counts[probs > 0].astype(np.float64)
    small = expected < 5
    if small.any():
        expected = np.append(expected[~small], expected[small].sum())
        observed = np.append(observed[~small], observed[small].sum())
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    p_value = float(jax.scipy.stats.chi2.sf(chi2, len(expected) - 1))
    assert p_value > CHI_P_MIN, (chi2, len(expected) - 1, p_value)


def test_sampling_view_holds_compute_dtype_weights_and_samples_the_same():
    """fp32 master weights, bf16 compute: for_sampling casts the weights once (the final norm's scale, used as
    stored, stays fp32) and the forward gives the uncast weights' logits. (XLA's CPU backend cannot run the
    decode's bf16 attention dots, so the comparison is the teacher-forced forward.) The view's layers are separate
    arrays, run unrolled: the master runs unrolled too, since a scan's fusions round bf16 differently."""
    mesh = sharding.MeshConfig().make(jax.devices()[:1])
    master = create_model(CFG.replace(dtype="bfloat16", scan_layers=False), mesh=mesh, seed=0)
    view = sharding.for_sampling(master, mesh)
    dtypes = {k: v.get_value().dtype for k, v in nnx.to_flat_state(nnx.state(view))}
    assert dtypes.pop(("final_norm",)) == jnp.float32
    assert set(dtypes.values()) == {jnp.dtype(jnp.bfloat16)}
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(master)))
    tokens = jnp.asarray([PROMPTS[1]])
    np.testing.assert_array_equal(np.asarray(view(tokens)[0]), np.asarray(master(tokens)[0]))


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 5, 1.0, 0.0), (1.5, 0, 0.7, 0.02)])
def test_sampled_logprobs_are_the_filtered_distributions(model, temperature, top_k, top_p, min_p):
    """logprobs="sampled": the same draws, each with its log-prob under the renormalised filtered distribution
    (the behaviour policy an importance correction divides by)."""
    prompt = [3, 14, 15, 9, 26]
    cfg = SamplerConfig(max_prompt_len=16, max_new_tokens=1, group_size=64, temperature=temperature,
                        top_k=top_k, top_p=top_p, min_p=min_p)
    full = _np(sampler.generate(model, [prompt], jax.random.key(4), cfg))
    sampled = _np(sampler.generate(model, [prompt], jax.random.key(4), cfg.replace(logprobs="sampled")))
    np.testing.assert_array_equal(sampled.tokens_BxT, full.tokens_BxT)
    probs = _filtered_probs(_next_logits(model, prompt), temperature, top_k, top_p, min_p)
    np.testing.assert_allclose(sampled.logp_BxT[:, 0], np.log(probs[sampled.tokens_BxT[:, 0]]), atol=1e-5, rtol=0)
    assert (sampled.logp_BxT[:, 0] > full.logp_BxT[:, 0]).all()  # renormalised over fewer tokens


# ---------------------------------------------------------------------------------------------------------------
# Sharding, retracing, inputs.


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_equals_single_device(model, well_posed_sampled, shape):
    model = _on_mesh(model, shape)
    assert len(model.layers["wq"].get_value().sharding.device_set) == 8
    rollout = sampler.generate(model, PROMPTS, jax.random.key(1), SAMPLED[1.0])
    assert len(rollout.tokens_BxT.sharding.device_set) == 8
    r, single = _np(rollout), _np(well_posed_sampled)
    np.testing.assert_array_equal(r.tokens_BxT, single.tokens_BxT)
    np.testing.assert_array_equal(r.mask_BxT, single.mask_BxT)
    np.testing.assert_allclose(r.logp_BxT, single.logp_BxT, atol=1e-5, rtol=0)


def test_second_call_with_new_weights_and_prompts_does_not_retrace(model, sampled):
    cfg = SAMPLED[1.0]
    before = dict(sampler.TRACES), sampler._prefill._cache_size(), sampler._decode._cache_size()
    # New weights (as after an RL step) under the same graphdef.
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x * 1.01, state)
    stepped = nnx.merge(graphdef, state)
    other = [[1, 2], [3] * 16, [4, 5, 6, 7], [8]]  # different lengths, same bucket (16)
    sampler.generate(stepped, other, jax.random.key(5), cfg).tokens_BxT.block_until_ready()
    # A left-padded array wider than the bucket is cropped to it: same program, same result as the lists.
    tokens = np.zeros((4, 24), np.int32)
    mask = np.zeros((4, 24), bool)
    for row, p in enumerate(PROMPTS):
        tokens[row, 24 - len(p):], mask[row, 24 - len(p):] = p, True
    from_array = _np(sampler.generate(model, tokens, jax.random.key(1), cfg, prompt_mask_PxT=mask))
    np.testing.assert_array_equal(from_array.tokens_BxT, np.asarray(sampled[1.0].tokens_BxT))
    after = dict(sampler.TRACES), sampler._prefill._cache_size(), sampler._decode._cache_size()
    assert after == before


def test_bad_inputs_are_rejected(model):
    with pytest.raises(ValueError, match="exceeds max_prompt_len"):
        sampler.generate(model, [[1] * 33], jax.random.key(0), BASE)
    with pytest.raises(ValueError, match="at least one token"):
        sampler.generate(model, [[1], []], jax.random.key(0), BASE)
    with pytest.raises(ValueError, match="left-padded"):
        sampler.generate(model, np.ones((1, 4), np.int32), jax.random.key(0), BASE,
                         prompt_mask_PxT=np.array([[True, True, False, False]]))
    with pytest.raises(ValueError, match="max_seq_len"):
        sampler.generate(model, [[1]], jax.random.key(0), BASE.replace(max_new_tokens=100))


def test_config_validation_and_buckets():
    assert SamplerConfig(max_prompt_len=200).buckets == (16, 32, 64, 128, 200)
    assert SamplerConfig(max_prompt_len=16).bucket(3) == 16
    cfg = SamplerConfig(max_prompt_len=256, prompt_buckets=[64, 256], stop_ids=[2, 3])
    assert cfg.bucket(65) == 256 and cfg.stop_ids == (2, 3) and hash(cfg)
    for bad in (dict(temperature=0.0), dict(greedy=True, temperature=0.7), dict(top_p=0.0), dict(top_k=-1),
                dict(min_p=1.0), dict(prompt_buckets=(64, 32, 512)), dict(prompt_buckets=(16, 32)),
                dict(group_size=0), dict(cache_dtype="float16"), dict(stop_ids=(-1,))):
        with pytest.raises(ValueError):
            SamplerConfig(**bad)


def test_memory_report_matches_allocations(model):
    cfg = SamplerConfig(max_prompt_len=32, max_new_tokens=16, group_size=4)
    report = sampler.memory_report(CFG, cfg, prompts=2)
    assert report.rows == 8
    assert report.kv_bytes_per_row == KVCache.bytes_per_row(CFG, 48)
    assert report.kv_cache == 8 * report.kv_bytes_per_row
    cache = KVCache.init(CFG, 8, 48)
    assert report.kv_cache == cache.nbytes
    assert report.weights == sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    # On a (2, 2, 2) mesh rows split 4 ways, kv heads 2 ways, weights about 2 ways.
    sharded = sampler.memory_report(CFG, cfg, prompts=2, mesh_shape=(2, 2, 2))
    assert sharded.kv_cache * 8 == report.kv_cache
    assert report.weights / 2 <= sharded.weights < report.weights * 0.6
    assert "kv cache per row" in report.table() and "total" in report.table()


# ---------------------------------------------------------------------------------------------------------------
# Command line on a tiny Hugging Face folder, against transformers' greedy generate.


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is 2 + 2? <think> two and two </think> <answer> 4 </answer>"] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                      tie_word_embeddings=True)
    hf_model = transformers.Qwen2ForCausalLM(config).eval()
    path = str(tmp_path_factory.mktemp("tiny_qwen2"))
    hf_model.save_pretrained(path)
    fast.save_pretrained(path)
    return path, hf_model


def _cli(argv):
    parser = argparse.ArgumentParser()
    sample_cli.add_arguments(parser)
    return sample_cli.run(parser.parse_args(argv))


def test_cli_greedy_on_hf_folder_equals_transformers(hf_folder, capsys):
    import torch

    path, hf_model = hf_folder
    question = "What is 2 + 2?"
    assert _cli(["--model", path, "--prompt", question, "-n", "2", "--temperature", "0", "--chat", "--r1-zero",
                 "--max-new-tokens", "12", "--mesh", "2,2,2"]) == 0
    out = capsys.readouterr().out

    tokenizer = load_tokenizer(path)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": r1_zero_prompt(question)}], tokenize=True)
    with torch.no_grad():
        hf_out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   do_sample=False, max_new_tokens=12, eos_token_id=list(tokenizer.stop_ids),
                                   pad_token_id=tokenizer.pad_id, output_logits=True, return_dict_in_generate=True)
    # r1jax's logits differ from torch's by rounding (~1e-6): exact text is only a fair test without near-ties.
    for logits in hf_out.logits:
        top2 = np.sort(logits[0].float().numpy())[-2:]
        assert top2[1] - top2[0] > 1e-4, "greedy near-tie: pick another seed or question"
    text = tokenizer.decode(hf_out.sequences[0, len(ids):].tolist(), skip_special_tokens=True)
    assert out.count(f"\n{text}\n") == 2, (text, out)
    assert out.count("--- sample") == 2


def test_cli_memory_and_byte_fallback(hf_folder, capsys):
    path, _ = hf_folder
    assert _cli(["--model", path, "--prompt", "hi", "-n", "16", "--max-new-tokens", "64", "--memory"]) == 0
    assert _cli(["--model", "qwen2.5-0.5b", "--prompt", "hi", "-n", "16", "--max-new-tokens", "1024",
                 "--max-prompt-len", "256", "--memory", "--mesh", "1,1,1"]) == 0
    out = capsys.readouterr().out
    assert out.count("kv cache per row") == 2
    # Qwen2.5-0.5B in fp32: 2 * 24 layers * 1280 slots * 2 kv heads * 64 * 4 bytes = 30 MiB per row.
    assert "30.000 MiB" in out
    byte = sample_cli.ByteTokenizer()
    text = "Grüße 42 <think>"
    assert byte.decode(byte.encode(text)) == text
    assert byte.decode([72, 105, 300]) == "Hi<300>"


def test_first_argmax_and_the_draw_equal_jax_random_categorical():
    """The sampler's argmax (two plain reductions) picks jnp.argmax's index, ties and -inf included, so a draw over
    a small vocabulary (one Gumbel-max level) is jax.random.categorical's for the same key."""
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 3, (64, 50)).astype(np.float32)  # many ties
    x[:, ::7] = -np.inf
    np.testing.assert_array_equal(np.asarray(sampler.first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))
    logits = jnp.asarray(rng.normal(size=(32, 97)).astype(np.float32))
    for seed in range(5):
        key = jax.random.key(seed)
        cfg = sampler.SamplerConfig(temperature=0.8)
        token, _ = sampler.sample_tokens(logits, key, cfg)
        np.testing.assert_array_equal(np.asarray(token), np.asarray(jax.random.categorical(key, logits / 0.8)))


def test_two_level_draw_samples_the_softmax():
    """Over more than two blocks of tokens the draw picks a block by its mass, then a token in it: the softmax's
    distribution (chi-square over 50k draws), never a -inf token, a block of -inf only or the padding past C."""
    rng = np.random.default_rng(3)
    C = 3 * sampler._DRAW_BLOCK + 40  # four blocks, the last one padded
    logits = rng.normal(scale=1.5, size=C).astype(np.float32)
    logits[: sampler._DRAW_BLOCK] -= 3.0  # blocks of quite different masses
    logits[sampler._DRAW_BLOCK : 2 * sampler._DRAW_BLOCK] = -np.inf  # a block that can never be drawn
    logits[rng.choice(C, 50, replace=False)] = -np.inf
    draws = 50_000
    tokens = np.asarray(jax.jit(jax.vmap(lambda k: sampler.categorical(k, jnp.asarray(logits)[None])[0]))(
        jax.random.split(jax.random.key(0), draws)))
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    counts = np.bincount(tokens, minlength=C)
    assert len(counts) == C and counts[probs == 0].sum() == 0
    expected, observed = probs[probs > 0] * draws, counts[probs > 0].astype(np.float64)
    small = expected < 5
    expected = np.append(expected[~small], expected[small].sum())
    observed = np.append(observed[~small], observed[small].sum())
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    p_value = float(jax.scipy.stats.chi2.sf(chi2, len(expected) - 1))
    assert p_value > CHI_P_MIN, (chi2, len(expected) - 1, p_value)


@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.95])
def test_top_p_without_a_sort_keeps_the_sorted_definition(top_p):
    """top-p alone (bisection over the float bits) keeps exactly the tokens the sorted definition keeps: those
    whose more probable tokens hold less than top_p."""
    rng = np.random.default_rng(1)
    scaled = jnp.asarray(rng.normal(scale=3.0, size=(64, 1000)).astype(np.float32))
    bisected, ids = sampler.filter_logits(scaled, SamplerConfig(top_p=top_p))
    assert ids is None
    probs = np.asarray(jax.nn.softmax(scaled, axis=-1), np.float64)
    order = np.argsort(-probs, axis=1)
    ranked = np.take_along_axis(probs, order, axis=1)
    ahead = np.cumsum(ranked, axis=1) - ranked
    keep = np.zeros_like(probs, bool)
    np.put_along_axis(keep, order, ahead < top_p, axis=1)
    clear = np.abs(ahead - top_p).min(axis=1) > 1e-5  # rows with no token within rounding of the boundary
    assert clear.sum() > 50
    np.testing.assert_array_equal(np.isfinite(np.asarray(bisected))[clear], keep[clear])
    # On CPU the rows are bisected a few at a time (a 49k vocabulary: one row per pass); the floors are the same.
    probs32 = jax.nn.softmax(scaled, axis=-1)
    whole = np.asarray(sampler._top_p_floor(probs32, top_p))
    with unittest.mock.patch.object(sampler, "_CACHE_BYTES", 3 * 4 * 1000):  # 3 rows fit: 2 divide 64
        np.testing.assert_array_equal(np.asarray(sampler.top_p_floor(probs32, top_p)), whole)
