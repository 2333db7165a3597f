"""Locate and read PyTorch checkpoint files from local folders (no hub access, no pickled code run)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from realisid_jax.folders import resolve_folder

def read_json(path: Path) -> dict:
    """Reads a ``config.json``-style file. Raises FileNotFoundError naming the folder and file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found in {path.parent}")
    with open(path) as f:
        return json.load(f)


def find_weights(folder: Path, names: Sequence[str]) -> Path:
    """The first of ``names`` (preferred order, safetensors first) present in ``folder``.

    Raises:
      FileNotFoundError: none present; the message lists the names looked for and what the folder holds.
    """
    for name in names:
        if (folder / name).is_file():
            return folder / name
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"no weights file in {folder}: looked for {list(names)}, found {present}")


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict into host numpy arrays (bfloat16 kept as ``ml_dtypes.bfloat16``).

    ``.safetensors`` is read with safetensors; ``.bin``/``.pt`` with ``torch.load(weights_only=True)``, whose
    restricted unpickler runs no code from the file (requires the ``torch`` extra).

    Raises:
      ImportError: a ``.bin`` file without PyTorch installed.
      ValueError: the file cannot be parsed.
    """
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="flax") as f:
                return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read safetensors file {path}: {e}") from e
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a PyTorch pickle; install the torch extra (pip install "
                          f"'realisid-jax[torch]') or convert it to .safetensors") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read PyTorch checkpoint {path}: {e}") from e
    import ml_dtypes

    def to_numpy(t):
        if t.dtype == torch.bfloat16:
            return t.float().numpy().astype(ml_dtypes.bfloat16)
        return t.numpy()

    return {k: to_numpy(v) for k, v in state.items()}
