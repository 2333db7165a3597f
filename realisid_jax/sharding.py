"""Device mesh and logical-axis sharding: one code path for 1 CPU, 8 GPUs and a TPU pod.

Model code names axes logically (``("embed", "heads")`` on a kernel, ``("activation_batch", ...)`` on an
activation); the config's rules table maps those names onto the mesh axes ``("data", "fsdp", "tensor")``.
This keeps parallelism out of model code, as maxdiffusion and big_vision do.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Default table (maxdiffusion style). Conv kernels are HWIO: ("conv_h", "conv_w", "conv_in", "conv_out").
DEFAULT_RULES: Rules = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    # Activations are not split over "tensor": with that constraint on a (2, 2, 2) mesh, jax 0.10.2's
    # XLA:CPU returns wrong values for x @ w1 @ w2 (tests/test_sharding.py; cf. openxla/xla#40034). The
    # weights still are; a TPU config may map these to "tensor" again.
    ("activation_embed", None),
    ("activation_heads", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("conv_out", "fsdp"),
    ("conv_in", None),
    ("conv_h", None),
    ("conv_w", None),
    ("norm", None),
    ("vocab", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ``("data", "fsdp", "tensor")`` mesh with Auto axis types.

    Args:
      shape: three sizes; one may be ``-1`` and is filled so the product equals the device count.
      devices: defaults to ``jax.devices()`` (all processes' devices on multi-host).

    Raises:
      ValueError: if the sizes do not multiply to the device count or more than one is ``-1``.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = list(shape)
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"mesh shape needs {len(MESH_AXES)} sizes {MESH_AXES}, got {tuple(shape)}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh size may be -1, got {tuple(shape)}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot fill mesh {tuple(shape)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {tuple(sizes)} needs {math.prod(sizes)} devices, {len(devices)} available")
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if any(getattr(d, "core_on_chip", 0) for d in devices):
        # A v4 topology lists each TensorCore as a device; jax's physical mesh layout needs one device per chip.
        return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types, devices=devices)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules: Rules) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec`` for an array of ``shape`` on ``mesh``.

    A mesh axis is used at most once per array, and a dimension that the mapped mesh axes do not divide
    evenly is replicated instead (tiny test models on 8 devices, or 3-channel inputs).

    Raises:
      KeyError: if a logical name has no rule (a typo would otherwise silently replicate).
    """
    if names is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def _variable_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    return variable.get_metadata().get("out_sharding")


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """The ``NamedSharding`` of every variable of an (abstract or concrete) NNX state.

    Variables without logical names (biases, norms) are replicated.
    """

    def one(variable):
        names = _variable_names(variable)
        return variable.replace(NamedSharding(mesh, logical_to_spec(names, variable.shape, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass(frozen=True)
class _Active:
    mesh: Mesh
    rules: Rules


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("realisid_sharding", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[Mesh]:
    """Activates ``mesh`` (``jax.set_mesh``) and the logical rules for ``constrain`` while tracing."""
    token = _ACTIVE.set(_Active(mesh, tuple(rules)))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE.reset(token)


def active_rules() -> Rules | None:
    """The rules ``constrain`` applies now, or ``None`` when no mesh is active (constraints are no-ops)."""
    active = _ACTIVE.get()
    return None if active is None else active.rules


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; the identity when no mesh is active (one device)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    spec = logical_to_spec(names, x.shape, active.mesh, active.rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(active.mesh, spec))


def batch_shards(mesh: Mesh, rules: Rules = DEFAULT_RULES, size: int | None = None) -> int:
    """Into how many shards ``data_sharding`` splits a leading batch axis: the product of the sizes of the mesh
    axes ``rules`` map ``"activation_batch"`` to (``data`` x ``fsdp`` by default); for a batch of ``size`` that
    they do not divide, 1 (it is replicated)."""
    target = dict(rules)["activation_batch"]
    shards = math.prod(mesh.shape[a] for a in ((target,) if isinstance(target, str) else tuple(target or ())))
    return shards if size is None or size % shards == 0 else 1


def active_batch_shards(size: int) -> int:
    """``batch_shards`` of a batch of ``size`` on the active mesh (``use_mesh``); 1 with none."""
    active = _ACTIVE.get()
    return 1 if active is None else batch_shards(active.mesh, active.rules, size)


def data_sharding(mesh: Mesh, shape: Sequence[int], rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of an input batch of ``shape``: leading axis over the ``activation_batch`` mesh axes."""
    names = ("activation_batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))
