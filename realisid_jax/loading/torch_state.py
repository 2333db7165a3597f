"""PyTorch state dict <-> NNX state: a mechanical rename plus transpose, because module trees mirror diffusers.

``down_blocks.0.resnets.0.conv1.weight`` (OIHW) <-> ``('down_blocks', 0, 'resnets', 0, 'conv1', 'kernel')``
(HWIO); Linear ``weight`` (out, in) <-> ``kernel`` (in, out); norm ``weight`` <-> ``scale``; Embedding
``weight`` <-> ``embedding``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realisid_jax.loading.errors import CheckpointMismatchError
from realisid_jax.models.modeling_utils import VariablePath, torch_key

def to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """PyTorch layout -> flax layout for the variable named ``leaf``."""
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    return array


def to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """Flax layout -> PyTorch layout; inverse of ``to_flax_layout``."""
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return array


def load_torch_state(abstract_state: nnx.State, state_dict: dict[str, np.ndarray], *, source: str,
                     key_fn: Callable[[VariablePath], str] = torch_key, ignore: Sequence[str] = (),
                     shardings: nnx.State | None = None) -> nnx.State:
    """Fills an abstract NNX state (from ``nnx.eval_shape``) with a PyTorch state dict.

    Each tensor is transposed to flax layout, cast to the variable's dtype (float32 or bfloat16) and placed
    straight onto its sharding when ``shardings`` (same tree, ``NamedSharding`` leaves) is given.

    Args:
      abstract_state: the model's state with ``ShapeDtypeStruct`` values.
      state_dict: PyTorch keys -> host arrays (``checkpoint.read_state_dict``).
      source: file name for error messages.
      key_fn: NNX path -> PyTorch key (for trees that rename, e.g. transformers' ``text_model.`` prefix).
      ignore: regular expressions of checkpoint keys that are not parameters (non-persistent buffers).

    Raises:
      CheckpointMismatchError: listing every missing, unexpected and wrong-shape key at once.
    """
    flat = nnx.to_flat_state(abstract_state)
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    missing, wrong_shape, loaded, used = [], [], [], set()
    for path, variable in flat:
        key = key_fn(path)
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        array = to_flax_layout(str(path[-1]), state_dict[key])
        if tuple(array.shape) != tuple(variable.shape):
            want = to_torch_layout(str(path[-1]), np.empty(variable.shape, np.bool_)).shape
            wrong_shape.append((key, tuple(state_dict[key].shape), tuple(want)))
            continue
        loaded.append((path, variable, array))
    unexpected = [k for k in state_dict if k not in used and not any(re.fullmatch(p, k) for p in ignore)]
    if missing or unexpected or wrong_shape:
        raise CheckpointMismatchError(source, missing, unexpected, wrong_shape)

    def place(path, variable, array):
        value = jnp.asarray(array, dtype=variable.dtype) if path not in flat_shardings else \
            jax.device_put(np.asarray(array).astype(variable.dtype), flat_shardings[path].get_value())
        return path, variable.replace(value)

    return nnx.from_flat_state([place(*item) for item in loaded])


def export_torch_state(state: nnx.State, key_fn: Callable[[VariablePath], str] = torch_key) -> dict[str, np.ndarray]:
    """NNX state -> PyTorch state dict of host float arrays (inverse of ``load_torch_state``)."""
    return {key_fn(path): np.ascontiguousarray(to_torch_layout(str(path[-1]), np.asarray(v.get_value())))
            for path, v in nnx.to_flat_state(state)}
