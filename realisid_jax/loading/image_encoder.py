"""Image-encoder folders as people have them: a transformers ``CLIPVisionModelWithProjection`` folder
(IP-Adapter's ``models/image_encoder``) or a whole ``CLIPModel`` folder (e.g. LAION's CLIP-ViT-H-14
repository), of which only the vision tower and ``visual_projection`` are used."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

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


def vision_weights(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A ``CLIPModel`` checkpoint's vision tower and projection (``vision_model.*``, ``visual_projection.*``);
    its text tower, ``text_projection`` and ``logit_scale`` are dropped. Other checkpoints pass unchanged."""
    return {k: v for k, v in state_dict.items() if not _CLIP_MODEL_UNUSED.fullmatch(k)}
