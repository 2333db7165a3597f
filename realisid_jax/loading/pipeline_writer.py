"""The project's models -> a diffusers ``StableDiffusionXLPipeline`` folder (the inverse of ``pipeline_folder``).

``save_pipeline_folder`` writes what ``StableDiffusionXLPipeline.save_pretrained`` writes::

    FOLDER/model_index.json
    FOLDER/unet/, vae/           config.json (_class_name, _diffusers_version)  diffusion_pytorch_model.safetensors
    FOLDER/text_encoder/, text_encoder_2/, image_encoder/ (when given)
                                 config.json (architectures, model_type)        model.safetensors
    FOLDER/tokenizer/, tokenizer_2/   tokenizer.save_pretrained
    FOLDER/scheduler/scheduler_config.json

so that ``diffusers.StableDiffusionXLPipeline.from_pretrained(FOLDER)``, transformers' ``from_pretrained`` of each
encoder folder, and the project's ``load_pipeline_folder`` / ``load_model_folders`` read it. Models trained from
scratch (the glyph world's base) leave the project this way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import transformers
from flax import nnx
from safetensors.numpy import save_file

from realisid_jax.loading import torch_state
from realisid_jax.loading.branch_folders import DIFFUSERS_VERSION, export_module
from realisid_jax.loading.pipeline_folder import ACCEPTED
from realisid_jax.schedulers import SDXL_SCHEDULER_CONFIG

__all__ = ["SDXL_SCHEDULER_CONFIG", "save_image_encoder", "save_pipeline_folder", "save_transformers_model"]

TRANSFORMERS_WEIGHTS_NAME = "model.safetensors"
# transformers config class of each model class; ``model_type`` (clip_text_model / clip_vision_model) comes with it.
_TRANSFORMERS_CONFIGS = {"CLIPTextModel": transformers.CLIPTextConfig,
                         "CLIPTextModelWithProjection": transformers.CLIPTextConfig,
                         "CLIPVisionModelWithProjection": transformers.CLIPVisionConfig}
# Component -> library, in model_index.json.
_LIBRARIES = {"unet": "diffusers", "vae": "diffusers", "scheduler": "diffusers", "text_encoder": "transformers",
              "text_encoder_2": "transformers", "tokenizer": "transformers", "tokenizer_2": "transformers",
              "image_encoder": "transformers"}


def save_pipeline_folder(folder: str | os.PathLike, *, unet: nnx.Module, vae: nnx.Module, text_encoder: nnx.Module,
                         text_encoder_2: nnx.Module, tokenizer: transformers.CLIPTokenizer,
                         tokenizer_2: transformers.CLIPTokenizer,
                         scheduler_config: Mapping[str, Any] = SDXL_SCHEDULER_CONFIG,
                         image_encoder: nnx.Module | None = None) -> Path:
    """Writes an SDXL pipeline folder, as ``diffusers.StableDiffusionXLPipeline.save_pretrained`` does.

    Weights keep their stored dtype (float32 or bfloat16) and take PyTorch names and layouts (each class's
    ``torch_key``, Linear / conv kernels transposed back). Existing files of the same names are replaced.

    Args:
      folder: created if absent.
      unet: ``UNet2DConditionModel``. vae: ``AutoencoderKL``.
      text_encoder: ``CLIPTextModel``; text_encoder_2: ``CLIPTextModelWithProjection`` (or either class for
        either, as ``model_index.json`` allows).
      tokenizer, tokenizer_2: transformers CLIP tokenizers (``text.tokenizer.standard_tokenizers(2)``); each
        pad token is kept (SDXL: ``<|endoftext|>`` and ``!``).
      scheduler_config: ``scheduler_config.json`` contents with its diffusers ``_class_name``; default SDXL
        base's ``EulerDiscreteScheduler``.
      image_encoder: optional ``CLIPVisionModelWithProjection``, written to ``image_encoder/`` and listed in
        ``model_index.json`` (diffusers' IP-Adapter layout); absent, the index lists ``[null, null]``.

    Returns:
      The folder.

    Raises:
      TypeError: a model is not of a class ``pipeline_folder.ACCEPTED`` lists for its component.
      ValueError: ``scheduler_config`` has no ``_class_name``.
    """
    models = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
              "image_encoder": image_encoder}
    models = {name: model for name, model in models.items() if model is not None}
    components = {**models, "tokenizer": tokenizer, "tokenizer_2": tokenizer_2}
    classes = {name: type(obj).__name__ for name, obj in components.items()}
    wrong = {name: cls for name, cls in classes.items() if cls not in ACCEPTED[name]}
    if wrong:
        raise TypeError("; ".join(f"{name} is a {cls}, expected {' or '.join(ACCEPTED[name])}"
                                  for name, cls in wrong.items()))
    if "_class_name" not in scheduler_config:
        raise ValueError("scheduler_config has no '_class_name' (the diffusers scheduler class, e.g. "
                         "'EulerDiscreteScheduler')")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        if _LIBRARIES[name] == "diffusers":
            export_module(model, root / name, classes[name])
        else:
            save_transformers_model(root / name, model)
    for name in ("tokenizer", "tokenizer_2"):
        components[name].save_pretrained(str(root / name))
    scheduler = {"_diffusers_version": DIFFUSERS_VERSION, **scheduler_config}
    _write_json(root / "scheduler" / "scheduler_config.json", scheduler)
    classes["scheduler"] = scheduler["_class_name"]
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "feature_extractor": [None, None], "force_zeros_for_empty_prompt": True, "image_encoder": [None, None],
             **{name: [_LIBRARIES[name], cls] for name, cls in classes.items()}}
    _write_json(root / "model_index.json", index)
    return root


def save_image_encoder(folder: str | os.PathLike, model: nnx.Module) -> Path:
    """Writes a ``CLIPVisionModelWithProjection`` as a stand-alone transformers folder (IP-Adapter's
    ``models/image_encoder`` layout), which ``--image-encoder`` and ``load_pipeline_folder(image_encoder=...)`` take.

    Raises:
      TypeError: ``model`` is another class.
    """
    if type(model).__name__ != "CLIPVisionModelWithProjection":
        raise TypeError(f"an image encoder must be a CLIPVisionModelWithProjection, got {type(model).__name__}")
    return save_transformers_model(folder, model)


def save_transformers_model(folder: str | os.PathLike, model: nnx.Module) -> Path:
    """Writes a CLIP model as transformers' ``save_pretrained`` does: ``config.json`` through transformers' own
    config class (``architectures``, ``model_type``, ``dtype``, ``transformers_version`` and its defaults) and
    ``model.safetensors`` (``format: pt``).

    Text encoders keep the ``text_model.`` prefix on every key, the layout of every SD / SDXL checkpoint, which
    transformers 4 and 5 both load; transformers 5 writes a fresh ``CLIPTextModel`` without the prefix but keeps
    it when re-saving one it read so.

    Raises:
      TypeError: not a CLIP text / vision model of this project. ValueError: parameters stored in several dtypes.
    """
    class_name = type(model).__name__
    if class_name not in _TRANSFORMERS_CONFIGS:
        raise TypeError(f"{class_name} has no transformers folder format; expected one of "
                        f"{sorted(_TRANSFORMERS_CONFIGS)}")
    state = nnx.state(model, nnx.Param)
    stored = {leaf.dtype for leaf in jax.tree.leaves(state)}
    if len(stored) != 1:
        raise ValueError(f"{class_name} stores parameters in several dtypes {sorted(map(str, stored))}; "
                        "transformers' config.json records one")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = _TRANSFORMERS_CONFIGS[class_name](**model.config.to_dict(), architectures=[class_name],
                                               dtype=str(stored.pop()))
    config.save_pretrained(str(folder))
    weights = torch_state.export_torch_state(state, key_fn=type(model).torch_key)
    save_file(weights, str(folder / TRANSFORMERS_WEIGHTS_NAME), metadata={"format": "pt"})
    return folder


def _write_json(path: Path, values: Mapping[str, Any]) -> None:
    """diffusers' ``to_json_string`` layout: sorted keys, indent 2, trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(values), indent=2, sort_keys=True) + "\n")
