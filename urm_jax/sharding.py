"""Mesh and logical-axis rules: every parameter and activation names its axes logically
("embed", "mlp", "q_heads", ...); one rule table maps those names onto the (data, fsdp, tensor)
mesh. Changing the parallelism means changing the table or the mesh shape, never the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class AxisRules:
    """Logical axis name -> mesh axis (or tuple of mesh axes, or None for replicated)."""

    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
        ("batch", ("data", "fsdp")),
        ("seq", None),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("act_embed", None),
        ("q_heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("layers", None),
        ("norm", None),
        ("labels", None),
        ("gate_hidden", "tensor"),
        ("attributes", None),
        ("lora_rank", None),  # LoRA's r (4-64): replicated; A and B split like their kernel
    )

    def __post_init__(self):
        names = [n for n, _ in self.rules]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"logical axes with two rules: {sorted(dup)}")

    def mesh_axes(self, logical: str | None):
        """The mesh axis (a name, a tuple of names, or None: replicated) a logical axis maps to; None for
        None. KeyError for a logical axis without a rule."""
        if logical is None:
            return None
        for name, target in self.rules:
            if name == logical:
                return target
        raise KeyError(f"no sharding rule for logical axis {logical!r}")

    def spec(self, logical_axes: Sequence[str | None], mesh: Mesh | None = None,
             shape: Sequence[int] | None = None) -> P:
        """PartitionSpec for an array with these logical axes. A mesh axis is used at most once
        (the first array dim that asks for it gets it); axes of size 1, and axes that do not divide
        the dim (vocab 128257 over tensor=2) are dropped, so any mesh shape gives a valid spec from
        the same rules."""
        used: set[str] = set()
        out = []
        for i, logical in enumerate(logical_axes):
            target = self.mesh_axes(logical)
            targets = (target,) if isinstance(target, str) else tuple(target or ())
            keep: tuple[str, ...] = ()
            for t in targets:
                size = 1 if mesh is None else mesh.shape[t]
                split = int(np.prod([mesh.shape[k] for k in keep])) * size if mesh is not None else 1
                if t in used or size == 1 or (shape is not None and shape[i] % split):
                    continue
                keep += (t,)
            used.update(keep)
            out.append(keep[0] if len(keep) == 1 else (keep or None))
        return P(*out)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int | None) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with a -1 filled in from `num_devices`, checked against it (None:
    only a shape without -1 can be resolved). ValueError says what does not fit."""
    shape = [int(s) for s in shape]
    if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh {tuple(shape)}: need 3 positive sizes (data, fsdp, tensor), at "
                         "most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices is None:
            raise ValueError(f"mesh {tuple(shape)} has a -1: give the number of devices")
        if num_devices % known:
            raise ValueError(f"mesh {tuple(shape)} does not divide {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if num_devices is not None and int(np.prod(shape)) != num_devices:
        raise ValueError(f"mesh {tuple(shape)} needs {int(np.prod(shape))} devices, "
                         f"{num_devices} available")
    return tuple(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes (plain indexing keeps working); -1 takes the
    remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(shape, len(devices))
    types = (AxisType.Auto,) * 3
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    except NotImplementedError:
        # A TPU slice whose physical axes the mesh axes cannot each take whole (fsdp=16 x
        # tensor=4 on a v6e-64's 8x8 chips): split a physical axis between two mesh axes.
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=types)


def mesh_key(mesh: Mesh) -> tuple:
    """What identifies a mesh in a compiled-program key: axis names and sizes, axis types and
    the device ids in mesh order (a Mesh's repr leaves the devices out)."""
    return (tuple(mesh.shape.items()), tuple(str(t) for t in mesh.axis_types),
            tuple(int(d.id) for d in mesh.devices.flat))


def fit_mesh(shape: Sequence[int], devices=None) -> Mesh:
    """`shape` if it fits the devices present, else FSDP over all of them: restoring a
    checkpoint (export, a stage-2 start) must not need the mesh that trained it."""
    devices = list(devices if devices is not None else jax.devices())
    try:
        return make_mesh(shape, devices)
    except ValueError:
        return make_mesh((1, -1, 1), devices)


_state = threading.local()


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: AxisRules | None = None) -> Iterator[None]:
    """Activate a mesh + rules so `constrain` inside traced model code shards activations."""
    prev = getattr(_state, "active", None)
    _state.active = None if mesh is None else (mesh, rules or AxisRules())
    try:
        yield
    finally:
        _state.active = prev


def batch_sharding(mesh: Mesh, rules: AxisRules | None = None, accum_axis: bool = False) -> NamedSharding:
    """Examples over the data-parallel axes (the rules' `batch`); with `accum_axis`, a leading
    gradient-accumulation axis stays unsharded (the train step's batches)."""
    spec = (rules or AxisRules()).spec(("batch",), mesh)
    return NamedSharding(mesh, P(None, *spec) if accum_axis else P(*spec))


def batch_shards(mesh: Mesh, rules: AxisRules | None = None) -> int:
    """How many ways `batch_sharding` splits the batch axis: a batch's rows must divide by it."""
    axes = (rules or AxisRules()).spec(("batch",), mesh)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in axes]))


def active_mesh() -> tuple[Mesh, AxisRules] | None:
    """The (mesh, rules) set by `use_mesh`, or None."""
    return getattr(_state, "active", None)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside `use_mesh`."""
    active = active_mesh()
    if active is None:
        return x
    mesh, rules = active
    spec = rules.spec(logical_axes, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int],
                   rules: AxisRules | None = None) -> NamedSharding:
    """NamedSharding on `mesh` for an array of `shape` with these logical axes, by `rules` (default
    `AxisRules()`; mesh axes that do not divide a dim are dropped, see `AxisRules.spec`)."""
    return NamedSharding(mesh, (rules or AxisRules()).spec(logical_axes, mesh, shape))
