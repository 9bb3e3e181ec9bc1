"""Device meshes, the logical-axis rules tables, and sharded state creation.

The model names logical axes only (`embed`, `mlp`, `heads`, ...). A rules table maps
each to mesh axes (`data`, `fsdp`, `tensor`); training and sampling use different
tables. A dimension that a rule's mesh axes do not divide evenly is replicated
instead, so e.g. Qwen2.5-0.5B's 2 kv heads stay whole on a 4-way tensor axis.
"""
import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, tuple[str, ...]], ...]

# Training: rows over data+fsdp, weights split over fsdp (ZeRO-3 style: gathered
# per layer inside the scan) and over tensor (Megatron-style heads/mlp/vocab).
TRAIN_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("vocab", ("tensor",)),
)

# Sampling: decode reads every weight each step, so weights are replicated over
# data/fsdp (no per-token all-gathers) and split only over tensor.
SAMPLE_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("vocab", ("tensor",)),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; one axis may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"bad mesh shape {sizes}: sizes >= 1, at most one -1")

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % known:
                raise ValueError(f"mesh {tuple(sizes)} does not divide {n_devices} devices")
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise ValueError(f"mesh {tuple(sizes)} needs {math.prod(sizes)} devices, have {n_devices}")
        return tuple(sizes)

    def make(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        devices = list(jax.devices() if devices is None else devices)
        shape = self.shape(len(devices))
        # Auto axes on purpose: jax.make_mesh defaults to Explicit, which changes how
        # matmuls with sharded contracting dims behave.
        return jax.make_mesh(
            shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices
        )


def logical_to_spec(
    axes: Sequence[str | None], rules: Rules, shape: Sequence[int], mesh: Mesh
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec, replicating what does not divide."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axes = [a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1]
        # Drop trailing mesh axes until the dimension divides evenly.
        while mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes):
            mesh_axes.pop()
        used.update(mesh_axes)
        spec.append(tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return PartitionSpec(*spec)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """NamedSharding for every variable of an (abstract) state, from its `axes`."""

    def one(var: nnx.Variable) -> NamedSharding:
        axes = var.get_metadata().get("axes") or (None,) * len(var.get_value().shape)
        return NamedSharding(mesh, logical_to_spec(axes, rules, var.get_value().shape, mesh))

    return jax.tree.map(one, state, is_leaf=_is_var)


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    """Where activations live inside a jitted forward: a static, hashable attribute
    of the model, so changing it retraces instead of silently reusing a trace."""

    mesh: Mesh
    rules: Rules

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        spec = logical_to_spec(axes, self.rules, x.shape, self.mesh)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def init_sharded(make: Callable[[], nnx.Module], mesh: Mesh, rules: Rules) -> nnx.Module:
    """Build a module whose parameters are created directly on their shards.

    eval_shape gives the abstract state, the rules give shardings, and the init runs
    under jit with those out_shardings: no full unsharded copy ever exists.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(abstract, mesh, rules)

    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def reshard(module: nnx.Module, mesh: Mesh, rules: Rules) -> nnx.Module:
    """Move a module's state onto the shardings a rules table gives (e.g. train ->
    sample rules)."""
    graphdef, state = nnx.split(module)
    shardings = state_shardings(state, mesh, rules)
    return nnx.merge(graphdef, jax.device_put(state, shardings))


def spec_tree(module: nnx.Module) -> Any:
    """Each parameter's PartitionSpec, for tests and logging."""
    state = nnx.state(module)
    return jax.tree.map(lambda v: v.get_value().sharding.spec, state, is_leaf=_is_var)


def initialize_distributed() -> None:
    """Join a multi-process run when launched as several processes.

    On TPU pods and SLURM/MPI-launched GPU jobs `jax.distributed.initialize()` finds
    its peers from the environment; on CPU set R1JAX_COORDINATOR, R1JAX_NUM_PROCESSES
    and R1JAX_PROCESS_ID (gloo collectives).
    """
    if os.environ.get("R1JAX_COORDINATOR"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["R1JAX_COORDINATOR"],
            num_processes=int(os.environ["R1JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["R1JAX_PROCESS_ID"]),
        )
    elif any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")):
        jax.distributed.initialize()


def put_global(x, target: NamedSharding) -> jax.Array:
    """Place a host array that every process holds in full: each device takes its slice.

    Unlike `jax.device_put`, this also works when the sharding spans several processes.
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def put_rows(x, mesh: Mesh, rules: Rules) -> jax.Array:
    """A batch with its rows over the rules' `batch` axes (replicated if they do not divide).

    A jax array already on the mesh is resharded on device (a no-op when it already sits
    there), never copied through the host; a host array is placed slice by slice.
    """
    spec = logical_to_spec(("batch",) + (None,) * (np.ndim(x) - 1), rules, np.shape(x), mesh)
    target = NamedSharding(mesh, spec)
    if isinstance(x, jax.Array):
        return jax.device_put(x, target)
    return put_global(x, target)


def host_array(x: jax.Array) -> np.ndarray:
    """A full copy of a (possibly multi-host) sharded array on this host."""
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def allgather_json(value) -> list:
    """Every process's `value` (any JSON-able object), in process order, on every process."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:size]).decode()) for row, size in zip(rows, sizes)]


def for_sampling(model, mesh: Mesh):
    """A copy of `model` for decoding: its layer weights as L separate arrays (`Transformer.per_layer_view`: no
    per-step slicing of stacked weights), every weight the forward casts already in the compute dtype, on the
    sampling rules' shardings (replicated over fsdp). One compiled program makes it from the training weights, so
    the sampler holds one compute-dtype copy (no second fp32 copy, no cast inside the decode loop) and no
    intermediate copy is made. The caller's module is never modified; the numbers do not change."""
    dt = jnp.dtype(model.cfg.compute_dtype)
    graphdef, state = nnx.split(model)
    view = nnx.merge(_view_graphdef(graphdef, state, dt), _per_layer_state(graphdef, state, dt, mesh))
    view.act_sharding = ActivationSharding(mesh, SAMPLE_RULES)
    return view


def _view_graphdef(graphdef, state, dtype) -> nnx.GraphDef:
    key = (graphdef, dtype)
    if key not in _VIEW_GRAPHDEFS:
        _VIEW_GRAPHDEFS[key] = nnx.graphdef(nnx.eval_shape(lambda: nnx.merge(graphdef, state).per_layer_view(dtype)))
    return _VIEW_GRAPHDEFS[key]


_VIEW_GRAPHDEFS: dict = {}


@functools.partial(jax.jit, static_argnames=("graphdef", "dtype", "mesh"))
def _per_layer_state(graphdef, state, dtype, mesh: Mesh) -> nnx.State:
    view_state = nnx.state(nnx.merge(graphdef, state).per_layer_view(dtype))
    return jax.lax.with_sharding_constraint(view_state, state_shardings(view_state, mesh, SAMPLE_RULES))
