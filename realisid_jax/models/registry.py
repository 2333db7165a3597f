"""The frozen base models a project config describes: name -> (model class, config class), and the dtype
keywords every model constructor takes. ``config.model.<name>`` holds the diffusers/transformers
``config.json`` keys of each; ``text_encoder_2`` is ``None`` for SD 1.5."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from realisid_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from realisid_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from realisid_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from realisid_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

FROZEN = {
    "unet": (UNet2DConditionModel, UNet2DConditionConfig),
    "vae": (AutoencoderKL, AutoencoderKLConfig),
    "text_encoder": (CLIPTextModel, CLIPTextConfig),
    "text_encoder_2": (CLIPTextModelWithProjection, CLIPTextConfig),
    "image_encoder": (CLIPVisionModelWithProjection, CLIPVisionConfig),
}


def dtypes(config, *, trainable: bool = False) -> dict[str, Any]:
    """Model constructor keywords from the config's ``dtype``, ``attention_impl`` and storage dtype: the
    trainable branches' ``param_dtype``, the frozen models' ``frozen_param_dtype``."""
    impl = config.attention_impl
    storage = config.param_dtype if trainable else config.frozen_param_dtype
    return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(storage),
                attention_impl=None if impl in (None, "None", "auto") else impl)


def frozen_configs(config) -> dict[str, tuple[type, Any]]:
    """name -> (class, config) of every frozen model ``config.model`` describes."""
    return {name: (cls, cfg_cls.from_dict(dict(config.model[name])))
            for name, (cls, cfg_cls) in FROZEN.items() if config.model.get(name) is not None}
