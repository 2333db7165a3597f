"""Every model of a RealisID system from one project config (``configs/*.py``): abstract or random.

``abstract_components`` builds each with ``nnx.eval_shape`` (parameter counts and shardings, no memory);
``random_components`` initialises them (tiny configs, tests and the embedded demo). Loading real weights
goes through each class's ``from_pretrained`` (``weights.pipeline_folder``).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from realisid_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from realisid_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from realisid_jax.models.realisid import RealisID, RealisIDConfig
from realisid_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from realisid_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

# name -> (class, config class); text_encoder_2 is absent for SD 1.5 (``model.text_encoder_2 = None``).
FROZEN = {
    "unet": (UNet2DConditionModel, UNet2DConditionConfig),
    "vae": (AutoencoderKL, AutoencoderKLConfig),
    "text_encoder": (CLIPTextModel, CLIPTextConfig),
    "text_encoder_2": (CLIPTextModelWithProjection, CLIPTextConfig),
    "image_encoder": (CLIPVisionModelWithProjection, CLIPVisionConfig),
}


def dtypes(config) -> dict[str, Any]:
    """Model constructor keywords from the config's ``dtype``, ``param_dtype`` and ``attention_impl``."""
    impl = config.attention_impl
    return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
                attention_impl=None if impl in (None, "None", "auto") else impl)


def _frozen_configs(config) -> dict[str, tuple[type, Any]]:
    return {name: (cls, cfg_cls.from_dict(dict(config.model[name])))
            for name, (cls, cfg_cls) in FROZEN.items() if config.model.get(name) is not None}


def abstract_components(config) -> dict[str, nnx.Module]:
    """Each frozen model and the trainable ``realisid`` branches with ``ShapeDtypeStruct`` parameters."""
    kw = dtypes(config)
    models = {name: cls.abstract(cfg, **kw) for name, (cls, cfg) in _frozen_configs(config).items()}
    models["realisid"] = RealisID.abstract(RealisIDConfig.from_config(config), **kw)
    return models


def random_components(config, seed: int = 0) -> dict[str, nnx.Module]:
    """Randomly initialised models; the branches initialised from the UNet (ControlNet ``from_unet``: zero
    Z1/Z2 convs, so fresh branches change nothing). For tiny configs: full-size models need real weights."""
    kw = dtypes(config)
    rngs = nnx.Rngs(seed)
    models = {name: cls(cfg, rngs=rngs, **kw) for name, (cls, cfg) in _frozen_configs(config).items()}
    models["realisid"] = RealisID.from_unet(models["unet"], RealisIDConfig.from_config(config), rngs=rngs)
    return models
