"""Checkpointer round trips on a (2,2,2) mesh of fake CPU devices, and the SIGTERM flag."""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from r1jax.checkpoint import Checkpointer, graceful_sigterm


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
    ckpt.close()
    print("worker ok")


@pytest.mark.slow
def test_two_processes_save_and_restore_their_shards(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
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
