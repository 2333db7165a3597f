"""PyTorch state dict <-> NNX state: a mechanical rename plus transpose, because module trees mirror diffusers.

``down_blocks.0.resnets.0.conv1.weight`` (OIHW) <-> ``('down_blocks', 0, 'resnets', 0, 'conv1', 'kernel')``
(HWIO); Linear ``weight`` (out, in) <-> ``kernel`` (in, out); norm ``weight`` <-> ``scale``; Embedding
``weight`` <-> ``embedding``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

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


def load_torch_state(abstract_state: nnx.State, state_dict: Mapping[str, np.ndarray], *, source: str,
                     key_fn: Callable[[VariablePath], str] = torch_key, ignore: Sequence[str] = (),
                     shardings: nnx.State | None = None) -> nnx.State:
    """Fills an abstract NNX state (from ``nnx.eval_shape``) with a PyTorch state dict.

    Keys and shapes are checked first without reading a tensor (a lazy ``loading.files.SafetensorsWeights``
    gives shapes from its header). Then one tensor at a time is read, transposed to flax layout, cast to the
    variable's dtype (float32 or bfloat16) and placed straight onto its sharding when ``shardings`` (same
    tree, ``NamedSharding`` leaves) is given; its host copy is dropped before the next is read, so loading
    holds the placed model plus about one tensor, not a second full copy of the checkpoint.

    Args:
      abstract_state: the model's state with ``ShapeDtypeStruct`` values.
      state_dict: PyTorch keys -> host arrays (``files.read_weights``); a ``shape(key)`` method, when
        present, is used for the check instead of reading the array.
      source: file name for error messages.
      key_fn: NNX path -> PyTorch key (for trees that rename, e.g. transformers' ``text_model.`` prefix).
      ignore: regular expressions of checkpoint keys that are not parameters (non-persistent buffers).

    Raises:
      CheckpointMismatchError: listing every missing, unexpected and wrong-shape key at once, before
        anything is read or placed.
    """
    flat = nnx.to_flat_state(abstract_state)
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    shape_of = getattr(state_dict, "shape", None) or (lambda key: tuple(state_dict[key].shape))
    missing, wrong_shape, matched, used = [], [], [], set()
    for path, variable in flat:
        key = key_fn(path)
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        want = tuple(to_torch_layout(str(path[-1]), np.empty(variable.shape, np.bool_)).shape)
        have = tuple(shape_of(key))
        if have != want:
            wrong_shape.append((key, have, want))
            continue
        matched.append((path, variable, key))
    unexpected = [k for k in state_dict if k not in used and not any(re.fullmatch(p, k) for p in ignore)]
    if missing or unexpected or wrong_shape:
        raise CheckpointMismatchError(source, missing, unexpected, wrong_shape)

    def place(path, variable, key):
        array = np.asarray(to_flax_layout(str(path[-1]), state_dict[key])).astype(variable.dtype)
        if path not in flat_shardings:
            return path, variable.replace(jnp.asarray(array))
        return path, variable.replace(jax.device_put(array, flat_shardings[path].get_value()))

    return nnx.from_flat_state([place(*item) for item in matched])


def export_torch_state(state: nnx.State, key_fn: Callable[[VariablePath], str] = torch_key) -> dict[str, np.ndarray]:
    """NNX state -> PyTorch state dict of host float arrays (inverse of ``load_torch_state``)."""
    return {key_fn(path): np.ascontiguousarray(to_torch_layout(str(path[-1]), np.asarray(v.get_value())))
            for path, v in nnx.to_flat_state(state)}
