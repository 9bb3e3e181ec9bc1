"""Orbax checkpoints that resume exactly (sharded state + JSON extras), and a SIGTERM flag for preemption."""
import os
import signal
import threading
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

PyTree = Any


def _key_name(entry) -> str:
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    raise TypeError(f"unsupported pytree path entry {entry!r}")


def _to_nested_dict(tree: PyTree) -> tuple[dict, list, jax.tree_util.PyTreeDef]:
    # Orbax only has to store nested dicts of arrays: nnx.State, optax NamedTuples and
    # dataclass nodes are rebuilt from the caller's abstract tree, so their classes never
    # reach the checkpoint format (and a renamed class cannot break an old checkpoint).
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    nested: dict = {}
    seen: dict[str, tuple] = {}
    names = []
    for path, leaf in leaves_with_path:
        parts = [_key_name(e) for e in path] or ["_root"]
        joined = ".".join(parts)  # orbax names arrays by their dot-joined path
        if joined in seen:
            raise ValueError(f"checkpoint paths {seen[joined]} and {path} both map to {joined!r}")
        seen[joined] = path
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"checkpoint path {joined!r} is both a leaf and a subtree")
        if parts[-1] in node:
            raise ValueError(f"checkpoint path {joined!r} is both a leaf and a subtree")
        node[parts[-1]] = leaf
        names.append(parts)
    return nested, names, treedef


def _get(nested: dict, parts: list[str]):
    for p in parts:
        nested = nested[p]
    return nested


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(abstract) -> tuple[Any, jax.ShapeDtypeStruct]:
    # jax.random.key_impl wants an array; tracing one through eval_shape reads it off the dtype.
    impls = []

    def probe(k):
        impls.append(jax.random.key_impl(k))
        return jax.random.key_data(k)

    data = jax.eval_shape(probe, jax.ShapeDtypeStruct(abstract.shape, abstract.dtype))
    return impls[0], data


def _savable(leaf):
    # Typed PRNG keys have an extended dtype orbax cannot write; their uint32 key_data can.
    if _is_key(leaf):
        return jax.random.key_data(leaf)
    return leaf


def _uncommitted(x: jax.Array) -> jax.Array:
    # Through the host: jax has no public way to drop an array's device commitment.
    if _is_key(x):
        return jax.random.wrap_key_data(jnp.asarray(np.asarray(jax.random.key_data(x))), impl=jax.random.key_impl(x))
    return jnp.asarray(np.asarray(x))


def _restore_target(leaf, name: str):
    """The abstract leaf orbax restores into, and a function mapping the result back."""
    if isinstance(leaf, jax.Array) and not leaf.committed:
        # An uncommitted array (e.g. jnp.zeros outside jit) may join mesh-sharded arrays in a jit;
        # orbax returns it committed to one device, which jit then refuses. Come back uncommitted.
        target, unwrap = _restore_target(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding), name)
        return target, lambda x: _uncommitted(unwrap(x))
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            raise ValueError(
                f"abstract leaf {name!r} has no sharding; give ShapeDtypeStruct(..., sharding=...) "
                "so the restore does not land everything on one device"
            )
        if _is_key(leaf):
            impl, data = _key_impl(leaf)
            # A key array's sharding covers its logical dims; key_data adds trailing
            # replicated dims, which a NamedSharding spec leaves unmentioned.
            target = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
            return target, lambda x: jax.random.wrap_key_data(x, impl=impl)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), lambda x: x
    if isinstance(leaf, np.ndarray):
        return np.zeros(leaf.shape, leaf.dtype), lambda x: np.asarray(x, leaf.dtype)
    if isinstance(leaf, np.generic):
        return np.zeros((), leaf.dtype), lambda x: leaf.dtype.type(x)
    if isinstance(leaf, bool | int | float):
        kind = type(leaf)
        return leaf, lambda x: kind(x)
    raise TypeError(f"abstract leaf {name!r} has unsupported type {type(leaf).__name__}")


class Checkpointer:
    """Saves `state` (any pytree of arrays) and `extras` (JSON) per step; keeps the last `keep`.

    Every process calls save/restore with its own shards; orbax coordinates the writes.
    Steps must grow: a step below the latest saved one is refused, since orbax would
    otherwise skip it silently and a resume would land on the older run's checkpoint.
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        if "://" not in directory:  # orbax needs absolute local paths; gs:// and friends pass through
            directory = os.path.abspath(directory)
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            # Crashed saves leave tmp dirs; drop them so they never look like checkpoints.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "extras"))

    def save(self, step: int, state: PyTree, extras: dict, *, force: bool = False) -> bool:
        """Starts a save (asynchronous by default) and returns True, or False if `step` is already saved.

        With `force`, an existing checkpoint at `step` is replaced (e.g. the end-of-stage save
        whose extras mark the stage done, right after a periodic save at the same step).
        Arrays are copied off the device before this returns, so the caller may donate them.
        """
        latest = self.latest_step()
        if latest is not None and step < latest:
            raise ValueError(f"step {step} is below the latest checkpoint {latest}; steps must grow")
        if latest == step:
            if not force:
                return False
            self._manager.wait_until_finished()
            self._manager.delete(step)
        nested, _, _ = _to_nested_dict(jax.tree.map(_savable, state))
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(nested), extras=ocp.args.JsonSave(extras)),
            force=True,  # the interval policy is the caller's; orbax's would drop saves silently
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, step: int | None, abstract_state: PyTree) -> tuple[PyTree, dict]:
        """Restores `step` (None: the latest) onto the shardings, dtypes and tree structure of `abstract_state`.

        `abstract_state` leaves: jax.ShapeDtypeStruct with a sharding, or jax arrays (their
        shardings are used), numpy arrays, Python scalars; typed PRNG keys come back typed.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        nested, names, treedef = _to_nested_dict(abstract_state)
        targets, unwraps = {}, []
        for parts in names:
            target, unwrap = _restore_target(_get(nested, parts), ".".join(parts))
            node = targets
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = target
            unwraps.append(unwrap)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(targets), extras=ocp.args.JsonRestore()),
        )
        leaves = [unwrap(_get(restored.state, parts)) for parts, unwrap in zip(names, unwraps)]
        return jax.tree_util.tree_unflatten(treedef, leaves), dict(restored.extras)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class graceful_sigterm:  # noqa: N801 -- used like a function: `with graceful_sigterm() as stop:`
    """Turns SIGTERM (TPU preemption) and optionally SIGINT into a flag the loop polls.

    The handler only sets `should_stop`; the loop saves a checkpoint and returns. A second
    SIGINT raises KeyboardInterrupt as usual, so a stuck run can still be interrupted.
    Handlers can only be installed from the main thread; elsewhere this raises ValueError.
    """

    def __init__(self, *, sigint: bool = False):
        self.should_stop = False
        self.signum: int | None = None
        self._signals = [signal.SIGTERM] + ([signal.SIGINT] if sigint else [])
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if signum == signal.SIGINT and self.should_stop:
            raise KeyboardInterrupt
        self.should_stop = True
        self.signum = signum

    def stop_everywhere(self) -> bool:
        """True when any process got the signal; a collective, so every process must call it at the same step.

        Preemption notices reach hosts at different times; acting on the local flag alone
        would make one host enter a collective save the others never join.
        """
        if jax.process_count() == 1:
            return self.should_stop
        flags = multihost_utils.process_allgather(np.asarray(self.should_stop))
        return bool(np.any(flags))

    def __enter__(self) -> "graceful_sigterm":
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("graceful_sigterm must be entered from the main thread")
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # None: the old handler was installed outside Python and cannot be put back; use the default.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
