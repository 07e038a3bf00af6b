"""One run on many devices and hosts: a `jax.sharding` mesh, where each array lives, multi-host start.

Mesh axes (config `mesh.data` x `mesh.fsdp` x `mesh.tensor` devices):
- "data": data parallel. Batch rows are split over it; parameters are replicated along it.
- "fsdp": fully sharded data parallel. Batch rows are split over it too, and so is every
  parameter and optimizer-state array, along its first dimension that divides evenly (arrays
  with none, and scalars, are replicated). XLA's SPMD partitioner inserts the all-gathers of
  weights before use and the reduce-scatters of gradients.
- "tensor": tensor parallel (Megatron-style). Each block's heads and MLP hidden units, and the
  unembedding's vocabulary, are split over it (`TENSOR_DIMS`); rows are not, so the residual
  stream is whole on every device of the axis and each block ends in one all-reduce.
So a batch of B rows needs B divisible by data x fsdp; evaluation and sampling batches likewise.

`Placement(None)` (the default, `mesh` 1 x 1) places nothing: every program compiles and runs
exactly as on one device before meshes existed. With a mesh, `Placement` gives the sharding of
every tree the engine builds (parameters, optimizer state, batches [B, T], eval sets
[nb, Be, T]) and puts host arrays there. Under several processes (`initialize_from_env`) each
process reads only the rows its devices hold (`Placement.rows`), and `to_host` gathers a
sharded tree to every host (a collective: every process must call it).

The model's residual stream [B, T, D] is constrained to the batch sharding while a mesh is
`active` (at trace time), so the partitioner keeps activations split by rows and gathers
weights, instead of splitting activations by width.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ..config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # batch rows are split over these axes
# The dimension of each model weight that the "tensor" axis splits (engine/model.py's names):
# attention heads N of qkv [D, 3, N, H], q [D, N, H], out [N, H, D] and their biases, key/value
# heads K of kv [D, 2, K, H], the MLP width F of gate/up [D, F] and down [F, D], the vocabulary V of
# unembed [D, V]. Other arrays (embed, norm gains, LoRA adapters) are not split by it.
TENSOR_DIMS = {
    **{"qkv": 2, "q": 1, "kv": 2, "out": 0, "gate": 1, "up": 1, "down": 0, "unembed": 1},
    **{"qkv_bias": 1, "q_bias": 0, "kv_bias": 1},
}
_ACTIVE: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("forgetting_mesh", default=None)


class MeshError(ConfigError):
    """The mesh does not fit the devices or the batch; the message names the key and the fix."""


def initialize_from_env() -> bool:
    """Join a multi-process run when the environment describes one; returns whether it did.

    Explicit: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID. SLURM: a job step with SLURM_NTASKS > 1 (`srun`), detected by JAX itself.
    Must run before any JAX computation. On CPUs the processes talk through gloo.
    """
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ
    if not (explicit or slurm) or jax.distributed.is_initialized():
        return False
    if explicit:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
        if missing:
            raise MeshError(
                f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} not: set all three "
                f"(the coordinator host:port, the number of processes, this process's index)"
            )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only processes
    kwargs = {}
    if explicit:
        kwargs = {
            "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
            "process_id": int(os.environ["JAX_PROCESS_ID"]),
        }
    jax.distributed.initialize(**kwargs)
    return True


def is_main_process() -> bool:
    """Process 0 writes the run folder (metrics, summary, checkpoints); the others only compute."""
    return jax.process_index() == 0


def make_mesh(cfg: MeshConfig) -> Mesh | None:
    """The run's mesh over all devices (of every process), or None for the 1 x 1 default."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    n = jax.device_count()
    if -1 in sizes:
        other = math.prod(x for x in sizes if x != -1)
        if n % other:
            raise MeshError(
                f"mesh: {n} devices cannot be split into groups of {other}; set mesh.data/fsdp/tensor"
            )
        sizes[sizes.index(-1)] = n // other
    if math.prod(sizes) == 1:
        return None
    if math.prod(sizes) != n:
        raise MeshError(
            f"mesh.data={sizes[0]} x mesh.fsdp={sizes[1]} x mesh.tensor={sizes[2]} = {math.prod(sizes)} "
            f"devices, but this process sees {n} ({jax.devices()[0].platform}); make the product equal "
            f"the device count (or use -1 for one axis)"
        )
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 3)


def fsdp_spec(shape: tuple[int, ...], fsdp: int, tensor_dim: int | None = None) -> P:
    """Split the first dimension of `shape` divisible by `fsdp` over the "fsdp" axis, and
    `tensor_dim` (if given) over the "tensor" axis; replicate arrays without one (and scalars)."""
    spec: list[str | None] = [None] * len(shape)
    if tensor_dim is not None:
        spec[tensor_dim] = "tensor"
    if fsdp > 1:
        for axis, size in enumerate(shape):
            if axis != tensor_dim and size % fsdp == 0 and size >= fsdp:
                spec[axis] = "fsdp"
                break
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def param_spec(path: tuple[Any, ...], shape: tuple[int, ...], fsdp: int, tensor: int) -> P:
    """The spec of one array of a parameter-shaped tree (parameters, Adam moments, gradients):
    split over "tensor" along its `TENSOR_DIMS` dimension when its name (the last dict key in its
    pytree path naming a model weight) has one, and over "fsdp" as `fsdp_spec`."""
    names = [getattr(k, "key", None) for k in path]
    name = next((n for n in reversed(names) if isinstance(n, str) and n in TENSOR_DIMS), None)
    tensor_dim = TENSOR_DIMS[name] if tensor > 1 and name is not None else None
    if tensor_dim is not None and shape[tensor_dim] % tensor:
        where = jax.tree_util.keystr(path)
        raise MeshError(
            f"mesh.tensor={tensor} does not divide dimension {tensor_dim} of {where} {shape} (attention "
            f"heads, key/value heads, MLP width, vocabulary model.V); pick a mesh.tensor that divides them"
        )
    return fsdp_spec(shape, fsdp, tensor_dim)


@dataclass(frozen=True)
class Placement:
    """Where a run's arrays live: on one device (`mesh` None) or sharded over `mesh`."""

    mesh: Mesh | None = None

    @property
    def batch_devices(self) -> int:
        """Devices a batch's rows are split over (1 without a mesh)."""
        return 1 if self.mesh is None else math.prod(self.mesh.shape[a] for a in BATCH)

    def tree(self, tree: Any) -> Any:
        """Shardings of a tree of arrays or shapes (parameters, optimizer state, adapters); None
        without a mesh."""
        if self.mesh is None:
            return None
        fsdp, tensor = self.mesh.shape["fsdp"], self.mesh.shape["tensor"]
        return jax.tree_util.tree_map_with_path(
            lambda path, x: NamedSharding(self.mesh, param_spec(path, tuple(x.shape), fsdp, tensor)), tree
        )

    def abstract(self, tree: Any) -> Any:
        """Shapes (`jax.ShapeDtypeStruct`s) carrying their `tree` shardings (as they are without a
        mesh): what a program is compiled for ahead of time."""
        shardings = self.tree(tree)
        if shardings is None:
            return tree
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings
        )

    def rows_sharding(self, ndim: int = 2, axis: int = 0) -> NamedSharding | None:
        """Rows split over the batch axes along `axis` of an `ndim`-array ([B, T]: axis 0; eval
        sets [nb, Be, T]: axis 1)."""
        if self.mesh is None:
            return None
        spec = [None] * ndim
        spec[axis] = BATCH
        return NamedSharding(self.mesh, P(*spec))

    def replicated(self) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, P())

    def put(self, tree: Any) -> Any:
        """A host or device tree, placed by `tree` shardings (each process puts only its shards)."""
        if self.mesh is None:
            return jax.device_put(tree)
        return jax.tree.map(_put, tree, self.tree(tree))

    def rows(self, read: Callable[[int, int], np.ndarray], shape: tuple[int, ...], axis: int = 0) -> Any:
        """An array of `shape` whose rows (along `axis`) are split over the batch axes, built from
        `read(start, stop)` -> those rows. Every process reads only the rows its devices hold."""
        if self.mesh is None:
            return jax.device_put(read(0, shape[axis]))
        self.check_rows(shape[axis], "rows")
        sharding = self.rows_sharding(len(shape), axis)
        if jax.process_count() == 1:
            return jax.device_put(read(0, shape[axis]), sharding)
        spans = [idx[axis] for idx in sharding.addressable_devices_indices_map(shape).values()]
        start = min(s.start or 0 for s in spans)
        stop = max(shape[axis] if s.stop is None else s.stop for s in spans)
        return jax.make_array_from_process_local_data(sharding, read(start, stop), shape)

    def reshard_rows(self, x: Any, axis: int = 0) -> Any:
        """A device array (e.g. sampled replay rows) moved to the batch sharding; as is without a mesh."""
        if self.mesh is None:
            return x
        return jax.device_put(x, self.rows_sharding(x.ndim, axis))

    def replicate(self, x: Any) -> Any:
        """An array (host or device) on every device of the mesh; as is without a mesh."""
        if self.mesh is None:
            return x
        return _put(x, self.replicated())

    def check_rows(self, rows: int, what: str) -> None:
        if rows % self.batch_devices:
            raise MeshError(
                f"{what}: {rows} rows cannot be split evenly over the mesh's {self.batch_devices} "
                f"batch devices (mesh.data x mesh.fsdp); make it a multiple of {self.batch_devices}"
            )

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """While tracing inside this block, the model constrains activations to the mesh."""
        token = _ACTIVE.set(self.mesh)
        try:
            yield
        finally:
            _ACTIVE.reset(token)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # this process's whole copy: each process places its own shards
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def constrain_rows(x: jax.Array) -> jax.Array:
    """x [B, ...] constrained to the batch sharding of the active mesh (as is when none is)."""
    mesh = _ACTIVE.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH)))


def to_host(tree: Any) -> Any:
    """A tree of (possibly sharded, possibly multi-host) arrays as numpy on every process: an
    array spanning several processes is gathered (a collective: every process must call this),
    one this process holds whole (host rows, a single-device array) is taken as it is. The whole
    tree must fit in each host's memory: that is the size limit of our checkpoints (parameters
    and AdamW moments, 12 bytes per parameter)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def host(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(host, tree)


def agree(value: int) -> int:
    """Process 0's `value` (a status, a step, a decision as 0/1) on every process; as is with one
    process. A collective: every process must call it at the same point."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def sync(name: str) -> None:
    """Wait for every process at this point (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
