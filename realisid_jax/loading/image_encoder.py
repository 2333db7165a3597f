"""Image-encoder folders as people have them: a transformers ``CLIPVisionModelWithProjection`` folder
(IP-Adapter's ``models/image_encoder``) or a whole ``CLIPModel`` folder (e.g. LAION's CLIP-ViT-H-14
repository), of which only the vision tower and ``visual_projection`` are used."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from realisid_jax.loading.files import SafetensorsWeights

VISION_CLASSES = ("CLIPVisionModelWithProjection", "CLIPModel")
_CLIP_MODEL_UNUSED = re.compile(r"text_model\..*|text_projection\..*|logit_scale")


def vision_config(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The ``CLIPVisionModelWithProjection`` config of a ``config.json``: itself, or a ``CLIPModel``'s
    ``vision_config`` with the model's ``projection_dim`` (the width of ``visual_projection``).

    Raises:
      ValueError: any other architecture (a text model, a ``CLIPVisionModel`` without projection, ...); the
        message names the two accepted and what the folder holds.
    """
    architectures = values.get("architectures") or [values.get("model_type", "an unnamed model")]
    if "CLIPModel" in architectures and "vision_config" in values:
        return {**values["vision_config"], "projection_dim": values["projection_dim"]}
    # Old files name no architecture, only the model type.
    if "CLIPVisionModelWithProjection" in architectures or architectures == ["clip_vision_model"]:
        return values
    raise ValueError(f"{folder} holds a {'/'.join(architectures)}; an image encoder must be a transformers "
                     f"{' or '.join(VISION_CLASSES)} folder (config.json 'architectures')")


def vision_weights(state_dict: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """A ``CLIPModel`` checkpoint's vision tower and projection (``vision_model.*``, ``visual_projection.*``);
    its text tower, ``text_projection`` and ``logit_scale`` are dropped. Other checkpoints pass unchanged.
    A lazy ``SafetensorsWeights`` stays unread (the dropped towers are never read)."""
    keep = [k for k in state_dict if not _CLIP_MODEL_UNUSED.fullmatch(k)]
    if isinstance(state_dict, SafetensorsWeights):
        return state_dict.subset(keep)
    return {k: state_dict[k] for k in keep}
