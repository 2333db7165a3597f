"""LoRA files merged into the frozen UNet and text encoders once, at load time (diffusers' ``fuse_lora``).

The two formats in circulation for SD 1.5 / SDXL:

- diffusers / peft (``pytorch_lora_weights.safetensors``): ``unet.`` / ``text_encoder.`` / ``text_encoder_2.``,
  the module's diffusers / transformers name, then ``lora_A.weight`` / ``lora_B.weight`` (peft),
  ``lora.down.weight`` / ``lora.up.weight`` or ``lora_linear_layer.down.weight`` / ``.up.weight`` (older
  diffusers); optional ``<module>.alpha``, and peft's ``lora_alpha`` / ``alpha_pattern`` / ``use_rslora`` in the
  safetensors metadata (``lora_adapter_metadata``, written by diffusers' ``save_lora_weights``).
- kohya (sd-scripts): ``lora_unet_`` / ``lora_te1_`` (``lora_te_`` for SD 1.5) / ``lora_te2_``, the module name with
  ``_`` for ``.`` (the UNet's in diffusers names, or in the original Stability names SDXL trainers use:
  ``input_blocks_4_1_transformer_blocks_0_attn1_to_q``), then ``lora_down.weight`` / ``lora_up.weight`` /
  ``alpha``.

Each module's weight becomes ``W + scale * alpha / rank * up @ down`` (peft's scaling, ``alpha / sqrt(rank)``
with rsLoRA; alpha defaults to the rank), in the kernel layout (Linear (in, out), Conv HWIO; a k x k ``down``
conv with a 1x1 ``up`` conv), added in float32 on each weight's own sharding. Every key of every file is matched
and every shape checked before any weight changes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realisid_jax.loading.errors import LoraError
from realisid_jax.loading.files import read_state_dict
from realisid_jax.loading.stability_keys import unet_table
from realisid_jax.loading.torch_state import to_flax_layout, to_torch_layout
from realisid_jax.models.modeling_utils import VariablePath

# Key ending -> the factor it holds.
_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
          "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
          "lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_DIFFUSERS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te_": "text_encoder"}
_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


@dataclasses.dataclass(frozen=True)
class LoraUpdate:
    """One module's low-rank update, resolved and checked.

    Attributes:
      component: model name (``unet``, ``text_encoder``, ``text_encoder_2``).
      path: the NNX path of the module's ``kernel``.
      down, up: float32 host arrays in PyTorch layout: (r, in) / (out, r), or (r, in, k, k) / (out, r, 1, 1).
      factor: ``scale * alpha / rank``.
    """

    component: str
    path: VariablePath
    down: np.ndarray
    up: np.ndarray
    factor: float

    def delta(self, kernel_shape: tuple[int, ...]) -> np.ndarray:
        """``factor * up @ down`` in the kernel's flax layout, float32."""
        up = self.up.reshape(self.up.shape[:2])
        product = np.einsum("or,ri...->oi...", up, self.down) * np.float32(self.factor)
        torch_shape = to_torch_layout("kernel", np.empty(kernel_shape, np.bool_)).shape
        return to_flax_layout("kernel", product.reshape(torch_shape))


def _split_key(key: str) -> tuple[str, str, str, bool] | None:
    """``(component, module name, part, kohya)`` of a LoRA key, or None for a key of neither format."""
    for ending, part in _PARTS.items():
        if not key.endswith("." + ending):
            continue
        head = key[:-len(ending) - 1]
        for prefix, component in _KOHYA.items():
            if head.startswith(prefix):
                return component, head[len(prefix):], part, True
        component, _, module = head.partition(".")
        if component in _DIFFUSERS and module:
            return component, module, part, False
    return None


def _ldm_name(module: str, table: Mapping) -> str | None:
    """The original Stability name of a diffusers UNet module (the inverse of ``stability_keys.rename_key``)."""
    for ldm_prefix, (prefix, inner) in table.items():
        if module == prefix or module.startswith(prefix + "."):
            rest = module[len(prefix) + 1:]
            for old, new in inner:
                if rest == new or rest.startswith(new + "."):
                    rest = old + rest[len(new):]
                    break
            return f"{ldm_prefix}.{rest}" if rest else ldm_prefix
    return None


class _Targets:
    """The modules of one model a LoRA may update: PyTorch module name -> (kernel path, kernel shape), plus the
    kohya names (``.`` -> ``_``, and the UNet's original Stability names)."""

    def __init__(self, model: nnx.Module):
        self.model = model
        self.modules = {}
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            if path[-1] == "kernel":
                self.modules[type(model).torch_key(path).removesuffix(".weight")] = (path, tuple(variable.shape))
        self.kohya = {name.replace(".", "_"): name for name in self.modules}
        if hasattr(model.config, "down_block_types"):  # a UNet: SDXL kohya LoRAs use the Stability names
            table = unet_table(model.config.to_dict())
            for name in self.modules:
                ldm = _ldm_name(name, table)
                if ldm is not None:
                    self.kohya[ldm.replace(".", "_")] = name

    def find(self, module: str, kohya: bool) -> str | None:
        if kohya:
            return self.kohya.get(module)
        # transformers 5 names CLIP text modules without ``text_model.``: the class's own key normalisation.
        name = next(iter(type(self.model).rename_checkpoint({f"{module}.weight": None}))).removesuffix(".weight")
        return name if name in self.modules else None


def _peft_alphas(metadata: Mapping[str, str] | None) -> dict[str, dict]:
    """component -> peft ``LoraConfig`` fields (``lora_alpha``, ``alpha_pattern``, ``use_rslora``) from
    diffusers' safetensors metadata; empty without it."""
    if not metadata or _METADATA_KEY not in metadata:
        return {}
    out: dict[str, dict] = {}
    for key, value in json.loads(metadata[_METADATA_KEY]).items():
        component, _, field = key.partition(".")
        out.setdefault(component, {})[field] = value
    return out


def _alpha(module: str, rank: int, stored, config: Mapping) -> float:
    """The module's alpha: its ``alpha`` tensor, else peft's ``alpha_pattern`` (suffix match, as peft) or
    ``lora_alpha``, else the rank (scaling 1, as diffusers without alphas)."""
    if stored is not None:
        return float(np.asarray(stored).reshape(()))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return float(value)
    return float(config.get("lora_alpha") or rank)


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict | None]:
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} not found")
    metadata = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="flax") as f:
            metadata = f.metadata()
    return read_state_dict(path), metadata


def read_lora(path: str | os.PathLike, models: Mapping[str, nnx.Module], scale: float = 1.0) -> list[LoraUpdate]:
    """Every update of one LoRA file for ``models``, resolved and checked; nothing is changed.

    Args:
      path: a ``.safetensors`` (or ``.bin``) LoRA, diffusers / peft or kohya keys (module docstring).
      models: name -> model (``unet``, ``text_encoder``, ``text_encoder_2``; others are ignored).
      scale: the user's strength (diffusers' ``lora_scale``); 0 leaves the weights as they are.

    Returns:
      One ``LoraUpdate`` per LoRA module.

    Raises:
      FileNotFoundError: no such file. ValueError: unreadable file.
      LoraError: keys of neither format, modules the models lack (e.g. ``text_encoder_2`` on SD 1.5),
        a ``down`` without its ``up`` (or the reverse), or factors whose shapes do not fit the module; all
        listed at once.
    """
    path = Path(path)
    state, metadata = _read(path)
    peft = _peft_alphas(metadata)
    targets = {name: _Targets(models[name]) for name in _DIFFUSERS if models.get(name) is not None}
    unknown, unmatched, factors = [], [], {}
    for key, value in state.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        component, module, part, kohya = split
        name = targets[component].find(module, kohya) if component in targets else None
        if name is None:
            unmatched.append(key)
            continue
        factors.setdefault((component, name, module), {})[part] = value
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} keys of no SD / SDXL LoRA format: {_listing(unknown)}")
    if unmatched:
        problems.append(f"{len(unmatched)} keys name no module of {sorted(targets)}: {_listing(unmatched)}")
    updates = []
    for (component, name, module), parts in factors.items():
        if "down" not in parts or "up" not in parts:
            problems.append(f"{component}.{name} has no {'up' if 'down' in parts else 'down'} factor")
            continue
        kernel_path, kernel_shape = targets[component].modules[name]
        down, up = (np.asarray(parts[p], np.float32) for p in ("down", "up"))
        if not _fits(down, up, kernel_shape):
            want = to_torch_layout("kernel", np.empty(kernel_shape, np.bool_)).shape
            problems.append(f"{component}.{name}: down {down.shape} and up {up.shape} do not make its "
                            f"{tuple(want)} weight")
            continue
        config = peft.get(component, {})
        alpha, rank = _alpha(module, down.shape[0], parts.get("alpha"), config), down.shape[0]
        factor = scale * alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        updates.append(LoraUpdate(component, kernel_path, down, up, factor))
    if problems:
        raise LoraError(f"LoRA {path} does not fit the models (nothing was merged): " + "; ".join(problems))
    return updates


def _listing(keys: Sequence[str], shown: int = 8) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def _fits(down: np.ndarray, up: np.ndarray, kernel_shape: tuple[int, ...]) -> bool:
    """Whether ``up @ down`` makes the module's weight: ranks agree, ``up`` is (out, r) or (out, r, 1, 1), and
    (out, in, *window) is the PyTorch weight shape (a 1x1 window and none are the same)."""
    out_in = to_torch_layout("kernel", np.empty(kernel_shape, np.bool_)).shape
    squeeze = lambda s: s[:2] if len(s) == 4 and s[2:] == (1, 1) else s  # noqa: E731
    return (down.ndim in (2, 4) and up.ndim == down.ndim and up.shape[1] == down.shape[0]
            and up.shape[2:] in ((), (1, 1)) and squeeze((up.shape[0], *down.shape[1:])) == squeeze(out_in))


@jax.jit
def _add(kernel: jax.Array, delta: jax.Array) -> jax.Array:
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def apply_lora(models: Mapping[str, nnx.Module], updates: Sequence[LoraUpdate]) -> None:
    """Adds each update to its module's kernel, in place: the delta is made on the host one tensor at a time,
    placed on the kernel's sharding (each device gets its shard) and added there in float32."""
    by_component: dict[str, list[LoraUpdate]] = {}
    for update in updates:
        by_component.setdefault(update.component, []).append(update)
    for component, group in by_component.items():
        flat = dict(nnx.to_flat_state(nnx.state(models[component], nnx.Param)))
        new = {}
        for update in group:
            variable = new.get(update.path, flat[update.path])
            kernel = variable.get_value()
            delta = jax.device_put(update.delta(tuple(kernel.shape)), kernel.sharding)
            new[update.path] = variable.replace(_add(kernel, delta))
        nnx.update(models[component], nnx.from_flat_state(list(new.items())))


def merge_loras(models: Mapping[str, nnx.Module], loras: Sequence[tuple[str | os.PathLike, float]]) -> list[Counter]:
    """Reads and checks every ``(file, scale)`` of ``loras``, then merges them all into ``models`` (in place).

    Returns:
      Per file, component -> number of modules updated (also printed, one note line per file).

    Raises:
      FileNotFoundError / ValueError / LoraError: as ``read_lora``, before any weight changes.
    """
    per_file = [read_lora(path, models, scale) for path, scale in loras]
    apply_lora(models, [update for updates in per_file for update in updates])
    counts = [Counter(update.component for update in updates) for updates in per_file]
    for (path, scale), count in zip(loras, counts):
        print(f"note: LoRA {path} (scale {scale:g}) merged into "
              + ", ".join(f"{name} ({n} modules)" for name, n in count.items()))
    return counts
