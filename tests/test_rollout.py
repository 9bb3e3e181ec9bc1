"""The rollout seam: prompts that do not fit are dropped and counted (never cut), scoring splits over
processes, and decoding in polled segments gives the same tokens and can be abandoned."""
import jax
import numpy as np
import pytest

from r1jax import rollout, sampler, sharding
from r1jax.model import ModelConfig, create_model
from r1jax.rewards import Reward, RewardSet


class WordTokenizer:
    """One token per whitespace-separated word; BOS is token 1."""

    def encode_batch(self, texts, add_bos=False):
        return [[1] * add_bos + [2 + len(w) for w in t.split()] for t in texts]


def _render(question):
    return "User: " + question + " Assistant:"


def test_encode_prompts_drops_and_counts_prompts_that_do_not_fit():
    records = [{"prompt": "a b"}, {"prompt": "a b c d e f"}, {"prompt": "a"}]
    kept, ids, dropped = rollout.encode_prompts(records, _render, WordTokenizer(), max_prompt_len=6)
    # BOS + "User:" + words + "Assistant:": 5 and 4 tokens fit, 9 does not; nothing is cut.
    assert kept == [records[0], records[2]] and dropped == 1
    assert ids == [[1, 7, 3, 3, 12], [1, 7, 3, 12]]


def test_take_prompts_draws_more_until_the_batch_is_full():
    pool = iter([{"prompt": "x " * n} for n in (1, 9, 2, 9, 9, 3, 1)])
    take = lambda k: [next(pool) for _ in range(k)]  # noqa: E731
    records, ids, skipped = rollout.take_prompts(take, 3, _render, WordTokenizer(), max_prompt_len=8)
    assert [len(r["prompt"].split()) for r in records] == [1, 2, 3] and skipped == 3
    assert all(len(p) <= 8 for p in ids)
    endless = lambda k: [{"prompt": "x " * 50}] * k  # noqa: E731
    with pytest.raises(ValueError, match="exceeded max_prompt_len=8"):
        rollout.take_prompts(endless, 2, _render, WordTokenizer(), max_prompt_len=8)


def test_process_slices_cover_the_rows_once(monkeypatch):
    for n, count in ((10, 3), (16, 4), (2, 4)):
        covered = []
        for index in range(count):
            monkeypatch.setattr(jax, "process_count", lambda: count)
            monkeypatch.setattr(jax, "process_index", lambda: index)
            covered += list(range(n))[rollout.process_slice(n)]
        assert covered == list(range(n))


class _Sent(Exception):
    pass


def _fake_gather(sent: dict, index: int, first_pass: bool):
    def gather(value):
        if first_pass:  # only record what this process sends
            sent[index] = value
            raise _Sent
        assert value == sent[index]
        return [sent[0], sent[1]]
    return gather


def test_score_gathers_each_process_share(monkeypatch):
    """Two processes' views, simulated: each scores only its own rows of the plain rewards, both run the
    collective one on the full batch; the gathered result is the single-process one, counts add up."""
    seen, seen_rm = [], []

    def length(completions, examples):
        seen.append(list(completions))
        return np.array([len(c) for c in completions], np.float32)

    def reward_model(completions, examples):
        seen_rm.append(list(completions))
        return np.array([0.1 * len(c) for c in completions], np.float32)

    def picky(completions, examples):  # one error, on the second process's share
        if "dddd" in completions:
            raise ValueError("cannot judge")
        return np.full(len(completions), 0.25, np.float32)

    rewards = RewardSet([Reward("length", length, 0.3),
                         Reward("rm", reward_model, 0.7, tasks=("general",), collective=True,
                                schedule=((0, 0.0), (2, 1.0))),
                         Reward("half", lambda c, e: np.full(len(c), 0.5), tasks=("math",)),
                         Reward("picky", picky)])
    texts = ["a", "bb", "ccc", "dddd", "eeeee"]
    examples = [{"task": t} for t in ("general", "math", "general", "math", "general")]
    general = [t for t, e in zip(texts, examples) if e["task"] == "general"]
    for step in (None, 1, 2):
        whole = rewards(texts, examples, step=step)
        sent = {}
        for first_pass in (True, False):  # first: what each process sends; then: each receives both
            for index in range(2):
                monkeypatch.setattr(jax, "process_count", lambda: 2)
                monkeypatch.setattr(jax, "process_index", lambda: index)
                monkeypatch.setattr(rollout, "allgather_json", _fake_gather(sent, index, first_pass))
                seen.clear()
                seen_rm.clear()
                if first_pass:
                    with pytest.raises(_Sent):
                        rollout.score(rewards, texts, examples, step=step)
                    continue
                out = rollout.score(rewards, texts, examples, step=step)
                assert seen == [texts[:3] if index == 0 else texts[3:]]  # this process scored its share only
                assert seen_rm == ([] if step == 1 else [general])  # the full batch, on every process
        np.testing.assert_array_equal(out.total_B, whole.total_B)  # bitwise: same summation order
        for name in whole.scores:
            np.testing.assert_array_equal(out.scores[name], whole.scores[name])
            np.testing.assert_array_equal(out.routed[name], whole.routed[name])
        assert out.metrics == whole.metrics
        assert out.metrics["picky/errors"] == 1 and out.metrics["length/count"] == 5
        assert out.metrics["rm/weight"] == (0.0 if step == 1 else 0.7)
        assert out.routed["rm"].tolist() == [step != 1, False, step != 1, False, step != 1]
        # 0.3 * length + picky (0.25, 0 on "dddd") + half on math + 0.7 * 0.1 * length on general if on
        expected = [0.62, 1.35, 1.36, 1.7, 2.1] if step != 1 else [0.55, 1.35, 1.15, 1.7, 1.75]
        np.testing.assert_allclose(out.total_B, expected, rtol=1e-6)


def _toy_model():
    cfg = ModelConfig.toy().replace(vocab_size=64, n_layers=2, d_model=32, d_ff=64, head_dim=8)
    mesh = sharding.MeshConfig(8, 1, 1).make()
    model = create_model(cfg, mesh=mesh, seed=3)
    model.act_sharding = sharding.ActivationSharding(mesh, sharding.SAMPLE_RULES)
    return model


def test_polled_segments_decode_the_same_tokens_and_can_be_abandoned():
    model = _toy_model()
    cfg = sampler.SamplerConfig(max_prompt_len=16, max_new_tokens=21, group_size=4, stop_ids=(7,))
    prompts = [[1, 5, 9], [1, 4], [1, 8, 8, 3]]
    key = jax.random.key(0)
    whole = sampler.generate(model, prompts, key, cfg)
    polls = []
    segmented = sampler.decode(*sampler.prefill(model, prompts, key, cfg), cfg, poll=lambda: polls.append(1),
                               poll_every=4)
    assert len(polls) >= 1
    for field in ("tokens_BxT", "logp_BxT", "mask_BxT", "truncated_B"):
        np.testing.assert_array_equal(np.asarray(getattr(segmented, field)), np.asarray(getattr(whole, field)))

    class Stop(Exception):
        pass

    def stop():
        raise Stop

    with pytest.raises(Stop):
        sampler.decode(*sampler.prefill(model, prompts, key, cfg), cfg, poll=stop, poll_every=4)


class _Pieces:
    """A tokenizer whose token i is the text PIECES[i]: '</answer>' can be spelled several ways."""

    PIECES = ["<pad>", "</", "answer", ">", "</answer>", " 4", "2", " more", "<", "/answer>"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids if i != 0)

    def decode_batch(self, rows, skip_special_tokens=True):
        return [self.decode(r) for r in rows]

    def encode(self, text, add_bos=False):
        return [self.PIECES.index(text)]


def test_stop_strings_cut_rows_the_sampler_did_not_stop():
    tok = _Pieces()
    assert rollout.stop_sequences(tok, ["</answer>"]) == ((4,),)
    tokens = np.array([[5, 1, 2, 3, 7, 7],   # spelled "</" "answer" ">": cut after ">"
                       [5, 4, 0, 0, 0, 0],   # the sampler stopped on its spelling: left alone
                       [5, 6, 7, 7, 7, 7],   # no stop string: left alone
                       [8, 9, 5, 6, 0, 0]])  # "<" "/answer>": cut after the second token
    mask = tokens != 0
    logp = np.where(mask, -0.5, 0.0)
    truncated = np.array([True, False, True, False])
    rows = [0, 1, 2, 3]
    texts = tok.decode_batch([t[m] for t, m in zip(tokens, mask)])
    got = rollout.trim_at_stop_strings(tok, tokens, mask, logp, truncated, texts, rows, ["</answer>"])
    assert got == [" 4</answer>", " 4</answer>", " 42 more more more more", "</answer>"]
    np.testing.assert_array_equal(mask.sum(1), [4, 2, 6, 2])
    assert (logp[~mask] == 0).all() and (logp[mask] == -0.5).all()
    np.testing.assert_array_equal(truncated, [False, False, True, False])
