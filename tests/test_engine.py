"""Continuous batching (r1jax.engine): a request's completion does not depend on what shares the batch with
it, greedy equals the lockstep sampler, log-probs are the trainer's, per-request limits, the Pallas decode
path, sampler dispatch, program reuse, sharded meshes."""
import jax
import numpy as np
import pytest
from flax import nnx

from r1jax import engine, sampler, sharding
from r1jax.sampler import SamplerConfig
from test_sampler import model  # noqa: F401  the same weights, one module-scoped fixture here

PROMPTS = [[5, 9, 11], [7, 1, 2, 3, 4, 8, 9, 10, 12], [33], [2] * 6 + [40, 41, 42, 43, 44, 45, 46, 47],
           [3, 3, 4], [60, 61, 62, 63, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]  # buckets 16, 32
G, N = 2, 12
# Stop ids drawn often enough that completions end at many lengths; 3 slots for 12 requests: slots refill.
CONT = SamplerConfig(max_prompt_len=32, max_new_tokens=N, group_size=G, temperature=0.8, top_k=20, top_p=0.9,
                     stop_ids=tuple(range(0, 64, 5)), pad_id=63, slots=3)


def _np(rollout):
    return jax.tree.map(np.asarray, rollout)


@pytest.fixture(scope="module")
def sampled(model):
    return _np(engine.generate(model, PROMPTS, jax.random.key(1), CONT))


def test_rollout_contract_and_refills(sampled):
    r = sampled
    R = len(PROMPTS) * G
    assert r.tokens_BxT.shape == (R, N) and r.prompt_tokens_BxT.shape == (R, 32)
    np.testing.assert_array_equal(r.prompt_mask_BxT.sum(1), np.repeat([len(p) for p in PROMPTS], G))
    assert len(set(r.lengths_B.tolist())) >= 4, "the stop ids should end completions at many lengths"
    for row in range(R):
        n = r.lengths_B[row]
        assert r.mask_BxT[row].sum() == n and r.mask_BxT[row, :n].all()
        assert (r.tokens_BxT[row, n:] == 63).all() and (r.logp_BxT[row, n:] == 0).all()
        stopped = r.tokens_BxT[row, n - 1] in CONT.stop_ids
        assert r.finished_B[row] == stopped and r.truncated_B[row] == (not stopped)
        assert stopped or n == N
        assert not np.isin(r.tokens_BxT[row, :n - 1], CONT.stop_ids).any()
    assert (r.logp_BxT[r.mask_BxT] < 0).all()


def test_a_completion_does_not_depend_on_what_shares_the_batch(model, sampled):
    """The first prompt's requests keep their ids (0, 1) while every other request changes: other prompts,
    another order, more of them (so slots free and refill at other times). Same slots: identical bits."""
    others = [PROMPTS[5], [9] * 12, PROMPTS[2], PROMPTS[1], [17, 18], PROMPTS[3], [50] * 30]
    alone = _np(engine.generate(model, PROMPTS[:1], jax.random.key(1), CONT))
    mixed = _np(engine.generate(model, PROMPTS[:1] + others, jax.random.key(1), CONT))
    for r in (alone, mixed):
        np.testing.assert_array_equal(r.tokens_BxT[:G], sampled.tokens_BxT[:G])
        np.testing.assert_array_equal(r.logp_BxT[:G], sampled.logp_BxT[:G])
        np.testing.assert_array_equal(r.lengths_B[:G], sampled.lengths_B[:G])
    # More slots change the decode's row count (XLA's matmuls may round differently): same tokens, close logps.
    wide = _np(engine.generate(model, PROMPTS, jax.random.key(1), CONT.replace(slots=12)))
    np.testing.assert_array_equal(wide.tokens_BxT, sampled.tokens_BxT)
    np.testing.assert_allclose(wide.logp_BxT, sampled.logp_BxT, atol=1e-5, rtol=0)
    assert not (sampled.tokens_BxT[0] == sampled.tokens_BxT[1]).all(), "a group's samples should differ"


def test_greedy_equals_the_lockstep_sampler(model):
    cfg = CONT.replace(greedy=True, temperature=1.0, top_k=0, top_p=1.0, stop_ids=())
    free = _np(sampler.generate(model, PROMPTS, jax.random.key(0), cfg.replace(slots=0))).tokens_BxT
    # Stop ids that end some rows early and leave at least one running to max_new_tokens.
    stops = [int(t) for t in np.unique(free[:, 1:]) if not (free == t).any(axis=1).all()][:2]
    cfg = cfg.replace(stop_ids=stops)
    cont = _np(engine.generate(model, PROMPTS, jax.random.key(0), cfg))
    lock = _np(sampler.generate(model, PROMPTS, jax.random.key(0), cfg.replace(slots=0)))
    for name in ("tokens_BxT", "mask_BxT", "lengths_B", "finished_B", "truncated_B", "prompt_tokens_BxT",
                 "prompt_mask_BxT"):
        np.testing.assert_array_equal(getattr(cont, name), getattr(lock, name), err_msg=name)
    np.testing.assert_allclose(cont.logp_BxT, lock.logp_BxT, atol=1e-5, rtol=0)
    assert cont.finished_B.any() and cont.truncated_B.any()


def test_stop_sequences_end_rows_in_both_samplers(model):
    """A two-token stop sequence (a stop string's tokens): each row ends right after its first occurrence."""
    cfg = CONT.replace(greedy=True, temperature=1.0, top_k=0, top_p=1.0, stop_ids=())
    free = _np(sampler.generate(model, PROMPTS, jax.random.key(0), cfg.replace(slots=0))).tokens_BxT
    pairs = {}
    for row in free:
        for j in range(1, N - 1):  # a pair ending before the last column, so its row is cut short
            pairs.setdefault((int(row[j - 1]), int(row[j])), set()).add(tuple(row))
    seq = max((p for p, rows in pairs.items() if len(rows) < len({tuple(r) for r in free})),
              key=lambda p: len(pairs[p]))
    cfg = cfg.replace(stop_sequences=(seq,))
    cont = _np(engine.generate(model, PROMPTS, jax.random.key(0), cfg))
    lock = _np(sampler.generate(model, PROMPTS, jax.random.key(0), cfg.replace(slots=0)))
    for name in ("tokens_BxT", "mask_BxT", "lengths_B", "finished_B"):
        np.testing.assert_array_equal(getattr(cont, name), getattr(lock, name), err_msg=name)
    for row, out in zip(free, cont.tokens_BxT):
        hits = [j for j in range(1, N) if (row[j - 1], row[j]) == seq]
        n = hits[0] + 1 if hits else N
        np.testing.assert_array_equal(out[:n], row[:n])
    assert cont.finished_B.any() and not cont.finished_B.all()
    np.testing.assert_array_equal(cont.finished_B, [any((r[j - 1], r[j]) == seq for j in range(1, N)) for r in free])


def test_logprobs_equal_the_trainers_recompute(model, sampled):
    recomputed = np.asarray(sampler.recompute_logprobs(model, sampler.Rollout(**{
        k: getattr(sampled, k) for k in ("prompt_tokens_BxT", "prompt_mask_BxT", "tokens_BxT", "logp_BxT",
                                         "mask_BxT", "lengths_B", "finished_B", "truncated_B")},
        group_size=G), temperature=CONT.temperature))
    np.testing.assert_allclose(recomputed, sampled.logp_BxT, atol=2e-5, rtol=0)


def test_per_request_limits(model, sampled):
    limits = np.array([1, 2, 3, 12, 5, 12, 7, 8, 9, 10, 11, 4])
    r = _np(engine.generate(model, PROMPTS, jax.random.key(1), CONT, max_new_tokens_R=limits))
    assert (r.lengths_B <= limits).all()
    # A request's tokens are its unlimited run's, cut at its limit.
    for row, cap in enumerate(limits):
        n = r.lengths_B[row]
        assert n == min(cap, sampled.lengths_B[row])
        np.testing.assert_array_equal(r.tokens_BxT[row, :n], sampled.tokens_BxT[row, :n])
        assert r.truncated_B[row] == (not r.finished_B[row])
    with pytest.raises(ValueError, match="max_new_tokens_R"):
        engine.generate(model, PROMPTS, jax.random.key(1), CONT, max_new_tokens_R=[N + 1] * 12)


@pytest.mark.slow  # the kernel's own parity is in test_kernels.py (fast); here it drives the engine, in interpret mode
def test_pallas_decode_equals_xla(model, sampled):
    """The kernel in interpret mode inside the decode loop: the same tokens as the jnp path."""
    r = _np(engine.generate(model, PROMPTS[:3], jax.random.key(1), CONT.replace(decode_impl="pallas")))
    np.testing.assert_array_equal(r.tokens_BxT, sampled.tokens_BxT[:3 * G])
    np.testing.assert_allclose(r.logp_BxT, sampled.logp_BxT[:3 * G], atol=1e-5, rtol=0)


def test_sampler_dispatches_and_programs_are_reused(model, sampled):
    before = dict(engine.TRACES)
    graphdef, state = nnx.split(model)
    stepped = nnx.merge(graphdef, jax.tree.map(lambda x: x * 1.01, state))  # new weights, as after an RL step
    engine.generate(stepped, [[1, 2], [3] * 16, [4, 5, 6, 7], [8], [9] * 20, [10]], jax.random.key(5), CONT)
    # Through sampler.generate, from a left-padded array: the same rollout as the lists.
    tokens = np.zeros((len(PROMPTS), 24), np.int32)
    mask = np.zeros((len(PROMPTS), 24), bool)
    for row, p in enumerate(PROMPTS[:4]):
        tokens[row, 24 - len(p):], mask[row, 24 - len(p):] = p, True
    via = _np(sampler.generate(model, tokens[:4], jax.random.key(1), CONT, prompt_mask_PxT=mask[:4]))
    np.testing.assert_array_equal(via.tokens_BxT, sampled.tokens_BxT[:4 * G])
    assert engine.TRACES == before


@pytest.mark.slow  # compiles the engine twice more; the sharded forward itself is tested fast in test_sampler.py
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 1, 8)])
def test_sharded_equals_single_device(model, sampled, shape):
    mesh = sharding.MeshConfig(*shape).make()
    moved = sharding.reshard(model, mesh, sharding.SAMPLE_RULES)
    moved.act_sharding = sharding.ActivationSharding(mesh, sharding.SAMPLE_RULES)
    r = _np(engine.generate(moved, PROMPTS, jax.random.key(1), CONT.replace(slots=4)))
    np.testing.assert_array_equal(r.tokens_BxT, sampled.tokens_BxT)
    np.testing.assert_allclose(r.logp_BxT, sampled.logp_BxT, atol=1e-5, rtol=0)
