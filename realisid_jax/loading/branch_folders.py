"""RealisID's trained branches <-> diffusers-format folders, and ControlNet weights as a branch's start.

``export_branches`` writes what PyTorch users load directly::

    OUT/local_branch/   config.json (diffusers ControlNetModel)   diffusion_pytorch_model.safetensors
    OUT/global_branch/  config.json (diffusers ControlNetModel)   diffusion_pytorch_model.safetensors
    OUT/id_projection/  config.json (IPAdapterPlusImageProjection init kwargs)   diffusion_pytorch_model.safetensors

``diffusers.from_pretrained(ControlNetModel, OUT / "local_branch")`` loads a branch;
``IPAdapterPlusImageProjection(**config)`` plus ``load_state_dict`` the projection. ``load_branches`` reads
the folders back. ``init_branch_from_controlnet`` starts a branch from an existing diffusers SDXL ControlNet
(e.g. InstantID's IdentityNet), copying every tensor that fits and reporting the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import save_file

from realisid_jax.models.controlnet import ControlNetModel
from realisid_jax.models.id_projection import IDProjection
from realisid_jax.sharding import DEFAULT_RULES, Rules
from realisid_jax.loading import torch_state
from realisid_jax.folders import resolve_folder
from realisid_jax.loading.files import find_weights, read_json, read_weights
from realisid_jax.loading.pretrained import from_pretrained

BRANCHES = ("local_branch", "global_branch")
PARTS = (*BRANCHES, "id_projection")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# diffusers class names written as ``_class_name``, so diffusers tooling recognises the folders.
_CLASS_NAMES = {"local_branch": "ControlNetModel", "global_branch": "ControlNetModel",
                "id_projection": "IPAdapterPlusImageProjection"}
DIFFUSERS_VERSION = "0.42.1"


def export_module(module: nnx.Module, folder: str | os.PathLike, class_name: str) -> Path:
    """Writes one model as a diffusers folder: ``config.json`` (``module.config.to_dict()`` plus
    ``_class_name``) and ``diffusion_pytorch_model.safetensors`` (PyTorch names and layouts, stored dtype
    kept: float32 or bfloat16). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **module.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = torch_state.export_torch_state(nnx.state(module, nnx.Param), key_fn=type(module).torch_key)
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder


_SETTINGS = "realisid.json"


def export_branches(realisid: nnx.Module, out: str | os.PathLike) -> dict[str, Path]:
    """Exports a ``RealisID``'s ``local_branch``, ``global_branch`` and ``id_projection`` under ``out``, and the
    RealisID-level settings (crop size, branch scales, persons per branch pass) as ``realisid.json``; returns
    name -> folder."""
    folders = {name: export_module(getattr(realisid, name), Path(out) / name, _CLASS_NAMES[name]) for name in PARTS}
    c = realisid.config
    settings = dict(local_latent_size=c.local_latent_size, local_scale=c.local_scale, global_scale=c.global_scale,
                    persons_per_pass=c.persons_per_pass)
    (Path(out) / _SETTINGS).write_text(json.dumps(settings, indent=2))
    return folders


def load_branch_parts(folder: str | os.PathLike, *, dtype=None, param_dtype=None, attention_impl: str | None = "xla",
                      mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> tuple[dict[str, nnx.Module], dict]:
    """Reads an ``export_branches`` folder: ``(name -> model, settings)`` for ``local_branch``, ``global_branch``
    (``ControlNetModel``) and ``id_projection`` (``IDProjection``), and the ``realisid.json`` settings (empty
    when absent). ``realisid.components.load_branches`` assembles them into a ``RealisID``.

    Args:
      folder: holds ``local_branch/``, ``global_branch/``, ``id_projection/``.
      dtype, param_dtype, attention_impl, mesh, rules: as ``from_pretrained``; dtype defaults to float32.

    Raises:
      FileNotFoundError: a part's folder, config or weights missing. CheckpointMismatchError: as
      ``from_pretrained``.
    """
    root = resolve_folder(folder)
    kw = dict(dtype=dtype or jnp.float32, param_dtype=param_dtype, attention_impl=attention_impl, mesh=mesh,
              rules=rules)
    parts = {name: from_pretrained(cls, root, subfolder=name, **kw)
             for name, cls in (("local_branch", ControlNetModel), ("global_branch", ControlNetModel),
                               ("id_projection", IDProjection))}
    settings = read_json(root / _SETTINGS) if (root / _SETTINGS).is_file() else {}
    return parts, settings


@dataclasses.dataclass
class ImportReport:
    """What ``init_branch_from_controlnet`` did; ``str(report)`` is the human-readable summary.

    Attributes:
      branch, source: the branch name and the ControlNet folder.
      copied: PyTorch keys copied into the branch.
      wrong_shape: ``(key, checkpoint_shape, branch_shape)`` for tensors left at their current values.
      missing: branch keys the checkpoint lacks (left at their current values).
      unused: checkpoint keys the branch has no place for.
      config_differences: ``(key, checkpoint value, branch value)`` of differing config entries.
    """

    branch: str
    source: str
    copied: list[str] = dataclasses.field(default_factory=list)
    wrong_shape: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unused: list[str] = dataclasses.field(default_factory=list)
    config_differences: list[tuple[str, object, object]] = dataclasses.field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every branch tensor was copied."""
        return not (self.wrong_shape or self.missing)

    def __str__(self) -> str:
        total = len(self.copied) + len(self.wrong_shape) + len(self.missing)
        lines = [f"{self.branch} <- {self.source}: copied {len(self.copied)} of {total} tensors"]
        for key, theirs, ours in self.config_differences:
            lines.append(f"  config differs: {key}: checkpoint {theirs!r}, branch {ours!r}")
        for key, theirs, ours in self.wrong_shape:
            lines.append(f"  NOT copied (shape): {key}: checkpoint {theirs}, branch {ours} - keeps its current value")
        for key in self.missing:
            lines.append(f"  NOT copied (absent from checkpoint): {key} - keeps its current value")
        for key in self.unused:
            lines.append(f"  unused checkpoint tensor: {key}")
        return "\n".join(lines)


def _config_differences(checkpoint_config: dict, branch_config) -> list[tuple[str, object, object]]:
    ours = branch_config.to_dict()
    out = []
    for key in sorted(ours):
        if key in checkpoint_config:
            theirs = checkpoint_config[key]
            theirs = list(theirs) if isinstance(theirs, tuple) else theirs
            if theirs != ours[key]:
                out.append((key, theirs, ours[key]))
    return out


def init_branch_from_controlnet(realisid: nnx.Module, branch_name: str, folder: str | os.PathLike, *,
                                verbose: bool = True) -> ImportReport:
    """Copies a diffusers ControlNet's weights into ``realisid.<branch_name>`` wherever they fit.

    Tensors whose shape differs (``controlnet_cond_embedding.conv_in`` for 3-channel vs 1-channel
    conditions; ``attn2.to_k`` / ``to_v`` for another cross-attention width, e.g. InstantID's 2048 vs p_id's
    width) and tensors the checkpoint lacks keep the branch's current values; nothing is skipped silently:
    the report lists every such key, and is printed when ``verbose``. Copied tensors take the branch's dtype
    and each existing parameter's sharding.

    Args:
      realisid: a ``RealisID``, modified in place.
      branch_name: ``"local_branch"`` or ``"global_branch"``.
      folder: diffusers ControlNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``/``.bin``).

    Raises:
      ValueError: unknown branch name. FileNotFoundError: folder or weights missing.
    """
    if branch_name not in BRANCHES:
        raise ValueError(f"branch_name must be one of {BRANCHES}, got {branch_name!r}")
    branch = getattr(realisid, branch_name)
    path = resolve_folder(folder)
    weights = find_weights(path, ControlNetModel.weights_names)
    state_dict = ControlNetModel.rename_checkpoint(read_weights(weights))
    report = ImportReport(branch_name, str(path),
                          config_differences=_config_differences(read_json(path / "config.json"), branch.config))
    params = nnx.state(branch, nnx.Param)
    used, updates = set(), []
    for var_path, variable in nnx.to_flat_state(params):
        key = type(branch).torch_key(var_path)
        if key not in state_dict:
            report.missing.append(key)
            continue
        used.add(key)
        array = torch_state.to_flax_layout(str(var_path[-1]), state_dict[key])
        current = variable.get_value()
        if tuple(array.shape) != tuple(current.shape):
            want = torch_state.to_torch_layout(str(var_path[-1]), np.empty(current.shape, np.bool_)).shape
            report.wrong_shape.append((key, tuple(state_dict[key].shape), tuple(want)))
            continue
        value = jax.device_put(np.asarray(array).astype(current.dtype), current.sharding)
        updates.append((var_path, variable.replace(value)))
        report.copied.append(key)
    report.unused = [k for k in state_dict
                     if k not in used and not any(re.fullmatch(p, k) for p in ControlNetModel.ignore_keys)]
    nnx.update(branch, nnx.from_flat_state(updates))
    if verbose:
        print(report)
    return report
