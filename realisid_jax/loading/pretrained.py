"""``from_pretrained`` for the project's model classes: diffusers' ``ModelMixin.from_pretrained`` for local folders.

The model is built with ``nnx.eval_shape`` (no memory), then each imported tensor is placed straight onto its
sharding. ``from_pretrained(UNet2DConditionModel, folder, subfolder="unet")`` is diffusers'
``UNet2DConditionModel.from_pretrained(folder, subfolder="unet")``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from realisid_jax.loading import torch_state
from realisid_jax.folders import resolve_folder
from realisid_jax.loading.files import find_weights, read_json, read_weights
from realisid_jax.loading.image_encoder import vision_config, vision_weights
from realisid_jax.models.clip_vision import CLIPVisionModelWithProjection
from realisid_jax.models.modeling_utils import ModelConfig, PretrainedMixin
from realisid_jax.sharding import DEFAULT_RULES, Rules, state_shardings

M = TypeVar("M", bound=PretrainedMixin)


def from_pretrained(cls: type[M], folder: str | os.PathLike, *, subfolder: str | None = None,
                    variant: str | None = None, dtype=jnp.float32, param_dtype=None,
                    attention_impl: str | None = "xla", mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> M:
    """Loads a model of class ``cls`` from a diffusers/transformers-format local folder (``config.json`` + weights).

    Args:
      folder: local model folder (or a pipeline folder with ``subfolder``, e.g. ``"unet"``): one weights file
        or shards with their ``*.index.json`` (``loading.files.find_weights``).
      variant: weights variant, e.g. ``"fp16"`` (``model.fp16.safetensors``); default the plain files, or the
        folder's only variant. Each tensor is cast to ``param_dtype`` as it is placed.
      dtype: computation dtype; ``param_dtype`` (default: ``dtype``) is the storage dtype, float32 or
        bfloat16.
      mesh, rules: when given, each parameter is placed directly on its logical-axis sharding.

    Raises:
      HubIdError: a hub id instead of a folder. FileNotFoundError: folder, ``config.json`` or weights
      missing. CheckpointMismatchError: missing / unexpected / wrong-shape keys, all listed.
    """
    root = resolve_folder(folder)
    path = resolve_folder(root / subfolder) if subfolder else root
    config = cls.config_class.from_dict(read_config(cls, path))
    weights = find_weights(path, cls.weights_names, variant=variant)
    source = str(weights[0]) if len(weights) == 1 else f"{path} ({len(weights)} shards)"
    state_dict = read_weights(weights)
    if issubclass(cls, CLIPVisionModelWithProjection):
        state_dict = vision_weights(state_dict)
    return from_state_dict(cls, config, state_dict, source=source, dtype=dtype,
                           param_dtype=param_dtype, attention_impl=attention_impl, mesh=mesh, rules=rules)


def read_config(cls: type[M], folder: Path) -> dict:
    """``folder/config.json`` as ``cls.config_class.from_dict`` takes it; for an image encoder, a ``CLIPModel``
    folder's vision part (``loading.image_encoder.vision_config``, which raises ValueError for other models)."""
    values = read_json(folder / "config.json")
    return vision_config(values, folder) if issubclass(cls, CLIPVisionModelWithProjection) else values


def from_state_dict(cls: type[M], config: ModelConfig, state_dict: dict[str, np.ndarray], *, source: str,
                    dtype=jnp.float32, param_dtype=None, attention_impl: str | None = "xla",
                    mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> M:
    """Builds the model of ``config`` from a PyTorch-keyed state dict (diffusers/transformers names), e.g.
    one converted from a single-file checkpoint; arguments as ``from_pretrained``, ``source`` names the
    file in error messages.

    Raises:
      CheckpointMismatchError: missing / unexpected / wrong-shape keys, all listed.
    """
    graphdef, abstract_state = nnx.split(cls.abstract(config, dtype=dtype, param_dtype=param_dtype,
                                                      attention_impl=attention_impl))
    shardings = state_shardings(abstract_state, mesh, rules) if mesh is not None else None
    state = torch_state.load_torch_state(abstract_state, cls.rename_checkpoint(state_dict), source=source,
                                         key_fn=cls.torch_key, ignore=cls.ignore_keys, shardings=shardings)
    return nnx.merge(graphdef, state)
