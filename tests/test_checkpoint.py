"""Checkpointer round trips on a (2,2,2) mesh of fake CPU devices, damaged checkpoints, failed saves, SIGTERM."""
import builtins
import errno
import glob
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from r1jax.checkpoint import CheckpointError, Checkpointer, graceful_sigterm


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _sharded_state(mesh, seed=0):
    k = jax.random.key(seed)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    return {
        "w": put(jax.random.normal(k, (8, 16), jnp.float32), P("fsdp", "tensor")),
        "b": put(jax.random.normal(jax.random.fold_in(k, 1), (16,), jnp.bfloat16), P("tensor")),
        "emb": put(jax.random.normal(jax.random.fold_in(k, 2), (4, 8, 6)), P("data", ("fsdp", "tensor"))),
        "step": put(jnp.asarray(seed + 7, jnp.int32), P()),
    }


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        bits = lambda a: np.asarray(a).reshape(-1).view(np.uint8)  # noqa: E731 -- bitwise, so NaNs compare too
        np.testing.assert_array_equal(bits(x), bits(y))


def test_sharded_roundtrip_bitwise_and_same_shardings(tmp_path, mesh):
    state = _sharded_state(mesh)
    extras = {"stage": "rl", "stages_done": ["toy_base"], "data": {"epoch": 1, "index": 42}, "lr": 3e-6}
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    assert ckpt.save(5, state, extras)
    restored, got = ckpt.restore(5, _abstract(state))
    _assert_same(state, restored)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert y.sharding == x.sharding
        assert len(y.addressable_shards) == len(x.addressable_shards)
    assert got == extras
    ckpt.close()


def test_restore_onto_other_shardings_of_the_same_mesh(tmp_path, mesh):
    state = _sharded_state(mesh)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, state, {})
    target = {k: NamedSharding(mesh, P()) for k in state}
    target["w"] = NamedSharding(mesh, P("tensor", ("data", "fsdp")))
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=target[k]) for k, v in state.items()}
    restored, _ = ckpt.restore(1, abstract)
    _assert_same(state, restored)
    assert restored["w"].sharding == target["w"]
    ckpt.close()


def test_restore_without_sharding_is_refused(tmp_path, mesh):
    state = _sharded_state(mesh)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, state, {})
    with pytest.raises(ValueError, match="no sharding"):
        ckpt.restore(1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
    ckpt.close()


def test_async_save_then_wait_survives_deleted_buffers(tmp_path, mesh):
    state = _sharded_state(mesh)
    expected = jax.tree.map(np.asarray, state)
    abstract = _abstract(state)
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.save(3, state, {"i": 3})
    # The train step donates its state; the save must already hold its own copy.
    for x in jax.tree.leaves(state):
        x.delete()
    ckpt.wait()
    assert ckpt.latest_step() == 3
    restored, extras = ckpt.restore(None, abstract)
    _assert_same(expected, jax.tree.map(np.asarray, restored))
    assert extras == {"i": 3}
    ckpt.close()


def test_keep_last_k_and_resume_picks_latest(tmp_path, mesh):
    ckpt = Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3, 4):
        assert ckpt.save(step, _sharded_state(mesh, seed=step), {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
    ckpt.close()
    # A new process (re-running the command) sees the same directory.
    again = Checkpointer(str(tmp_path), keep=2)
    assert again.latest_step() == 4
    restored, extras = again.restore(None, _abstract(_sharded_state(mesh)))
    _assert_same(_sharded_state(mesh, seed=4), restored)
    assert extras == {"step": 4}
    again.close()


def test_latest_step_none_on_empty_dir(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "fresh"))
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError):
        ckpt.restore(None, {})
    ckpt.close()


def test_same_step_skipped_unless_forced_and_steps_must_grow(tmp_path, mesh):
    state = _sharded_state(mesh)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    assert ckpt.save(10, state, {"stages_done": []})
    assert not ckpt.save(10, state, {"stages_done": ["rl"]})
    assert ckpt.restore(10, _abstract(state))[1] == {"stages_done": []}
    assert ckpt.save(10, state, {"stages_done": ["rl"]}, force=True)
    assert ckpt.restore(10, _abstract(state))[1] == {"stages_done": ["rl"]}
    with pytest.raises(ValueError, match="steps must grow"):
        ckpt.save(9, state, {})
    ckpt.close()


def test_optax_adamw_and_nnx_state_roundtrip(tmp_path, mesh):
    model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 2, 10), weight_decay=0.1)
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp") if x.ndim == 2 else P()))  # noqa: E731
    params = jax.tree.map(shard, nnx.state(model, nnx.Param))
    opt_state = jax.tree.map(shard, tx.init(params))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)  # non-trivial count/mu/nu
    params = optax.apply_updates(params, updates)
    state = {"params": params, "opt": opt_state, "ref": None}
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, state, {})
    restored, _ = ckpt.restore(1, _abstract(state))
    assert isinstance(restored["params"], nnx.State)
    _assert_same(state, restored)
    nnx.update(model, restored["params"])
    np.testing.assert_array_equal(np.asarray(model.kernel[...]), np.asarray(params["kernel"][...]))
    # The restored optimizer state keeps stepping exactly like the original.
    u1, _ = tx.update(grads, opt_state, params)
    u2, _ = tx.update(grads, restored["opt"], restored["params"])
    _assert_same(u1, u2)
    ckpt.close()


def test_typed_prng_key_and_scalars_roundtrip(tmp_path, mesh):
    keys = jax.device_put(jax.random.split(jax.random.key(3), 8), NamedSharding(mesh, P("data")))
    device = {"key": jax.random.key(11), "rbg": jax.random.key(5, impl="rbg"), "keys": keys,
              "legacy": jax.random.PRNGKey(2)}
    host = {"n_tokens": 123456789, "done": True, "lr": 3e-6, "seed": np.uint32(7),
            "table": np.arange(6, dtype=np.int64).reshape(2, 3)}
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, {"device": device, "host": host}, {})
    abstract_host = {"n_tokens": 0, "done": False, "lr": 0.0, "seed": np.uint32(0),
                     "table": np.zeros((2, 3), np.int64)}
    restored, _ = ckpt.restore(1, {"device": _abstract(device), "host": abstract_host})
    _assert_same(device, restored["device"])
    assert jax.random.key_impl(restored["device"]["rbg"]) == jax.random.key_impl(device["rbg"])
    assert restored["device"]["keys"].sharding == keys.sharding
    np.testing.assert_array_equal(jax.random.key_data(jax.random.fold_in(restored["device"]["key"], 1)),
                                  jax.random.key_data(jax.random.fold_in(device["key"], 1)))
    got = restored["host"]
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in host.items()}
    assert (got["n_tokens"], got["done"], got["lr"], got["seed"]) == (123456789, True, 3e-6, 7)
    np.testing.assert_array_equal(got["table"], host["table"])
    ckpt.close()


def test_uncommitted_leaves_come_back_uncommitted(tmp_path, mesh):
    # optax's tx.init outside jit makes an uncommitted `count`; committed to device 0 on
    # restore, it would make the next jitted update fail beside mesh-sharded params.
    w = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P("fsdp")))
    state = {"w": w, "count": jnp.zeros((), jnp.int32) + 3, "key": jax.random.key(1)}
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, state, {})
    restored, _ = ckpt.restore(1, state)
    assert not restored["count"].committed and not restored["key"].committed and restored["w"].committed
    _assert_same(state, restored)
    out = jax.jit(lambda s: s["w"] * s["count"] + jax.random.uniform(s["key"]))(restored)
    assert out.sharding == w.sharding
    ckpt.close()


def orbax_leftovers(test):
    # Orbax leaves coroutines of a failed read or write to be collected after their event loop closed.
    test = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")(test)
    return pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")(test)


def _big_state(mesh, seed=0):
    # OCDBT inlines values under 1 KiB into its b-tree nodes; this one gets a data file of its own.
    big = jax.random.normal(jax.random.key(seed + 100), (64, 64), jnp.float32)
    return dict(_sharded_state(mesh, seed), big=jax.device_put(big, NamedSharding(mesh, P("fsdp", "tensor"))))


def _damage(step_dir: str, how: str) -> None:
    if how == "extras_deleted":
        os.remove(os.path.join(step_dir, "extras", "metadata"))  # JsonSave's one file
        return
    # OCDBT keeps chunks in state/ocdbt.process_<i>/d/ (b-tree nodes in state/d/); the largest holds `big`.
    data = max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)
    if how == "array_truncated":
        os.truncate(data, os.path.getsize(data) // 2)
    else:
        os.remove(data)


@orbax_leftovers
@pytest.mark.parametrize("how", ["array_truncated", "array_deleted", "extras_deleted"])
def test_restore_latest_falls_back_past_a_damaged_newest_checkpoint(tmp_path, mesh, capsys, how):
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    for step in (1, 2):
        ckpt.save(step, _big_state(mesh, seed=step), {"step": step})
    ckpt.close()
    _damage(str(tmp_path / "2"), how)
    abstract = _abstract(_big_state(mesh))
    again = Checkpointer(str(tmp_path), async_save=False)
    with pytest.raises(Exception):
        again.restore(None, abstract)  # restore stays strict; only restore_latest falls back
    capsys.readouterr()
    state, extras = again.restore_latest(abstract)
    _assert_same(_big_state(mesh, seed=1), state)
    assert extras == {"step": 1}
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"[r1jax] checkpoint step 2 in {tmp_path} is unreadable (")
    assert lines[0].endswith("); falling back to the previous one")
    # The damaged step is kept aside for a post-mortem, out of orbax's list.
    assert again.all_steps() == [1] and (tmp_path / "corrupt-2").is_dir()
    assert again.save(2, _big_state(mesh, seed=5), {"step": 2})
    state, extras = again.restore(None, abstract)
    _assert_same(_big_state(mesh, seed=5), state)
    assert extras == {"step": 2} and again.all_steps() == [1, 2]
    again.close()


@orbax_leftovers
def test_restore_latest_none_when_no_checkpoint_is_readable(tmp_path, mesh, capsys):
    abstract = _abstract(_big_state(mesh))
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    assert ckpt.restore_latest(abstract) is None
    ckpt.save(3, _big_state(mesh), {"step": 3})
    _damage(str(tmp_path / "3"), "array_truncated")
    assert ckpt.restore_latest(abstract) is None
    assert "checkpoint step 3" in capsys.readouterr().out
    assert ckpt.latest_step() is None and (tmp_path / "corrupt-3").is_dir()
    assert ckpt.save(1, _big_state(mesh), {"step": 1})  # starting from scratch is not "steps must grow"
    ckpt.close()


def test_restore_latest_raises_on_another_tree_and_moves_nothing(tmp_path, mesh):
    state = _sharded_state(mesh)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, state, {})
    other = dict(_abstract(state), extra=jax.ShapeDtypeStruct((2,), jnp.float32, sharding=state["step"].sharding))
    with pytest.raises(ValueError, match="do not match"):
        ckpt.restore_latest(other)
    assert ckpt.all_steps() == [1] and sorted(os.listdir(tmp_path)) == ["1"]
    restored, _ = ckpt.restore_latest(_abstract(state))
    _assert_same(state, restored)
    ckpt.close()


def _refuse_under(root: str, code: int):
    def refuse(path):
        if str(path).startswith(str(root)):
            raise OSError(code, os.strerror(code), str(path))
    return refuse


_MESSAGES = {errno.ENOSPC: r"OSError: \[Errno 28\] No space left on device",
             errno.EROFS: r"OSError: \[Errno 30\] Read-only file system"}


@pytest.fixture(params=[errno.ENOSPC, errno.EROFS], ids=["disk_full", "read_only"])
def broken_disk(request, monkeypatch):
    """Returns `break_(root)`: from then on files under `root` cannot be written, like on a full or read-only disk.

    Orbax writes its JSON and metadata files through Python's open, in its background threads;
    the arrays go through tensorstore, which fails the same way on a real full disk
    (RESOURCE_EXHAUSTED ... No space left on device) and is reported alike.
    """
    real_open = builtins.open

    def break_(root) -> None:
        refuse = _refuse_under(root, request.param)

        def open_(file, mode="r", *args, **kwargs):
            if any(m in mode for m in "wax+"):
                refuse(file)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)

    break_.message = _MESSAGES[request.param]
    break_.undo = monkeypatch.undo
    return break_


def _until_raised(check, seconds=20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        check()
        time.sleep(0.01)


def _assert_no_threads_left(before: set) -> None:
    # A writer left waiting (orbax's 300 s signal timeout) would hold the process at exit.
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=5)
        assert not thread.is_alive() or thread.daemon, f"thread {thread.name} of the failed save is still running"


def _failed(step, good, broken_disk, directory):
    return (f"^checkpoint save of step {step} to {directory} failed: {broken_disk.message}.*; "
            f"the last good checkpoint is step {good}$")


@orbax_leftovers
def test_failed_background_save_raises_from_raise_if_failed(tmp_path, mesh, broken_disk):
    before = set(threading.enumerate())
    ckpt = Checkpointer(str(tmp_path), keep=1)
    ckpt.save(1, _sharded_state(mesh, seed=1), {"step": 1})
    ckpt.wait()
    broken_disk(tmp_path)
    assert ckpt.save(2, _sharded_state(mesh, seed=2), {"step": 2})  # the write fails in orbax's background thread
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=_failed(2, 1, broken_disk, tmp_path)):
        _until_raised(ckpt.raise_if_failed)
    assert time.monotonic() - start < 10
    ckpt.raise_if_failed()  # raised once; the loop has stopped by now
    ckpt.wait()
    # keep=1 must not have dropped step 1 for a step 2 that never landed.
    assert ckpt.all_steps() == [1]
    restored, extras = ckpt.restore(None, _abstract(_sharded_state(mesh)))
    _assert_same(_sharded_state(mesh, seed=1), restored)
    assert extras == {"step": 1}
    broken_disk.undo()  # space freed: the same step saves fine
    assert ckpt.save(2, _sharded_state(mesh, seed=2), {"step": 2})
    ckpt.close()
    _assert_no_threads_left(before)
    again = Checkpointer(str(tmp_path), keep=1)
    assert again.all_steps() == [2] and sorted(os.listdir(tmp_path)) == ["2"]  # no tmp dir left over
    _assert_same(_sharded_state(mesh, seed=2), again.restore(None, _abstract(_sharded_state(mesh)))[0])
    again.close()


@orbax_leftovers
@pytest.mark.parametrize("observer", ["wait", "close", "next_save"])
def test_failed_background_save_raises_from_wait_close_and_next_save(tmp_path, mesh, broken_disk, observer):
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, _sharded_state(mesh, seed=1), {"step": 1})
    ckpt.wait()
    broken_disk(tmp_path)
    ckpt.save(2, _sharded_state(mesh, seed=2), {"step": 2})
    with pytest.raises(CheckpointError, match=_failed(2, 1, broken_disk, tmp_path)):
        if observer == "wait":
            ckpt.wait()
        elif observer == "close":
            ckpt.close()
        else:
            ckpt.save(3, _sharded_state(mesh, seed=3), {"step": 3})
    assert ckpt.all_steps() == [1]
    if observer != "close":
        ckpt.close()
    with Checkpointer(str(tmp_path)) as again:
        assert again.all_steps() == [1]


@orbax_leftovers
def test_save_raises_at_once_when_the_step_directory_cannot_be_made(tmp_path, mesh, monkeypatch):
    before = set(threading.enumerate())
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, _sharded_state(mesh, seed=1), {"step": 1})
    ckpt.wait()
    refuse, real_mkdir = _refuse_under(tmp_path, errno.EROFS), os.mkdir
    monkeypatch.setattr(os, "mkdir", lambda path, *a, **k: refuse(path) or real_mkdir(path, *a, **k))
    start = time.monotonic()
    failed = (f"^checkpoint save of step 2 to {tmp_path} failed: {_MESSAGES[errno.EROFS]}: '{tmp_path}/2.*'; "
              "the last good checkpoint is step 1$")
    with pytest.raises(CheckpointError, match=failed):
        ckpt.save(2, _sharded_state(mesh, seed=2), {"step": 2})
    assert time.monotonic() - start < 10
    ckpt.raise_if_failed()
    ckpt.close()
    _assert_no_threads_left(before)
    assert sorted(os.listdir(tmp_path)) == ["1"]


def test_failed_synchronous_save_raises_from_save(tmp_path, mesh, broken_disk):
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, _sharded_state(mesh, seed=1), {"step": 1})
    broken_disk(tmp_path)
    with pytest.raises(CheckpointError, match=_failed(2, 1, broken_disk, tmp_path)):
        ckpt.save(2, _sharded_state(mesh, seed=2), {"step": 2})
    ckpt.raise_if_failed()
    ckpt.wait()
    assert ckpt.all_steps() == [1]
    ckpt.close()


def test_sigterm_sets_flag_and_restores_previous_handler():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))
    try:
        with graceful_sigterm() as stop:
            assert not stop.should_stop
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.should_stop and stop.signum == signal.SIGTERM
            assert stop.stop_everywhere()
        assert not calls  # the run's handler took it, not the previous one
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigint_optional_second_press_interrupts():
    previous = signal.getsignal(signal.SIGINT)
    with graceful_sigterm(sigint=True) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def _multiprocess_worker(process_id: int, port: int, directory: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)

    def make(seed):
        # Built by jit with out_shardings: each process only ever holds its own shards.
        init = lambda: {"w": jax.random.normal(jax.random.key(seed), (8, 16)),  # noqa: E731
                        "keys": jax.random.split(jax.random.key(seed), 8), "step": jnp.int32(seed)}
        shardings = {"w": NamedSharding(mesh, P(("data", "fsdp"), "tensor")),
                     "keys": NamedSharding(mesh, P("data")), "step": NamedSharding(mesh, P())}
        return jax.jit(init, out_shardings=shardings)()

    ckpt = Checkpointer(directory, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, make(step), {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    restored, extras = ckpt.restore(None, _abstract(make(0)))
    expected = make(3)
    same = jax.jit(lambda a, b: jnp.all(a == b))
    assert bool(same(restored["w"], expected["w"])) and int(restored["step"]) == 3
    assert bool(same(jax.random.key_data(restored["keys"]), jax.random.key_data(expected["keys"])))
    assert restored["w"].sharding == expected["w"].sharding and extras == {"step": 3}
    with graceful_sigterm() as stop:
        if process_id == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.stop_everywhere()  # process 0 got no signal but must stop with process 1
    # Only process 0 (which alone writes the JSON and metadata files) cannot write: orbax would
    # leave process 1 at its write barrier for 20 minutes. Both must stop at once, step 3 kept.
    real_open = builtins.open

    def full(file, mode="r", *args, **kwargs):
        if str(file).startswith(directory) and any(m in mode for m in "wax+"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    if process_id == 0:
        builtins.open = full
    ckpt.save(4, make(4), {"step": 4})
    start = time.monotonic()
    try:
        _until_raised(ckpt.raise_if_failed)
        raise AssertionError("the failed save was not reported")
    except CheckpointError as e:
        print(f"process {process_id}: {e}")
        assert str(e).startswith("checkpoint save of step 4 ") and "the last good checkpoint is step 3" in str(e), e
    assert time.monotonic() - start < 10
    builtins.open = real_open
    ckpt.close()
    assert Checkpointer(directory, keep=2).all_steps() == [2, 3]
    print("worker ok")


@pytest.mark.slow
def test_two_processes_save_and_restore_their_shards(tmp_path):
    import socket
    import subprocess
    import sys

    from conftest import FAST_COMPILE  # here, not at the top: the workers run this file as a script

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path / "ckpt")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "worker ok" in out, out[-3000:]


if __name__ == "__main__":
    import sys

    _multiprocess_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
