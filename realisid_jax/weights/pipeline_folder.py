"""A diffusers Stable Diffusion (SD 1.5) / SDXL pipeline folder -> the project's models, tokenizers and scheduler
config.

The folder is what ``DiffusionPipeline.save_pretrained`` writes: ``model_index.json`` naming each component's
class (``"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]``), and one sub-folder per component.
Each class named there must be one the project implements; the choice of class follows ``model_index.json``, as
diffusers' ``DiffusionPipeline.from_pretrained`` does. Model modules are imported only when loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
from jax.sharding import Mesh

from realisid_jax.sharding import DEFAULT_RULES, Rules
from realisid_jax.weights.checkpoint import read_json, resolve_folder

if TYPE_CHECKING:
    from flax import nnx
    from transformers import CLIPTokenizer

# model_index.json class name -> (module, attribute) of the project's implementation.
MODEL_CLASSES: dict[str, tuple[str, str]] = {
    "UNet2DConditionModel": ("realisid_jax.models.unet_2d_condition", "UNet2DConditionModel"),
    "AutoencoderKL": ("realisid_jax.models.vae", "AutoencoderKL"),
    "CLIPTextModel": ("realisid_jax.models.clip_text", "CLIPTextModel"),
    "CLIPTextModelWithProjection": ("realisid_jax.models.clip_text", "CLIPTextModelWithProjection"),
    "CLIPVisionModelWithProjection": ("realisid_jax.models.clip_vision", "CLIPVisionModelWithProjection"),
}
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
_TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection")
# Component -> the class names accepted for it. Components not listed (safety_checker, feature_extractor) are
# not loaded: RealisID does not use them.
ACCEPTED: dict[str, tuple[str, ...]] = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": _TEXT_ENCODERS,
    "text_encoder_2": _TEXT_ENCODERS,
    "image_encoder": ("CLIPVisionModelWithProjection",),
    "tokenizer": TOKENIZER_CLASSES,
    "tokenizer_2": TOKENIZER_CLASSES,
}
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_MODELS = ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder")


class UnsupportedComponentError(ValueError):
    """``model_index.json`` names a class the project has no implementation of, for a component it loads."""


@dataclasses.dataclass
class PipelineComponents:
    """The frozen models of an SD 1.5 / SDXL pipeline, loaded.

    Attributes:
      unet: ``UNet2DConditionModel``. vae: ``AutoencoderKL``.
      text_encoder: ``CLIPTextModel`` (or ``CLIPTextModelWithProjection`` when the index says so).
      tokenizer: its ``transformers.CLIPTokenizer``.
      scheduler_config: ``scheduler/scheduler_config.json`` as a dict (``_class_name`` included).
      text_encoder_2, tokenizer_2: SDXL's second text encoder and its tokenizer; None for SD 1.5.
      image_encoder: ``CLIPVisionModelWithProjection`` from the index or the separate folder; None otherwise.
      model_index: ``model_index.json`` as read.
    """

    unet: nnx.Module
    vae: nnx.Module
    text_encoder: nnx.Module
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    model_index: dict[str, Any]
    text_encoder_2: nnx.Module | None = None
    tokenizer_2: CLIPTokenizer | None = None
    image_encoder: nnx.Module | None = None

    @property
    def text_encoders(self) -> tuple[nnx.Module, ...]:
        """(text_encoder,) for SD 1.5, (text_encoder, text_encoder_2) for SDXL."""
        return tuple(m for m in (self.text_encoder, self.text_encoder_2) if m is not None)

    @property
    def tokenizers(self) -> tuple[CLIPTokenizer, ...]:
        """One tokenizer per text encoder, in the same order."""
        return tuple(t for t in (self.tokenizer, self.tokenizer_2) if t is not None)

    def models(self) -> dict[str, nnx.Module]:
        """Component name -> model, for the models present (``unet``, ``vae``, ``text_encoder``, ...)."""
        return {name: getattr(self, name) for name in _MODELS if getattr(self, name) is not None}


def component_classes(model_index: dict[str, Any]) -> dict[str, str]:
    """Component name -> class name, for the components of ``model_index.json`` this project loads.

    Entries that are ``[null, null]`` (an unused optional component) are absent from the result.

    Raises:
      UnsupportedComponentError: a loaded component names a class the project does not implement.
      ValueError: a required component (``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``) is
        missing or null, or ``text_encoder_2`` comes without ``tokenizer_2`` (or the reverse).
    """
    present = {name: entry[1] for name, entry in model_index.items()
               if isinstance(entry, list) and len(entry) == 2 and entry[1] is not None}
    missing = [name for name in REQUIRED if name not in present]
    if missing:
        raise ValueError(f"model_index.json lists no {missing}: not a Stable Diffusion / SDXL pipeline folder "
                         f"(it lists {sorted(present)})")
    if ("text_encoder_2" in present) != ("tokenizer_2" in present):
        raise ValueError("model_index.json lists only one of text_encoder_2 / tokenizer_2; SDXL needs both")
    for name, class_name in present.items():
        if name in ACCEPTED and class_name not in ACCEPTED[name]:
            raise UnsupportedComponentError(
                f"model_index.json: {name} is a {class_name}, which realisid-jax does not implement; supported "
                f"for {name}: {', '.join(ACCEPTED[name])}")
    return {name: cls for name, cls in present.items() if name in ACCEPTED or name == "scheduler"}


def model_class(class_name: str) -> type:
    """The project's model class for a ``model_index.json`` class name (imported on first use).

    Raises:
      UnsupportedComponentError: no implementation of ``class_name``.
    """
    if class_name not in MODEL_CLASSES:
        raise UnsupportedComponentError(f"realisid-jax has no {class_name}; it implements {sorted(MODEL_CLASSES)}")
    module, attribute = MODEL_CLASSES[class_name]
    return getattr(importlib.import_module(module), attribute)


def load_pipeline_folder(folder: str | os.PathLike, *, dtype=jnp.float32,
                         image_encoder: str | os.PathLike | None = None, attention_impl: str | None = "xla",
                         mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> PipelineComponents:
    """Loads a diffusers SD 1.5 / SDXL pipeline folder.

    Args:
      folder: local pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
        ``tokenizer/``, ``scheduler/``, and for SDXL ``text_encoder_2/``, ``tokenizer_2/``).
      dtype: computation and parameter dtype of every model, float32 or bfloat16.
      image_encoder: optional separate ``CLIPVisionModelWithProjection`` folder (IP-Adapter's
        ``models/image_encoder``); it takes the place of an ``image_encoder`` listed in the index.
      attention_impl: ``jax.nn.dot_product_attention`` implementation for every model.
      mesh, rules: when given, each parameter is placed directly on its logical-axis sharding.

    Returns:
      ``PipelineComponents``.

    Raises:
      HubIdError / FileNotFoundError: ``folder`` (or ``image_encoder``) is not a local folder,
        ``model_index.json`` is missing, or a component's sub-folder is missing (the error names it); all checked
        before any weights are read.
      UnsupportedComponentError / ValueError: see ``component_classes``.
      CheckpointMismatchError: a component's weights do not fit its ``config.json``.
      TokenizerError: a tokenizer folder does not hold the 49,408-entry CLIP tokenizer.
    """
    root = resolve_folder(folder)
    model_index = read_json(root / "model_index.json")
    classes = component_classes(model_index)
    separate_image_encoder = resolve_folder(image_encoder) if image_encoder is not None else None
    if separate_image_encoder is not None:
        classes.pop("image_encoder", None)
    _check_subfolders(root, classes)

    from realisid_jax.tokenizer import load_tokenizer

    kw = dict(dtype=dtype, attention_impl=attention_impl, mesh=mesh, rules=rules)
    loaded: dict[str, Any] = {name: model_class(cls).from_pretrained(root, subfolder=name, **kw)
                              for name, cls in classes.items() if name in _MODELS}
    if separate_image_encoder is not None:
        loaded["image_encoder"] = model_class("CLIPVisionModelWithProjection").from_pretrained(
            separate_image_encoder, **kw)
    loaded.update({name: load_tokenizer(root, subfolder=name) for name in ("tokenizer", "tokenizer_2")
                   if name in classes})
    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
    return PipelineComponents(scheduler_config=scheduler_config, model_index=model_index, **loaded)


def _check_subfolders(root: Path, classes: dict[str, str]) -> None:
    absent = [name for name in classes if not (root / name).is_dir()]
    if absent:
        raise FileNotFoundError(f"pipeline folder {root} has no {', '.join(f'{n}/' for n in absent)} although "
                                f"model_index.json lists {', '.join(f'{n} ({classes[n]})' for n in absent)}")
