"""The device mesh and where every array lives on it.

The whole parallel layout is here, in one table: the mesh has three named axes and the model's params
carry logical axis names (``minimind_jax.model.logical_axes``); :data:`LOGICAL_RULES` maps the logical names
to mesh axes, so changing the parallelism never touches model code.

========  ==================================================================================================
mesh axis what it splits
========  ==================================================================================================
``data``  the batch (pure data parallelism: params and optimizer state replicated on this axis)
``fsdp``  the batch too, and the params / optimizer state along their ``embed`` dimension (ZeRO-3 style:
          XLA all-gathers a weight where it is used and reduce-scatters its gradient)
``tensor`` attention heads, MLP hidden units, experts and the vocabulary (Megatron-style tensor parallelism)
========  ==================================================================================================

``--mesh`` takes ``data=2,fsdp=2,tensor=2`` (any subset; one size may be -1 = the rest of the devices) or just
the sizes ``2,2,2``; the default puts every device on ``data``. A dimension that a mesh axis does not divide is
replicated instead (for instance 2 KV heads on ``tensor=4``) and :func:`param_shardings` says so.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from minimind_jax.config import ModelConfig
from minimind_jax.model import logical_axes
from minimind_jax.model.transformer import MiniMindLM

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

# logical axis name -> mesh axis (None: replicated). Params' logical names come from the model modules.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", None),  # experts stay whole on each device; their mlp dim is split over `tensor`
    ("shared_expert", None),
    ("router", None),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)


class MeshError(ValueError):
    pass


def parse_mesh(spec: str | Sequence[int] | None, num_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` / ``"2,2,2"`` / ``None`` (all on ``data``) -> ``{axis: size}``."""
    sizes = {"data": -1, "fsdp": 1, "tensor": 1}
    if spec is None or spec == "" or spec == "data":
        pass
    elif isinstance(spec, str) and "=" in spec:
        sizes = {"data": 1, "fsdp": 1, "tensor": 1}
        seen = set()
        for part in spec.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in sizes:
                raise MeshError(f"--mesh {spec!r}: unknown axis {name!r}; the axes are {', '.join(MESH_AXES)}")
            if name in seen:
                raise MeshError(f"--mesh {spec!r}: axis {name!r} given twice")
            seen.add(name)
            try:
                sizes[name] = int(value)
            except ValueError:
                raise MeshError(f"--mesh {spec!r}: size of {name!r} must be an integer, got {value!r}") from None
        if all(sizes[a] != -1 for a in MESH_AXES) and "data" not in seen:
            # unnamed data axis takes what is left over
            rest = math.prod(sizes.values())
            if rest and num_devices % rest == 0:
                sizes["data"] = num_devices // rest
    else:
        parts = spec.split(",") if isinstance(spec, str) else list(spec)
        if len(parts) != 3:
            raise MeshError(f"--mesh {spec!r}: give three sizes (data,fsdp,tensor) or name the axes "
                            "(e.g. data=4,tensor=2)")
        try:
            sizes = dict(zip(MESH_AXES, (int(p) for p in parts)))
        except ValueError:
            raise MeshError(f"--mesh {spec!r}: sizes must be integers") from None
    if sum(1 for v in sizes.values() if v == -1) > 1:
        raise MeshError(f"--mesh {spec!r}: at most one axis may be -1")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise MeshError(f"--mesh {spec!r}: sizes must be positive (or -1 for the rest)")
    known = math.prod(v for v in sizes.values() if v != -1)
    for axis, v in sizes.items():
        if v == -1:
            if num_devices % known:
                raise MeshError(f"--mesh {spec!r}: {num_devices} devices do not divide into {known}-device groups")
            sizes[axis] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(f"--mesh {spec!r} needs {math.prod(sizes.values())} devices "
                        f"({' x '.join(f'{a}={sizes[a]}' for a in MESH_AXES)}); {num_devices} are available")
    return sizes


def make_mesh(spec: str | Sequence[int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes (data, fsdp, tensor) over ``devices`` (default: every device of every process)."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def describe_mesh(mesh: Mesh) -> str:
    return " x ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names) + f" ({mesh.size} devices)"


def _spec_for(shape: tuple[int, ...], logical: Sequence[str | None], mesh: Mesh, rules, name: str,
              notes: list[str]) -> P:
    table = dict(rules)
    axes = []
    used = set()
    for dim, logical_name in zip(shape, logical):
        mesh_axis = table.get(logical_name) if logical_name is not None else None
        if mesh_axis is None or mesh.shape[mesh_axis] == 1 or mesh_axis in used:
            axes.append(None)
            continue
        if dim % mesh.shape[mesh_axis]:
            notes.append(f"{name}: {logical_name} ({dim}) not divisible by {mesh_axis}={mesh.shape[mesh_axis]}, "
                         "replicated")
            axes.append(None)
            continue
        used.add(mesh_axis)
        axes.append(mesh_axis)
    while axes and axes[-1] is None:
        axes.pop()
    return P(*axes)


def param_specs(config: ModelConfig, mesh: Mesh, rules=LOGICAL_RULES, *, verbose: bool = False):
    """PartitionSpecs for the params pytree of ``config`` on ``mesh``."""
    abstract = nn.unbox(jax.eval_shape(MiniMindLM(config).init, jax.random.key(0),
                                       jax.numpy.zeros((1, 8), jax.numpy.int32))["params"])
    logical = logical_axes(config)
    notes: list[str] = []
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    logical_leaves = treedef.flatten_up_to(logical)
    specs = []
    for (path, leaf), names in zip(leaves, logical_leaves):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        specs.append(_spec_for(leaf.shape, tuple(names), mesh, rules, name, notes))
    if notes and verbose:
        warnings.warn("sharding: " + "; ".join(sorted(set(n.split(": ", 1)[1] for n in notes))), stacklevel=2)
    return jax.tree_util.tree_unflatten(treedef, specs)


def param_shardings(config: ModelConfig, mesh: Mesh, rules=LOGICAL_RULES, *, verbose: bool = False):
    """``NamedSharding`` for every param leaf (see the module docstring for the rules)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(config, mesh, rules, verbose=verbose),
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Sharding of a batch array: its batch dimension (after ``leading`` unsplit dims, e.g. the micro-batch
    axis of gradient accumulation) split over ``data`` x ``fsdp``."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def shard_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Host numpy arrays (this process's part of the global batch) -> global jax arrays."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
    """``jax.distributed.initialize`` when asked (explicit flags) or when a cluster launcher is detected
    (SLURM, Open MPI, or the ``JAX_COORDINATOR_ADDRESS`` environment variable). Returns whether it ran."""
    explicit = coordinator is not None
    launched = any(k in os.environ for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS"))
    if os.environ.get("SLURM_NTASKS") == "1" and not explicit:
        launched = False
    if not (explicit or launched):
        return False
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()
    return True
