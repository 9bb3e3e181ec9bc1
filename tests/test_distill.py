"""Distillation losses: the KLs equal a NumPy reference (full vocabulary and top-k), the chunked form equals the
unchunked one (values and gradients), the reverse KL is zero for a student equal to its teacher and its gradient
matches finite differences, and the steps accumulate exactly and ignore how the teacher is sharded."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1jax import distill, sharding, train
from r1jax.model import ModelConfig, create_model


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_kl(s, t, kind, top_k=0):
    """The definitions, in float64, one position at a time."""
    s, t = s.astype(np.float64), t.astype(np.float64)
    out = np.zeros(s.shape[:-1])
    for i in np.ndindex(*s.shape[:-1]):
        ls, lt = _log_softmax(s[i]), _log_softmax(t[i])
        if kind == "reverse":
            out[i] = np.sum(np.exp(ls) * (ls - lt))
        elif top_k:
            top = np.argsort(-t[i], kind="stable")[:top_k]
            lt_k = _log_softmax(t[i][top])
            out[i] = np.sum(np.exp(lt_k) * (lt_k - ls[top]))
        else:
            out[i] = np.sum(np.exp(lt) * (lt - ls))
    return out


def _logits(seed, shape=(3, 5, 11), scale=2.0):
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("kind,top_k", [("forward", 0), ("forward", 4), ("forward", 1), ("reverse", 0)])
def test_token_kl_equals_numpy(kind, top_k):
    s, t = _logits(0), _logits(1)
    got = distill.token_kl(jnp.asarray(s), jnp.asarray(t), kind=kind, top_k=top_k)
    np.testing.assert_allclose(np.asarray(got), _np_kl(s, t, kind, top_k), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got) >= -1e-6)


def test_kl_is_zero_only_for_equal_distributions():
    s = _logits(2)
    for kind in ("forward", "reverse"):
        np.testing.assert_allclose(distill.token_kl(jnp.asarray(s), jnp.asarray(s), kind=kind), 0.0, atol=1e-6)
    # Top-k: zero only when the student's mass outside the teacher's top k is zero too.
    assert float(jnp.min(distill.token_kl(jnp.asarray(s), jnp.asarray(s), kind="forward", top_k=3))) > 1e-3
    with pytest.raises(ValueError, match="full vocabulary"):
        distill.token_kl(jnp.asarray(s), jnp.asarray(s), kind="reverse", top_k=3)


def _hidden_case(seed=0, B=2, T=7, Ds=6, Dt=9, V=13):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    return f(B, T, Ds), f(Ds, V), f(B, T, Dt), f(Dt, V), jnp.asarray(rng.integers(0, V, (B, T)))


@pytest.mark.parametrize("kind,top_k", [("forward", 0), ("forward", 5), ("reverse", 0)])
def test_chunked_kl_equals_unchunked(kind, top_k, monkeypatch):
    h_s, w_s, h_t, w_t, tgt = _hidden_case()
    s_logits = jnp.einsum("BTD,DV->BTV", h_s, w_s) / 0.7
    t_logits = jnp.einsum("BTD,DV->BTV", h_t, w_t) / 0.7
    want = _np_kl(np.asarray(s_logits), np.asarray(t_logits), kind, top_k)

    def total(w, chunk):
        kl, logp = distill.chunked_kl(h_s, w, h_t, w_t, tgt, kind=kind, top_k=top_k, temperature=0.7, chunk=chunk)
        return jnp.sum(kl) + 0.1 * jnp.sum(logp), (kl, logp)

    (_, (kl_full, logp_full)), g_full = jax.value_and_grad(total, has_aux=True)(w_s, 7)
    np.testing.assert_allclose(np.asarray(kl_full), want, rtol=1e-5, atol=1e-6)
    want_logp = np.take_along_axis(_log_softmax(np.asarray(s_logits, np.float64)), np.asarray(tgt)[..., None], -1)
    np.testing.assert_allclose(np.asarray(logp_full), want_logp[..., 0], rtol=1e-5, atol=1e-6)
    for remat in (False, True):  # the kept and the recomputed (large-vocabulary) paths
        monkeypatch.setattr(distill, "HEAD_REMAT_BYTES", 0 if remat else 1 << 40)
        (_, (kl, logp)), g = jax.value_and_grad(total, has_aux=True)(w_s, 3)  # 3 chunks, the last padded
        np.testing.assert_allclose(np.asarray(kl), np.asarray(kl_full), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(logp), np.asarray(logp_full), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_full), rtol=1e-5, atol=1e-6)


def test_vocabularies_must_match():
    h_s, w_s, h_t, w_t, tgt = _hidden_case()
    with pytest.raises(ValueError, match="one shared vocabulary"):
        distill.chunked_kl(h_s, w_s, h_t, w_t[:, :-1], tgt, kind="forward")


def test_reverse_kl_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        h_s, w_s, h_t, w_t, tgt = (x.astype(jnp.float64) if x.dtype == jnp.float32 else x for x in _hidden_case(3))

        def loss(h, w):
            kl, _ = distill.chunked_kl(h, w, h_t, w_t, tgt, kind="reverse", temperature=1.3, chunk=3)
            return jnp.sum(kl)

        g_h, g_w = jax.grad(loss, argnums=(0, 1))(h_s, w_s)
        rng = np.random.default_rng(4)
        for _ in range(3):
            v_h, v_w = rng.standard_normal(h_s.shape), rng.standard_normal(w_s.shape)
            eps = 1e-5
            fd = (loss(h_s + eps * v_h, w_s + eps * v_w) - loss(h_s - eps * v_h, w_s - eps * v_w)) / (2 * eps)
            analytic = jnp.sum(g_h * v_h) + jnp.sum(g_w * v_w)
            np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-7, atol=1e-9)
        # Student equal to teacher: zero loss, zero gradient.
        assert abs(float(loss(h_t, w_t))) < 1e-12
        g_h0, g_w0 = jax.grad(loss, argnums=(0, 1))(h_t, w_t)
        assert float(jnp.max(jnp.abs(g_h0))) < 1e-12 and float(jnp.max(jnp.abs(g_w0))) < 1e-12


# --- the steps on tiny models -------------------------------------------------------------------------------

def _models(mesh_shape=(8, 1, 1), teacher_seed=2):
    cfg = ModelConfig.toy().replace(vocab_size=64, n_layers=2, d_model=32, d_ff=64, head_dim=16)
    tcfg = cfg.replace(d_model=48, d_ff=96)  # a wider teacher on the same vocabulary
    mesh = sharding.MeshConfig(*mesh_shape).make(jax.devices()[: int(np.prod(mesh_shape))])
    student = create_model(cfg, mesh=mesh, seed=1)
    teacher = create_model(tcfg, mesh=mesh, seed=teacher_seed)
    state = train.create_train_state(student, optax.sgd(1.0))  # the update is the gradient itself
    return mesh, state, teacher


def _rl_batch(B=8, Tp=6, T=5, V=64, seed=0):
    k = jax.random.split(jax.random.key(seed), 2)
    prompt = jax.random.randint(k[0], (B, Tp), 0, V)
    prompt_mask = jnp.arange(Tp)[None] >= jnp.array([0, 2, 0, 1, 3, 0, 0, 2])[:, None]
    completion = jax.random.randint(k[1], (B, T), 0, V)
    mask = jnp.arange(T)[None] < jnp.array([5, 3, 5, 1, 4, 5, 2, 5])[:, None]
    zeros = jnp.zeros((B, T))
    return train.RLBatch(prompt, prompt_mask, completion, mask, zeros, None, jnp.zeros((B,)))


def _param_delta(before, state):
    return np.concatenate([np.ravel(np.asarray(a) - np.asarray(b))
                           for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params))])


def test_on_policy_step_accumulates_exactly_and_ignores_the_teachers_sharding():
    results = []
    for micro, teacher_layout in ((1, "train"), (2, "sampling")):
        mesh, state, teacher = _models()
        if teacher_layout == "sampling":
            teacher = sharding.for_sampling(teacher, mesh)
        before = jax.tree.map(np.asarray, state.params)
        graphdef, params = distill.teacher_parts(teacher)
        hp = distill.OnPolicyHyper(kd=distill.KDConfig(chunk=2), microbatches=micro)
        state, m = distill.on_policy_step(state, graphdef, params, _rl_batch(), hp=hp)
        results.append((float(m["loss"]), float(m["grad_norm"]), _param_delta(before, state)))
    loss, norm, delta = results[0]
    assert loss > 0.01 and norm > 0
    for other in results[1:]:
        np.testing.assert_allclose(other[0], loss, rtol=1e-5)
        np.testing.assert_allclose(other[1], norm, rtol=1e-5)
        np.testing.assert_allclose(other[2], delta, rtol=1e-4, atol=1e-7)


def test_on_policy_step_is_zero_for_the_teacher_itself():
    mesh, state, _ = _models()
    graphdef, params = distill.teacher_parts(state.model())
    params = jax.tree.map(jnp.copy, params)  # the step donates the student's buffers
    _, m = distill.on_policy_step(state, graphdef, params, _rl_batch(), hp=distill.OnPolicyHyper())
    assert abs(float(m["loss"])) < 1e-6 and float(m["grad_norm"]) < 1e-5


def _sft_batch(B=8, S=9, V=64, seed=5):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, V, (B, S)))
    lengths = np.array([9, 7, 9, 4, 9, 6, 9, 8])
    mask = jnp.asarray(np.arange(S)[None] < lengths[:, None])
    loss_mask = mask & jnp.asarray(np.arange(S)[None] >= 3)
    return train.SFTBatch(tokens, mask, loss_mask)


def test_logit_kd_step_accumulates_exactly(top_k=8):
    results = []
    for micro in (1, 4):
        _, state, teacher = _models()
        before = jax.tree.map(np.asarray, state.params)
        graphdef, params = distill.teacher_parts(teacher)
        kd = distill.KDConfig(top_k=top_k, ce_weight=0.5, chunk=4)
        state, m = distill.logit_kd_step(state, graphdef, params, _sft_batch(), kd=kd, microbatches=micro)
        results.append(({k: float(v) for k, v in m.items()}, _param_delta(before, state)))
    (m1, d1), (m4, d4) = results
    assert m1["distill_kl"] > 0.01 and m1["ce"] > 1.0
    np.testing.assert_allclose(m1["loss"], m1["distill_kl"] + 0.5 * m1["ce"], rtol=1e-6)
    for k in ("loss", "distill_kl", "ce", "grad_norm"):
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5)
    np.testing.assert_allclose(d4, d1, rtol=1e-4, atol=1e-7)


def test_logit_kd_loss_equals_the_definition_on_the_trained_positions():
    """The step's KL is the mean over exactly the trained positions of the NumPy KL of the two models' logits."""
    _, state, teacher = _models()
    batch = _sft_batch()
    student = state.model()
    s_logits = np.asarray(student.logits(train.sft_hidden(student, batch)))
    t_logits = np.asarray(teacher.logits(train.sft_hidden(teacher, batch)))
    w = np.asarray(train.sft_weight(batch))
    want = (_np_kl(s_logits, t_logits, "forward") * w).sum() / w.sum()
    graphdef, params = distill.teacher_parts(teacher)
    _, m = distill.logit_kd_step(state, graphdef, params, batch, kd=distill.KDConfig())
    np.testing.assert_allclose(float(m["distill_kl"]), want, rtol=1e-4)


# --- teacher traces: filtering on hand-made completions ------------------------------------------------------

def _sample(i, j, completion, *, accuracy=1.0, fmt=1.0, truncated=False, tokens=10):
    return {"id": i, "sample": j, "prompt": f"Compute {i}+1", "answer": str(i + 1), "task": "arith",
            "completion": completion, "tokens": tokens, "truncated": truncated,
            "scores": {"accuracy": accuracy, "format": fmt}}


def test_trace_filtering_on_hand_made_completions(tmp_path, monkeypatch):
    from r1jax import generate, rejection

    good = " <think> 0+1=1. </think> <answer> 1 </answer>"
    samples = [
        _sample(0, 0, good), _sample(0, 1, good + " "),  # the second repeats the first (whitespace aside)
        _sample(0, 2, " <think> 0+1=1 </think> <answer> 1 </answer>"),  # correct, but the quota of 1 is full
        _sample(1, 0, " <answer> 3 </answer>", accuracy=0.0),  # wrong
        _sample(1, 1, " <think> 1+1=2. <answer> 2", fmt=0.0),  # malformed
        _sample(1, 2, " <think> 1+1=2. 1+1=2. 1+1=2.", truncated=True, tokens=40),  # cut at max_new_tokens
        _sample(1, 3, " <think> 1+1=2. 2-0=2. </think> <answer> 2 </answer>", tokens=31),  # over max_tokens
        _sample(2, 0, " <think> 2+1=3. </think> <answer> 3 </answer>"),
    ]
    seen = {}

    def fake_generate(ctx, policy, records, *, name, cfg, render, rewards):
        seen.update(records=records, name=name)
        return generate.GenerationResult(samples, prompts=3, too_long=1, batches=1, resumed_at=0)

    monkeypatch.setattr(generate, "generate_samples", fake_generate)
    ctx = type("Ctx", (), {"stage_dir": lambda self, name: str(tmp_path / name)})()
    cfg = distill.TracesConfig(prompts=3, filter=rejection.RejectionConfig(keep_per_prompt=1, max_tokens=30))
    records = [{"prompt": f"Compute {i}+1", "answer": str(i + 1)} for i in range(5)]
    out = distill.teacher_traces(ctx, None, records, name="traces", cfg=cfg, render=lambda q: f"User: {q}. Assistant:",
                                 rewards=None, teacher_name="teacher-x")
    assert seen == {"records": records[:3], "name": "traces"}  # the first `prompts` records
    with open(out["path"]) as f:
        traces = [json.loads(line) for line in f]
    assert [(t["id"], t["sample"]) for t in traces] == [(0, 0), (2, 0)]
    assert out["total"]["dropped"] == {"incorrect": 1, "malformed": 1, "mixed_language": 0, "overlong": 2,
                                       "duplicate": 1, "over_quota": 1}
    t = traces[0]
    assert (t["prompt"], t["completion"], t["question"], t["answer"]) == ("User: Compute 0+1. Assistant:", good,
                                                                          "Compute 0+1", "1")
    assert t["teacher"] == "teacher-x" and t["settings"]["temperature"] == 0.6 and t["settings"]["top_p"] == 0.95
    assert out["traces"] == 2 and out["prompts_too_long"] == 1
