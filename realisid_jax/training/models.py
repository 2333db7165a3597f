"""The models of a training run: the frozen base (one NNX module) and RealisID's branches.

Frozen: the UNet, the VAE, the text encoder(s) and the CLIP image encoder (paper, Training). They are grouped
in :class:`FrozenModels` so that their whole state is one non-donated jit input. Random weights come from the
shared factory (``realisid_jax.models.factory``); real ones from diffusers/transformers folders.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from realisid_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from realisid_jax.models.clip_vision import CLIPVisionModelWithProjection
from realisid_jax.models.factory import FROZEN, dtypes, random_components
from realisid_jax.models.realisid import RealisID
from realisid_jax.models.unet_2d_condition import UNet2DConditionModel
from realisid_jax.models.vae import AutoencoderKL
from realisid_jax.sharding import Rules


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


def random_models(config: ml_collections.ConfigDict, seed: int) -> tuple[FrozenModels, RealisID]:
    """Random frozen models and the branches initialised from their UNet (tests, smoke runs). Call under
    ``nnx.eval_shape`` or a jit with ``out_shardings`` to get them abstract or born sharded."""
    models = random_components(config, seed)
    return FrozenModels(**{name: models.get(name) for name in FROZEN}), models["realisid"]


def pretrained_frozen_models(config: ml_collections.ConfigDict, pretrained: Path, image_encoder: Path,
                             mesh: Mesh, rules: Rules) -> FrozenModels:
    """Loads a diffusers pipeline folder (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/`` when the
    config has one) and a transformers CLIP vision folder, each tensor placed straight onto its sharding.

    Raises:
      FileNotFoundError, CheckpointMismatchError: as ``PretrainedMixin.from_pretrained``.
    """
    kw = dict(dtypes(config), mesh=mesh, rules=rules)
    models = {name: cls.from_pretrained(pretrained, subfolder=name, **kw)
              for name, (cls, _) in FROZEN.items()
              if name != "image_encoder" and config.model.get(name) is not None}
    return FrozenModels(**{name: models.get(name) for name in FROZEN if name != "image_encoder"},
                        image_encoder=CLIPVisionModelWithProjection.from_pretrained(image_encoder, **kw))
