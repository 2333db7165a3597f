"""The frozen base models of a training run, as one NNX module.

Frozen: the UNet, the VAE, the text encoder(s) and the CLIP image encoder (paper, Training). They are grouped
in :class:`FrozenModels` so that their whole state is one non-donated jit input. Classes and config sections
come from the shared factory (``realisid_jax.models.factory.FROZEN``); real weights from diffusers /
transformers folders.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from realisid_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from realisid_jax.models.clip_vision import CLIPVisionModelWithProjection
from realisid_jax.models.factory import FROZEN, dtypes
from realisid_jax.models.unet_2d_condition import UNet2DConditionModel
from realisid_jax.models.vae import AutoencoderKL
from realisid_jax.sharding import Rules
from realisid_jax.weights.pipeline_folder import load_model_folders


class FrozenModels(nnx.Module):
    """The frozen part of RealisID: ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2`` (SDXL; ``None`` for
    SD 1.5) and ``image_encoder`` (CLIP ViT, its penultimate hidden layer feeds the ID projection)."""

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 text_encoder_2: CLIPTextModelWithProjection | None, image_encoder: CLIPVisionModelWithProjection):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.image_encoder = image_encoder


def random_frozen_models(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> FrozenModels:
    """Randomly initialised frozen models of ``config.model`` (tests, smoke runs). Traceable: call it under
    ``nnx.eval_shape`` or a jit with ``out_shardings`` to get them abstract or born sharded."""
    kw = dtypes(config)
    models = {name: cls(config_class.from_dict(dict(config.model[name])), rngs=rngs, **kw)
              for name, (cls, config_class) in FROZEN.items() if config.model.get(name) is not None}
    return FrozenModels(**{name: models.get(name) for name in FROZEN})


def pretrained_frozen_models(config: ml_collections.ConfigDict, pretrained: Path, image_encoder: Path,
                             mesh: Mesh, rules: Rules) -> FrozenModels:
    """Loads every frozen model the config describes: ``unet/``, ``vae/``, ``text_encoder/`` (and
    ``text_encoder_2/``) of the diffusers pipeline folder ``pretrained`` and the transformers CLIP vision folder
    ``image_encoder``, each tensor placed straight onto its sharding (``pipeline_folder.load_model_folders``).

    Raises:
      FileNotFoundError, ValueError, CheckpointMismatchError: as ``load_model_folders`` (a missing sub-folder, a
      ``config.json`` that describes another architecture than ``config.model``, weights that do not fit).
    """
    described = [name for name in FROZEN if config.model.get(name) is not None]
    models = load_model_folders(pretrained, config, components=described, image_encoder=image_encoder, mesh=mesh,
                                rules=rules)
    return FrozenModels(**{name: models.get(name) for name in FROZEN})
