"""Orbax checkpoints that resume exactly (sharded state + JSON extras), and a SIGTERM flag for preemption."""
import collections
import itertools
import os
import signal
import threading
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax._src import distributed
from jax.experimental import multihost_utils

PyTree = Any

_instances = itertools.count()  # names each Checkpointer's barrier keys; every process builds them in one order


class CheckpointError(RuntimeError):
    """A checkpoint save failed; the run must stop. The last good checkpoint is left as it was."""


def _root_cause(exc: BaseException) -> BaseException:
    # Orbax wraps tensorstore's error in a bare Exception whose message is a page of spec;
    # the innermost cause says what went wrong.
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _reason(exc: BaseException) -> str:
    exc = _root_cause(exc)
    lines = str(exc).strip().splitlines()
    first = (lines[0] if lines else "").split(" [tensorstore_spec", 1)[0]  # a page of JSON
    if len(first) > 400:  # tensorstore's paths come first, the OS error last: keep both ends
        first = first[:250] + " ... " + first[-145:]
    return f"{type(exc).__name__}: {first}"


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


class _FailFastBarrier:
    """Orbax's background-save barrier (AsyncOptions.barrier_sync_fn) that fails as soon as a peer's save has.

    With orbax's own barrier, a process whose background write failed never reaches
    `async_write_complete`; the others wait there for AsyncOptions.timeout_secs (20 min) while
    it waits for them at the save-progress flag's barrier, which comes next either way. Here
    each arrival also records the process's latest barrier: at one of the writer's barriers, a
    peer sitting at a barrier this process never passed has skipped this one, so its save
    failed. Only the writer's barriers judge: the failed process, at the flag's barrier, waits
    for the others to give up. A process reporting a failed save also posts an abort, which
    fails every barrier. The keys live in the jax.distributed coordinator's key-value store.
    """

    def __init__(self, client, root: str):
        self._client = client
        self._root = root
        self._count: collections.Counter = collections.Counter()
        self._passed: set[str] = set()
        self._lock = threading.Lock()

    def abort(self, message: str) -> None:
        self._client.key_value_set(f"{self._root}/abort/{jax.process_index()}", message, allow_overwrite=True)

    def peer_abort(self) -> str | None:
        me = str(jax.process_index())
        for key, message in self._client.key_value_dir_get(f"{self._root}/abort/"):
            if key.rsplit("/", 1)[1] != me:
                return message
        return None

    def __call__(self, *, key: str, timeout_ms: int) -> None:
        with self._lock:
            self._count[key] += 1  # orbax reuses some keys once per save
            name = f"{key}#{self._count[key]}"
        writer = any(w in key for w in ("async_write_complete", "async_commit_complete"))  # orbax 0.12's names
        me, n = jax.process_index(), jax.process_count()
        self._client.key_value_set(f"{self._root}/at/{name}/{me}", "")
        self._client.key_value_set(f"{self._root}/last/{me}", name, allow_overwrite=True)
        deadline = time.monotonic() + timeout_ms / 1000
        pause = 0.001
        while True:
            # `last` before `at`: a peer that moved on past `name` shows up as arrived here.
            last = dict(self._client.key_value_dir_get(f"{self._root}/last/"))
            arrived = {k.rsplit("/", 1)[1] for k, _ in self._client.key_value_dir_get(f"{self._root}/at/{name}/")}
            if len(arrived) == n:
                break
            message = self.peer_abort()
            if message is not None:
                raise CheckpointError(message)
            for k, where in last.items():
                peer = k.rsplit("/", 1)[1]
                if writer and peer not in arrived and where != name and where not in self._passed:
                    raise CheckpointError(f"process {peer} skipped barrier {key}: its part of the save failed")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out at checkpoint barrier {key}; arrived: {sorted(arrived)}")
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
        with self._lock:
            self._passed.add(name)


def _restore_plan(abstract_state: PyTree) -> tuple[dict, list, list, jax.tree_util.PyTreeDef]:
    """Orbax's restore targets for `abstract_state`, the leaf names, and the functions mapping leaves back."""
    nested, names, treedef = _to_nested_dict(abstract_state)
    targets, unwraps = {}, []
    for parts in names:
        target, unwrap = _restore_target(_get(nested, parts), ".".join(parts))
        node = targets
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = target
        unwraps.append(unwrap)
    return targets, names, unwraps, treedef


def _shapes(nested: dict) -> dict[str, tuple]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(nested, is_leaf=lambda x: not isinstance(x, dict))
    return {".".join(_key_name(k) for k in path): tuple(np.shape(x))  # np.shape reads .shape first
            for path, x in leaves}


class Checkpointer:
    """Saves `state` (any pytree of arrays) and `extras` (JSON) per step; keeps the last `keep`.

    Every process calls save/restore with its own shards; orbax coordinates the writes.
    Steps must grow: a step below the latest saved one is refused, since orbax would
    otherwise skip it silently and a resume would land on the older run's checkpoint.

    A failed save raises CheckpointError from the first call that sees it: `save`, `wait`,
    `close`, or `raise_if_failed` (cheap; call it every step). Orbax only logs a failed
    background save and carries on; the run would die at a later save, or, with several
    processes, wait out a 20-minute barrier. After a failed save in a multi-process run, later
    saves of this Checkpointer fail too: stop the run.
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        if "://" not in directory:  # orbax needs absolute local paths; gs:// and friends pass through
            directory = os.path.abspath(directory)
        self.directory = directory
        self._async = async_save
        self._pending: int | None = None  # the step of a save whose outcome no call has seen yet
        self._peer_failure: str | None = None  # the last failure a peer reported, raised once
        self._barrier = None
        client = distributed.global_state.client  # the coordinator's key-value store; orbax reads it the same way
        if jax.process_count() > 1 and client is not None:  # one process: orbax's barriers are no-ops
            self._barrier = _FailFastBarrier(client, f"r1jax/checkpointer/{next(_instances)}")
        # Orbax makes the step's directories in the background by default; when that mkdir fails
        # (read-only or full disk), the item writers wait 300 s for its signal, and the process
        # then hangs that long at exit. Alone, make them in save(), which then raises at once.
        # With several processes that path ends in a barrier without timeout the others would
        # wait at forever, so there the background path, bounded by 300 s, is the lesser evil.
        async_options = ocp.AsyncOptions(create_directories_asynchronously=self._barrier is not None)
        if self._barrier is not None:
            async_options.barrier_sync_fn = self._barrier
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            # Crashed saves leave tmp dirs; drop them so they never look like checkpoints.
            cleanup_tmp_directories=True,
            async_options=async_options,
        )
        self._manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "extras"))

    def save(self, step: int, state: PyTree, extras: dict, *, force: bool = False) -> bool:
        """Starts a save (asynchronous by default) and returns True, or False if `step` is already saved.

        With `force`, an existing checkpoint at `step` is replaced (e.g. the end-of-stage save
        whose extras mark the stage done, right after a periodic save at the same step).
        Arrays are copied off the device before this returns, so the caller may donate them.
        Waits for the previous save first, raising CheckpointError if that one failed.
        """
        # Before orbax's save: it would enter a barrier first and then raise the old error raw.
        self.wait()
        self._raise_peer_failure()
        latest = self.latest_step()
        if latest is not None and step < latest:
            raise ValueError(f"step {step} is below the latest checkpoint {latest}; steps must grow")
        if latest == step:
            if not force:
                return False
            self._manager.delete(step)
        nested, _, _ = _to_nested_dict(jax.tree.map(_savable, state))
        self._pending = step
        try:
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(nested), extras=ocp.args.JsonSave(extras)),
                force=True,  # the interval policy is the caller's; orbax's would drop saves silently
            )
        except Exception as e:
            raise self._save_failed(e) from e
        if not self._async:
            self._pending = None
        return saved

    def raise_if_failed(self) -> None:
        """Raises CheckpointError if a save has failed (here or, with several processes, on a peer); never blocks."""
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self.wait()  # the save is over, so this returns at once, raising its error
        self._raise_peer_failure()

    def _raise_peer_failure(self) -> None:
        message = None if self._barrier is None else self._barrier.peer_abort()
        if message is not None and message != self._peer_failure:
            self._peer_failure, self._pending = message, None
            self._manager.reload()  # drop the step orbax listed when this process's part started
            raise CheckpointError(message)

    def _save_failed(self, exc: BaseException) -> CheckpointError:
        step, self._pending = self._pending, None
        # Orbax lists a step from the moment its save starts; read back what is really on disk.
        self._manager.reload()
        good = self._manager.latest_step()
        message = (f"checkpoint save of step {step} to {self.directory} failed: {_reason(exc)}; "
                   + ("there is no earlier checkpoint" if good is None else f"the last good checkpoint is step {good}"))
        if self._barrier is not None:
            self._barrier.abort(f"{message} (on process {jax.process_index()})")
        return CheckpointError(message)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, step: int | None, abstract_state: PyTree) -> tuple[PyTree, dict]:
        """Restores `step` (None: the latest) onto the shardings, dtypes and tree structure of `abstract_state`.

        `abstract_state` leaves: jax.ShapeDtypeStruct with a sharding, or jax arrays (their
        shardings are used), numpy arrays, Python scalars; typed PRNG keys come back typed.
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self._restore(step, _restore_plan(abstract_state))

    def restore_latest(self, abstract_state: PyTree) -> tuple[PyTree, dict] | None:
        """Restores the newest readable checkpoint, or returns None when there is none (start from scratch).

        A damaged checkpoint (truncated or missing file) is reported in one line and renamed to
        `corrupt-<step>` beside the others, so orbax no longer lists it and its step can be
        saved again; the next older one is tried. A checkpoint whose metadata reads fine but
        holds other arrays or shapes than `abstract_state` is the caller's mismatch, not
        damage: its error is raised and nothing is moved. Every process must call this.
        """
        self.wait()
        plan = _restore_plan(abstract_state)  # a bad abstract tree fails here, before any checkpoint is judged
        steps = self.all_steps()
        while steps:
            step = steps.pop()
            try:
                return self._restore(step, plan)
            except Exception as e:
                # Damage reads as OSError (missing file) or ValueError (tensorstore, JSON); a device
                # out of memory or a tree that is not this checkpoint's must not cost a checkpoint.
                if not isinstance(_root_cause(e), OSError | ValueError) or self._holds_other_tree(step, plan[0]):
                    raise
                then = "falling back to the previous one" if steps else "no earlier checkpoint is left"
                print(f"[r1jax] checkpoint step {step} in {self.directory} is unreadable ({_reason(e)}); {then}",
                      flush=True)
                self._move_aside(step)
        return None

    def _restore(self, step: int, plan) -> tuple[PyTree, dict]:
        targets, names, unwraps, treedef = plan
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(targets), extras=ocp.args.JsonRestore()),
        )
        leaves = [unwrap(_get(restored.state, parts)) for parts, unwrap in zip(names, unwraps)]
        return jax.tree_util.tree_unflatten(treedef, leaves), dict(restored.extras)

    def _holds_other_tree(self, step: int, targets: dict) -> bool:
        try:
            stored = self._manager.item_metadata(step)["state"].tree
        except Exception:  # unreadable metadata is damage, not a mismatch
            return False
        return _shapes(stored) != _shapes(targets)

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            root = self._manager.directory  # an etils path: local, gs:// and friends alike
            target, n = root / f"corrupt-{step}", 1
            while target.exists():
                n += 1
                target = root / f"corrupt-{step}-{n}"
            (root / str(step)).rename(target)  # orbax names step directories by the bare number
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"r1jax checkpoint {self.directory} moved step {step}")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until the current save is written; raises CheckpointError if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._join_writer()
            if self._pending is None:  # already reported, e.g. through a peer's abort
                return
            raise self._save_failed(e) from e
        self._pending = None

    def _join_writer(self) -> None:
        # Orbax's finalize thread can fail (on the step's metadata file) before it joins the
        # thread writing the items, whose own error would then come out of the next restore or
        # save. Join that one too (there is no public call for it), so nothing of the failed save
        # is left running or pending when the failure is reported.
        for _ in range(2):  # a raised error skips the metadata store's wait; the second call does it
            try:
                self._manager._checkpointer.wait_until_finished()
                return
            except Exception:  # the failure being reported
                pass

    def close(self) -> None:
        """Waits for the current save (raising CheckpointError if it failed) and releases orbax's resources."""
        try:
            self.wait()
        finally:
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
