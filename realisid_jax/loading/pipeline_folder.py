"""Diffusers Stable Diffusion (SD 1.5) / SDXL pipeline folders -> the project's models, tokenizers and scheduler
config.

The folder is what ``DiffusionPipeline.save_pretrained`` writes: ``model_index.json`` naming each component's
class (``"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]``), and one sub-folder per component.
Two entry points choose the components; one loader (``_load_models``) checks every folder, then reads them:

- ``load_pipeline_folder`` (sampling): the classes follow ``model_index.json``, as diffusers'
  ``DiffusionPipeline.from_pretrained`` does; the tokenizers and the scheduler config come with the models.
- ``load_model_folders`` (``realisid convert``, training): the project config (``c.model.<name>``) decides,
  each sub-folder's ``config.json`` must describe that architecture, no ``model_index.json`` is needed.

Each class must be one the project implements (``models.factory.FROZEN``); model modules are imported only when
loaded. Stability single-file checkpoints are ``weights.single_file``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
from jax.sharding import Mesh

from realisid_jax.sharding import DEFAULT_RULES, Rules
from realisid_jax.folders import resolve_folder
from realisid_jax.loading.files import read_json
from realisid_jax.loading.pretrained import from_pretrained, read_config

if TYPE_CHECKING:
    import ml_collections
    from flax import nnx
    from transformers import CLIPTokenizer

    from realisid_jax.models.modeling_utils import ModelConfig

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
# Special-token ids are no part of the architecture: SD 1.5 / SDXL text encoders still carry transformers'
# pre-#24773 ids (bos 0, eos 2), read by CLIPTextModel as "pool at the largest id", the same position.
# A VAE's scaling / shift factors are measured on its trained weights (SD 1.5: 0.18215, SDXL: 0.13025, a glyph-world
# VAE its own): the folder's values are the weights' and are the ones loaded.
_NOT_ARCHITECTURE = ("pad_token_id", "bos_token_id", "eos_token_id", "scaling_factor", "shift_factor")


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
    from realisid_jax.models.registry import FROZEN

    classes = {cls.__name__: cls for cls, _ in FROZEN.values()}
    if class_name not in classes:
        raise UnsupportedComponentError(f"realisid-jax has no {class_name}; it implements {sorted(classes)}")
    return classes[class_name]


def load_pipeline_folder(folder: str | os.PathLike, *, dtype=jnp.float32, variant: str | None = None,
                         image_encoder: str | os.PathLike | None = None, attention_impl: str | None = "xla",
                         mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> PipelineComponents:
    """Loads a diffusers SD 1.5 / SDXL pipeline folder, the classes chosen by its ``model_index.json``.

    Args:
      folder: local pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
        ``tokenizer/``, ``scheduler/``, and for SDXL ``text_encoder_2/``, ``tokenizer_2/``).
      dtype: computation and parameter dtype of every model, float32 or bfloat16.
      variant: weights variant of every model (``"fp16"``: ``model.fp16.safetensors``); default the plain
        files, or each folder's only variant (``loading.files.find_weights``).
      image_encoder: optional separate ``CLIPVisionModelWithProjection`` or ``CLIPModel`` folder (IP-Adapter's
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
    from realisid_jax.text.tokenizer import load_tokenizer

    root = resolve_folder(folder)
    model_index = read_json(root / "model_index.json")
    classes = component_classes(model_index)
    if image_encoder is not None:
        classes["image_encoder"] = "CLIPVisionModelWithProjection"
    models = _load_models(_folders(root, classes, image_encoder), classes, "model_index.json lists", dtype=dtype,
                          variant=variant, attention_impl=attention_impl, mesh=mesh, rules=rules)
    tokenizers = {name: load_tokenizer(root, subfolder=name) for name in ("tokenizer", "tokenizer_2")
                  if name in classes}
    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
    return PipelineComponents(scheduler_config=scheduler_config, model_index=model_index, **models, **tokenizers)


def load_model_folders(folder: str | os.PathLike | None, config: ml_collections.ConfigDict, *,
                       components: Iterable[str] | None = None, image_encoder: str | os.PathLike | None = None,
                       variant: str | None = None, mesh: Mesh | None = None,
                       rules: Rules = DEFAULT_RULES) -> dict[str, nnx.Module]:
    """Loads the frozen models the project config describes, from diffusers / transformers folders.

    Args:
      folder: one sub-folder per component (``unet/``, ``vae/``, ``text_encoder/``, ... as in a pipeline folder;
        no ``model_index.json`` or tokenizers needed), or None when only ``image_encoder`` is loaded (a
        single-file base).
      config: project config: ``c.model.<name>`` is each architecture, which the sub-folder's ``config.json``
        must describe (special-token ids aside); ``dtype`` / ``param_dtype`` / ``attention_impl`` the dtypes.
      components: names to load, each required; default: every component the config describes whose folder
        exists.
      image_encoder: a separate ``CLIPVisionModelWithProjection`` or ``CLIPModel`` folder; it takes the place of
        ``folder/image_encoder/``.
      variant: weights variant (``"fp16"``), as ``load_pipeline_folder``.
      mesh, rules: when given, each parameter is placed directly on its logical-axis sharding.

    Returns:
      name -> model (``models.factory.FROZEN`` classes).

    Raises:
      HubIdError / FileNotFoundError: ``folder`` or ``image_encoder`` is not a local folder, or a requested
        component's sub-folder (named), ``config.json`` or weights are missing.
      ValueError: a requested component the config does not describe, or a ``config.json`` that differs from
        ``c.model.<name>`` (the differing keys are named). Folders and configs are checked before any weights
        are read.
      CheckpointMismatchError: a component's weights do not fit its config.
    """
    from realisid_jax.models.registry import FROZEN, dtypes

    folders = _folders(resolve_folder(folder) if folder is not None else None, FROZEN, image_encoder)
    described = [name for name in FROZEN if config.model.get(name) is not None]
    wanted = list(components) if components is not None else [
        name for name in described if name in folders and folders[name].is_dir()]
    undescribed = [name for name in wanted if name not in described]
    if undescribed:
        raise ValueError(f"the config describes no {undescribed} (c.model.<name> is None or absent); it describes "
                         f"{described}")
    classes = {name: FROZEN[name][0].__name__ for name in wanted}
    expected = {name: FROZEN[name][1].from_dict(dict(config.model[name])) for name in wanted}
    return _load_models(folders, classes, "the config describes", expected=expected, variant=variant, mesh=mesh,
                        rules=rules, **dtypes(config))


def _folders(root: Path | None, names: Iterable[str], image_encoder: str | os.PathLike | None) -> dict[str, Path]:
    """Component -> its folder: ``root/<name>``, the image encoder's from ``image_encoder`` when given."""
    folders = {name: root / name for name in names} if root is not None else {}
    if image_encoder is not None:
        folders["image_encoder"] = resolve_folder(image_encoder)
    return folders


def _load_models(folders: Mapping[str, Path], classes: Mapping[str, str], listed_by: str, *,
                 expected: Mapping[str, ModelConfig] | None = None, **kw) -> dict[str, nnx.Module]:
    """The one folder loader of both entry points: checks that each component of ``classes`` (name -> class
    name; tokenizers and scheduler only checked) has its folder and, for those in ``expected``, that the folder's
    ``config.json`` describes that architecture; only then reads each model with ``from_pretrained(**kw)``."""
    absent = [name for name in classes if name not in folders or not folders[name].is_dir()]
    if absent:
        raise FileNotFoundError(f"{', '.join(f'{folders.get(n, n)}/' for n in absent)} not found, although "
                                f"{listed_by} {', '.join(f'{n} ({classes[n]})' for n in absent)}")
    for name, model_config in (expected or {}).items():
        _check_config(folders[name], name, model_config, model_class(classes[name]))
    return {name: from_pretrained(model_class(cls), folders[name], **kw)
            for name, cls in classes.items() if name in _MODELS}


def _check_config(folder: Path, name: str, expected: ModelConfig, cls: type) -> None:
    theirs = type(expected).from_dict(read_config(cls, folder)).to_dict()
    ours = expected.to_dict()
    differ = [k for k in ours if k not in _NOT_ARCHITECTURE and theirs[k] != ours[k]]
    if differ:
        raise ValueError(f"{folder}/config.json differs from the config's model.{name}: "
                         + ", ".join(f"{k}: folder {theirs[k]!r}, config {ours[k]!r}" for k in differ)
                         + f"; pass the folder of that architecture or change the config (--config.model.{name}.*)")
