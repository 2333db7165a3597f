"""Single-file Stable Diffusion checkpoints (original Stability AI layout); folders are ``weights.pipeline_folder``.

A single ``.safetensors`` holds every frozen model under a prefix:

==================  ====================================================  ==================================
component           SDXL                                                  SD 1.5
==================  ====================================================  ==================================
``unet``            ``model.diffusion_model.``                            same
``vae``             ``first_stage_model.``                                same
``text_encoder``    ``conditioner.embedders.0.transformer.`` (HF CLIP)    ``cond_stage_model.transformer.``
``text_encoder_2``  ``conditioner.embedders.1.model.`` (OpenCLIP)         --
==================  ====================================================  ==================================

Each component's keys are renamed to diffusers / transformers names (``stability_keys``; the same mapping as
diffusers' ``loaders/single_file_utils.py``), then loaded by the class's normal ``from_state_dict``, so a
key that does not fit is reported by ``CheckpointMismatchError`` rather than dropped. Architectures come from
the project config (``c.model.<name>``): a single file carries no config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from realisid_jax.models.registry import FROZEN, dtypes
from realisid_jax.sharding import DEFAULT_RULES, Rules
from realisid_jax.loading import stability_keys
from realisid_jax.loading.pretrained import from_state_dict

# Candidate prefixes per component, in the order they are looked for.
PREFIXES: dict[str, tuple[str, ...]] = {
    "unet": ("model.diffusion_model.",),
    "vae": ("first_stage_model.", "vae."),
    "text_encoder": ("conditioner.embedders.0.transformer.", "cond_stage_model.transformer."),
    "text_encoder_2": ("conditioner.embedders.1.model.",),
}
# OpenCLIP keys that are no part of the text tower (the contrastive temperature, a recomputed mask).
_OPEN_CLIP_IGNORED = ("logit_scale", "attn_mask")
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """A ``.safetensors`` header (key -> ``{dtype, shape, data_offsets}``) and the byte offset of its data.

    Raises:
      FileNotFoundError: no such file. ValueError: not a safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} not found")
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a .safetensors file: {e}") from e
    header.pop("__metadata__", None)
    return header, 8 + size


def read_prefixed(path: str | os.PathLike, prefix: str) -> dict[str, np.ndarray]:
    """The tensors whose keys start with ``prefix``, keys without it, as read-only memory maps of the file
    (no copy; bfloat16 as ``ml_dtypes.bfloat16``), so one component of a 7 GB checkpoint costs only its size
    when it is placed on devices."""
    header, start = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for key, info in header.items():
        if key.startswith(prefix):
            begin, end = info["data_offsets"]
            dtype = np.dtype(_DTYPES[info["dtype"]])
            out[key[len(prefix):]] = data[start + begin:start + end].view(dtype).reshape(info["shape"])
    return out


def detect_components(path: str | os.PathLike) -> dict[str, str]:
    """Component name -> the prefix under which the file holds it (``""`` for a bare LDM VAE file)."""
    keys = read_header(path)[0].keys()
    found = {}
    for name, prefixes in PREFIXES.items():
        prefix = next((p for p in prefixes if any(k.startswith(p) for k in keys)), None)
        if prefix is not None:
            found[name] = prefix
    if not found and "encoder.conv_in.weight" in keys:
        found["vae"] = ""
    return found


def _split_in_proj(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenCLIP's fused ``self_attn.in_proj_{weight,bias}`` (3C rows: q, k, v) -> ``{q,k,v}_proj``."""
    out = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".in_proj_")
        if not head:
            out[key] = value
            continue
        for name, part in zip(("q", "k", "v"), np.split(np.asarray(value), 3, axis=0)):
            out[f"{head}.{name}_proj.{leaf}"] = part
    return out


def to_diffusers(name: str, state: Mapping[str, np.ndarray], model_config: Mapping) -> dict[str, np.ndarray]:
    """One component's LDM-layout tensors (prefix stripped) -> diffusers / transformers keys and layouts.

    Args:
      name: ``unet``, ``vae``, ``text_encoder`` or ``text_encoder_2``.
      state: LDM keys -> arrays.
      model_config: the component's ``config.json`` dict (``c.model.<name>``), which fixes the block numbering.

    Raises:
      KeyError: an unknown component name.
    """
    if name == "unet":
        return stability_keys.rename_state(state, stability_keys.unet_table(model_config))
    if name == "vae":
        renamed = stability_keys.rename_state(state, stability_keys.vae_table(model_config))
        # LDM's attention q/k/v/proj_out are 1x1 convs; diffusers' are Linear layers.
        return {k: v[:, :, 0, 0] if v.ndim == 4 and ".attentions." in k else v for k, v in renamed.items()}
    if name == "text_encoder":
        return dict(state)
    if name == "text_encoder_2":
        kept = {k: v for k, v in state.items() if k not in _OPEN_CLIP_IGNORED}
        renamed = stability_keys.rename_state(kept, stability_keys.open_clip_table(model_config["num_hidden_layers"]))
        if "text_projection.weight" in renamed:  # OpenCLIP computes x @ P; a torch Linear stores P.T
            renamed["text_projection.weight"] = np.ascontiguousarray(np.asarray(renamed["text_projection.weight"]).T)
        return _split_in_proj(renamed)
    raise KeyError(f"no single-file mapping for component {name!r}; known: {sorted(PREFIXES)}")


def load_single_file(path: str | os.PathLike, config, *, components: Iterable[str] | None = None,
                     mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> dict[str, nnx.Module]:
    """Loads the frozen models of an original-layout SD 1.5 / SDXL ``.safetensors`` checkpoint.

    Args:
      path: the ``.safetensors`` file (``.ckpt`` pickles are not read: convert them to safetensors first).
      config: project config (``configs/sdxl.py`` / ``sd15.py``); ``c.model.<name>`` gives each architecture,
        ``dtype`` / ``param_dtype`` / ``attention_impl`` the model dtypes.
      components: names to load (default: every component the file holds and the config describes).
      mesh, rules: when given, each parameter is placed directly on its logical-axis sharding.

    Returns:
      name -> model (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``,
      ``CLIPTextModelWithProjection``).

    Raises:
      FileNotFoundError: no such file. ValueError: a requested component is not in the file, or not in the
      config. CheckpointMismatchError: a component's tensors do not fit its config (all keys listed).
    """
    found = detect_components(path)
    wanted = list(components) if components is not None else [n for n in found if config.model.get(n) is not None]
    for name in wanted:
        if name not in found:
            raise ValueError(f"{path} holds no {name!r} (looked for prefixes {PREFIXES.get(name)}); it holds "
                             f"{sorted(found) or 'no known component'}")
        if config.model.get(name) is None:
            raise ValueError(f"the config describes no {name!r} (c.model.{name} is None)")
    models = {}
    for name in wanted:
        cls, config_class = FROZEN[name]
        model_config = dict(config.model[name])
        state = to_diffusers(name, read_prefixed(path, found[name]), model_config)
        models[name] = from_state_dict(cls, config_class.from_dict(model_config), state,
                                           source=f"{path} [{found[name] or name}]", mesh=mesh, rules=rules,
                                           **dtypes(config))
    return models

