"""The frozen base models of a training run, built from a config or loaded from diffusers/transformers folders.

Frozen: the UNet, the VAE, the text encoder(s) and the CLIP image encoder (paper, Training). They are
grouped in one NNX module, :class:`FrozenModels`, so that their whole state is one non-donated jit input.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from realisid_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from realisid_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from realisid_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from realisid_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from realisid_jax.sharding import Rules

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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


def dtypes(config: ml_collections.ConfigDict) -> dict:
    """``{"dtype", "param_dtype", "attention_impl"}`` keyword arguments of every model, from the config."""
    return dict(dtype=DTYPES[config.dtype], param_dtype=DTYPES[config.param_dtype],
                attention_impl=config.attention_impl)


def random_frozen_models(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> FrozenModels:
    """Randomly initialised frozen models of ``config.model`` (tests and smoke runs; call under
    ``nnx.eval_shape`` or a jit to get them born sharded)."""
    m, kw = config.model, dtypes(config)
    second = m.get("text_encoder_2")
    return FrozenModels(
        unet=UNet2DConditionModel(UNet2DConditionConfig.from_dict(dict(m.unet)), rngs=rngs, **kw),
        vae=AutoencoderKL(AutoencoderKLConfig.from_dict(dict(m.vae)), rngs=rngs, **kw),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(dict(m.text_encoder)), rngs=rngs, **kw),
        text_encoder_2=(None if second is None else
                        CLIPTextModelWithProjection(CLIPTextConfig.from_dict(dict(second)), rngs=rngs, **kw)),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(dict(m.image_encoder)), rngs=rngs,
                                                    **kw),
    )


def pretrained_frozen_models(config: ml_collections.ConfigDict, pretrained: Path, image_encoder: Path,
                             mesh: Mesh, rules: Rules) -> FrozenModels:
    """Loads a diffusers pipeline folder (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/`` when the
    config has one) and a transformers CLIP vision folder, each tensor placed straight onto its sharding.

    Raises:
      FileNotFoundError, CheckpointMismatchError: as ``PretrainedMixin.from_pretrained``.
    """
    kw = dict(dtypes(config), mesh=mesh, rules=rules)
    return FrozenModels(
        unet=UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **kw),
        vae=AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **kw),
        text_encoder=CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **kw),
        text_encoder_2=(None if config.model.get("text_encoder_2") is None else
                        CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder_2", **kw)),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(image_encoder, **kw),
    )
