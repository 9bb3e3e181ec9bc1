"""Faults at the recipe level: stops inside evaluation, generation and at the last step resume to the
uninterrupted run; non-finite updates are skipped and end the run; bad settings fail before compute."""
import builtins
import errno
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1jax import grpo, run, sampler, sharding, train
from r1jax.metrics import read_metrics
from r1jax.model import ModelConfig, create_model
from r1jax.rewards import Reward, RewardSet
from recipes import r1_zero
from test_r1_zero import StopAfter, _cfg, _records


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The uninterrupted run every interrupted one must equal, and the base-model cache they share."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = _cfg(tmp, "full")
    assert run.train(r1_zero, cfg) == 0
    return _records(cfg.run_dir), f"base.cache_dir={tmp / 'cache'}", cfg.run_dir


def test_pulse_and_exact_resume(tmp_path, shared):
    """The reference run is complete and finite; stopped after step 2 (as by SIGTERM), the same command again
    gives the same metrics, bitwise; a third run does nothing."""
    records, cache, full_dir = shared
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("reward_mean", "accuracy", "format_rate", "completion_len_mean", "kl", "entropy", "grad_norm",
                "clip_low_frac", "logp_gap_max", "zero_spread_groups", "truncation_rate", "lr"):
        assert all(np.isfinite(r[key]) for r in train), key
    # The sampler's log-probs are the trainer's (same model code, fp32 CPU).
    assert max(r["logp_gap_max"] for r in train) <= 1e-4
    assert os.path.exists(os.path.join(full_dir, "reward.png"))
    assert os.path.exists(os.path.join(full_dir, "grpo", "final", "config.json"))

    resumed = _cfg(tmp_path, "resumed", [cache])
    assert run.train(r1_zero, resumed, stop=StopAfter(resumed.run_dir, 2)) == 0
    assert [r["step"] for r in _records(resumed.run_dir) if r["kind"] == "train"] == [1, 2]
    assert run.train(r1_zero, resumed) == 0
    assert _records(resumed.run_dir) == records
    assert run.train(r1_zero, resumed) == 0
    assert _records(resumed.run_dir) == records


def _steps(records, kind):
    return [r["step"] for r in records if r["kind"] == kind]


def test_eval_size_is_eval_num_prompts(shared):
    reference, _, _ = shared
    evals = [r for r in reference if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(r["eval_prompts"] == 8 and r["eval_prompts_too_long"] == 0 for r in evals)


def test_stop_inside_evaluation_saves_and_resumes_exactly(tmp_path, shared):
    reference, cache, _ = shared
    cfg = _cfg(tmp_path, "run", [cache])
    # The signal lands on the evaluation after step 2 (the poll after the step's own check).
    assert run.train(r1_zero, cfg, stop=StopAfter(cfg.run_dir, 2, poll=2)) == 0
    first = _records(cfg.run_dir)
    assert _steps(first, "train") == [1, 2] and _steps(first, "eval") == [0]
    assert run.train(r1_zero, cfg) == 0  # runs the cut evaluation at step 2 first, then steps 3-4
    assert _records(cfg.run_dir) == reference


def test_stop_inside_generation_saves_the_steps_before_it(tmp_path, shared, monkeypatch):
    reference, cache, _ = shared
    monkeypatch.setattr(sampler, "POLL_EVERY", 4)  # decode polls every 4 tokens
    cfg = _cfg(tmp_path, "run", [cache])
    # After step 1 (no checkpoint or evaluation due): poll 1 is the step's own check, poll 2 lands
    # inside step 2's generation, which is abandoned; the checkpoint holds step 1 and its data position.
    assert run.train(r1_zero, cfg, stop=StopAfter(cfg.run_dir, 1, poll=2)) == 0
    assert _steps(_records(cfg.run_dir), "train") == [1]
    assert sorted(os.listdir(os.path.join(cfg.run_dir, "grpo", "checkpoints"))) == ["1"]
    assert run.train(r1_zero, cfg) == 0
    assert _records(cfg.run_dir) == reference


def test_stop_at_the_last_step_runs_the_final_evaluation_on_resume(tmp_path, shared):
    reference, cache, _ = shared
    cfg = _cfg(tmp_path, "run", [cache])
    assert run.train(r1_zero, cfg, stop=StopAfter(cfg.run_dir, 4)) == 0
    first = _records(cfg.run_dir)
    assert _steps(first, "train") == [1, 2, 3, 4] and _steps(first, "eval") == [0, 2]
    assert run.train(r1_zero, cfg) == 0  # resumes at the last step: only the final evaluation is left
    assert _records(cfg.run_dir) == reference
    assert run.train(r1_zero, cfg) == 0  # all done: nothing runs again
    assert _records(cfg.run_dir) == reference


def test_killed_attempt_leaves_each_step_once_on_disk(tmp_path, shared):
    reference, cache, _ = shared
    cfg = _cfg(tmp_path, "run", [cache])
    assert run.train(r1_zero, cfg, stop=StopAfter(cfg.run_dir, 4)) == 0
    # As if killed after logging step 4 and its evaluation but before the step-4 checkpoint landed:
    # the newest checkpoint is step 2, and the file holds steps 3-4 that the resume re-logs.
    ckpts = os.path.join(cfg.run_dir, "grpo", "checkpoints")
    os.rename(os.path.join(ckpts, "4"), os.path.join(tmp_path, "moved-away"))
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        lines = f.readlines()
    assert run.train(r1_zero, cfg) == 0
    raw = read_metrics(os.path.join(cfg.run_dir, "metrics.jsonl"), dedupe=False)
    keys = [(r["kind"], r["stage"], r["step"]) for r in raw]
    assert len(keys) == len(set(keys)) and len(lines) < len(raw)
    assert _records(cfg.run_dir) == reference


def _length_rewards():
    # The tiny base never earns the real rewards, so every advantage would be 0 and nothing would move.
    return RewardSet([Reward("accuracy", lambda c, e: np.array([len(x) % 3 for x in c], np.float32))])


def test_non_finite_updates_are_skipped_then_stop_the_run(tmp_path, shared, capsys, monkeypatch):
    _, cache, _ = shared
    real, calls = grpo.group_advantages, []

    def poisoned(rewards_B, group_size, **kwargs):  # from step 2 on, as if a reward overflowed
        calls.append(1)
        adv_B = np.asarray(real(rewards_B, group_size, **kwargs))
        return adv_B if len(calls) < 2 else np.full_like(adv_B, np.nan)

    monkeypatch.setattr(grpo, "group_advantages", poisoned)
    monkeypatch.setattr(r1_zero, "_rewards", _length_rewards)
    cfg = _cfg(tmp_path, "run", [cache, "rl.max_nonfinite_steps=2", "rl.checkpoint_every=1", "eval.every=0"])
    assert run.train(r1_zero, cfg) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "last good checkpoint, step 2" in err
    train_records = [r for r in _records(cfg.run_dir) if r["kind"] == "train"]
    assert [r["nonfinite_updates"] for r in train_records] == [0, 2, 2]  # 2 minibatches a step
    assert sorted(os.listdir(os.path.join(cfg.run_dir, "grpo", "checkpoints"))) == ["1", "2"]


def test_kl_to_the_reference_is_zero_then_grows(tmp_path, shared, monkeypatch):
    _, cache, _ = shared
    monkeypatch.setattr(r1_zero, "_rewards", _length_rewards)
    cfg = _cfg(tmp_path, "run", [cache, "rl.kl_coef=0.01", "rl.optim.warmup_steps=0", "rl.optim.lr=1e-3",
                                 "rl.minibatches=1", "rl.steps=2", "eval.every=0"])
    assert run.train(r1_zero, cfg) == 0
    kl = [r["kl"] for r in _records(cfg.run_dir) if r["kind"] == "train"]
    # Step 1 is scored against the reference it starts from; by step 2 the policy has moved off it.
    assert kl[0] < 1e-7 and kl[1] > 1e-5


def _tiny_state(tx):
    cfg = ModelConfig.toy().replace(vocab_size=64, n_layers=1, d_model=32, d_ff=64, head_dim=8)
    model = create_model(cfg, mesh=sharding.MeshConfig(8, 1, 1).make(), seed=0)
    return cfg, train.create_train_state(model, tx)


def test_rl_update_skips_a_non_finite_update():
    cfg, state = _tiny_state(optax.adam(1e-2))
    B, Tp, T = 8, 4, 3
    prompt = jnp.ones((B, Tp), jnp.int32)
    completion = jnp.full((B, T), 5, jnp.int32)
    mask_p, mask = jnp.ones((B, Tp), bool), jnp.ones((B, T), bool)
    old = train.rollout_logprobs(state.graphdef, state.params, prompt, mask_p, completion, mask, temperature=1.0)
    adv = jnp.linspace(-1, 1, B)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    bad = train.RLBatch(prompt, mask_p, completion, mask, old.at[0, 0].set(jnp.nan), None, adv)
    state, metrics = train.rl_update(state, bad, jax.random.key(0), train.RLHyper())
    # Params, Adam moments and the step count are as they were: the update never happened.
    assert int(metrics["nonfinite_updates"]) == 1 and int(state.step) == 0
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.tree.map(np.asarray, (state.params, state.opt_state)))):
        np.testing.assert_array_equal(x, y)
    good = train.RLBatch(prompt, mask_p, completion, mask, old, None, adv)
    state, metrics = train.rl_update(state, good, jax.random.key(0), train.RLHyper())
    assert int(metrics["nonfinite_updates"]) == 0 and int(state.step) == 1


def test_sft_step_skips_a_non_finite_update():
    cfg, state = _tiny_state(optax.adam(1e-2))
    tokens = jnp.ones((8, 6), jnp.int32)
    batch = train.SFTBatch(tokens, jnp.ones((8, 6), bool), jnp.ones((8, 6), bool), jnp.float32(0.0))  # 0/0
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = train.sft_step(state, batch)
    assert int(metrics["nonfinite_updates"]) == 1 and int(state.step) == 0
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.tree.map(np.asarray, state.params))):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("overrides, message", [
    (["rl.group_size=1"], "group_size=1 must be >= 2"),
    (["rl.checkpoint_every=0"], "checkpoint_every=0 must be >= 1"),
    (["rl.temperature=0"], "temperature=0.0 must be > 0"),
    (["eval.samples=0"], "samples=0 must be >= 1"),
    (["eval.every=-1"], "every=-1 must be >= 0"),
])
def test_bad_settings_fail_when_parsed_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        run.config(r1_zero, None, overrides)
    assert str(info.value).startswith(overrides[0])
    assert "greedy" not in str(info.value)  # no setting of that name exists for RL


def test_batch_that_does_not_split_fails_before_any_compute(tmp_path):
    # 3 prompts x 4 = 12 rows into 2 minibatches over data x fsdp = 4 devices.
    cfg = _cfg(tmp_path, "run", ["rl.prompts_per_step=3"])
    with pytest.raises(ValueError, match=r"12 rows do not split .* 2 parts .* 4 devices"):
        run.train(r1_zero, cfg)
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(os.path.join(cfg.run_dir, "toy_base"))


def test_base_cache_key_ignores_where_the_cache_lives():
    a = run.config(r1_zero, None, ["base.cache_dir=/a"])
    b = run.config(r1_zero, None, ["base.cache_dir=/b"])
    c = run.config(r1_zero, None, ["base.cache_dir=/a", "base.corpus_size=10"])
    assert r1_zero.base_cache_key(a) == r1_zero.base_cache_key(b) != r1_zero.base_cache_key(c)


def test_unreadable_newest_checkpoint_resumes_from_the_previous_one(tmp_path, shared, capsys):
    reference, cache, _ = shared
    cfg = _cfg(tmp_path, "run", [cache])
    assert run.train(r1_zero, cfg, stop=StopAfter(cfg.run_dir, 4)) == 0  # checkpoints at steps 2 and 4
    ckpts = os.path.join(cfg.run_dir, "grpo", "checkpoints")
    data = max(glob.glob(os.path.join(ckpts, "4", "state", "**", "d", "*"), recursive=True), key=os.path.getsize)
    os.truncate(data, os.path.getsize(data) // 2)
    capsys.readouterr()
    assert run.train(r1_zero, cfg) == 0
    out = capsys.readouterr().out
    assert f"checkpoint step 4 in {ckpts} is unreadable" in out and "resumed at step 2" in out
    assert _records(cfg.run_dir) == reference


class BreakDiskAfter:
    """Never asks to stop; once `steps` GRPO steps are logged, writes under `root` fail as on a full disk."""

    def __init__(self, run_dir, steps, root, monkeypatch):
        self.path, self.steps, self.root, self.monkeypatch = os.path.join(run_dir, "metrics.jsonl"), steps, root, \
            monkeypatch

    def stop_everywhere(self):
        if sum(r["kind"] == "train" for r in read_metrics(self.path)) >= self.steps and self.root:
            root, real_open, self.root = self.root, builtins.open, None

            def open_(file, mode="r", *args, **kwargs):
                if str(file).startswith(root) and any(m in mode for m in "wax+"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
                return real_open(file, mode, *args, **kwargs)

            self.monkeypatch.setattr(builtins, "open", open_)
        return False


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned coroutines
def test_failed_save_stops_the_run_at_once_keeping_the_previous_checkpoint(tmp_path, shared, capsys, monkeypatch):
    reference, cache, _ = shared
    cfg = _cfg(tmp_path, "run", [cache, "rl.checkpoint_every=1"])
    ckpts = os.path.join(cfg.run_dir, "grpo", "checkpoints")
    assert run.train(r1_zero, cfg, stop=BreakDiskAfter(cfg.run_dir, 2, ckpts, monkeypatch)) == 1
    err = capsys.readouterr().err
    assert err.count("checkpoint save of step 2") == 1 and "No space left on device" in err
    assert "the last good checkpoint is step 1" in err
    assert _steps(_records(cfg.run_dir), "train")[-1] <= 3  # stopped within a step of the failure
    monkeypatch.undo()
    assert run.train(r1_zero, cfg) == 0  # the disk is back: resumes from step 1
    assert _records(cfg.run_dir) == reference


def test_dual_clip_and_log_ratio_clamp_reach_the_update():
    rl = run.config(r1_zero, None, ["rl.dual_clip=3", "rl.log_ratio_clamp=0.5"]).rl
    assert (rl.hyper().dual_clip, rl.hyper().log_ratio_clamp) == (3.0, 0.5)
    _, state = _tiny_state(optax.sgd(0.0))
    B, Tp, T = 8, 4, 3
    prompt, completion = jnp.ones((B, Tp), jnp.int32), jnp.full((B, T), 5, jnp.int32)
    mask_p, mask = jnp.ones((B, Tp), bool), jnp.ones((B, T), bool)
    logp = train.rollout_logprobs(state.graphdef, state.params, prompt, mask_p, completion, mask, temperature=1.0)
    # Every token's ratio is e^2 and every advantage -1: PPO's loss is e^2 per token, the dual clip caps it
    # at 3, and a log-ratio clamp of 0.5 makes the ratio e^0.5.
    batch = train.RLBatch(prompt, mask_p, completion, mask, logp - 2.0, None, -jnp.ones(B))
    losses = {}
    for name, hp in (("ppo", train.RLHyper()), ("dual", train.RLHyper(dual_clip=3.0)),
                     ("clamp", train.RLHyper(log_ratio_clamp=0.5))):
        _, metrics = train.rl_update(jax.tree.map(jnp.copy, state), batch, jax.random.key(0), hp)
        losses[name] = (float(metrics["loss"]), float(metrics["ratio_mean"]))
    np.testing.assert_allclose(losses["ppo"], (np.exp(2), np.exp(2)), rtol=1e-5)
    np.testing.assert_allclose(losses["dual"][0], 3.0, rtol=1e-5)
    np.testing.assert_allclose(losses["clamp"], (np.exp(0.5), np.exp(0.5)), rtol=1e-5)
