"""CLIP image encoder (``CLIPVisionModelWithProjection``): RealisID's ID-embedding backbone (OpenCLIP ViT-H/14).

Mirrors transformers ``models/clip/modeling_clip.py`` (5.23) with the checkpoints' module tree,
``vision_model.embeddings.{class_embedding, patch_embedding, position_embedding}``, ``vision_model.pre_layrnorm``
(transformers' spelling), ``vision_model.encoder``, ``vision_model.post_layernorm``, ``visual_projection``, so an
IP-Adapter ``image_encoder/`` folder loads with ``from_pretrained``. Images are NHWC.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, struct

from realisid_jax.models.clip_encoder import CLIPEncoder
from realisid_jax.models.layers import conv, layer_norm, linear
from realisid_jax.models.modeling_utils import ModelConfig, PretrainedMixin


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(ModelConfig):
    """transformers ``CLIPVisionConfig`` ``config.json`` keys the model uses, with transformers' defaults."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_positions(self) -> int:
        """Patches plus the class token: 257 for ViT-H/14 at 224 px."""
        return (self.image_size // self.patch_size) ** 2 + 1


@struct.dataclass
class CLIPVisionOutput:
    """Outputs of ``CLIPVisionModelWithProjection`` (a pytree: returned from ``jax.jit``).

    Attributes:
      image_embeds: (B, projection_dim), ``visual_projection(pooler_output)``.
      last_hidden_state: (B, num_positions, hidden_size), the last layer's output (no final norm).
      pooler_output: (B, hidden_size), ``post_layernorm`` of the class token of ``last_hidden_state``.
      hidden_states: ``num_hidden_layers + 1`` arrays (B, num_positions, hidden_size): the ``pre_layrnorm``-ed
        embeddings, then each layer's output. ``hidden_states[-2]`` (257 x 1280 for ViT-H/14) is the input of
        RealisID's ID projection, as IP-Adapter-plus.
    """

    image_embeds: jax.Array
    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...]


class CLIPVisionEmbeddings(nnx.Module):
    """transformers ``CLIPVisionEmbeddings``: non-overlapping patch conv (no bias), a prepended class token,
    learned absolute position embedding (no interpolation: the input must be ``image_size`` square)."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.image_size = config.image_size
        self.dtype = dtype
        init = nnx.with_partitioning(nnx.initializers.normal(config.hidden_size ** -0.5), ("embed",))
        self.class_embedding = nnx.Param(init(rngs.params(), (config.hidden_size,), param_dtype))
        self.patch_embedding = conv(config.num_channels, config.hidden_size, config.patch_size, rngs=rngs,
                                    stride=config.patch_size, padding=0, use_bias=False, dtype=dtype,
                                    param_dtype=param_dtype)
        self.position_embedding = nnx.Embed(
            config.num_positions, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        b, h, w, _ = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"input image size ({h}*{w}) doesn't match model ({self.image_size}*{self.image_size})")
        patches = self.patch_embedding(pixel_values.astype(self.dtype))
        patches = patches.reshape(b, -1, patches.shape[-1])  # row-major over the grid, as torch's flatten(2)
        cls = jnp.broadcast_to(self.class_embedding.get_value().astype(self.dtype), (b, 1, patches.shape[-1]))
        tokens = jnp.concatenate([cls, patches], axis=1)
        return tokens + self.position_embedding(jnp.arange(tokens.shape[1]))[None]


class CLIPVisionTransformer(nnx.Module):
    """The vision tower (transformers ``CLIPVisionModel``): embeddings, ``pre_layrnorm``, encoder,
    ``post_layernorm`` on the class token."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = "xla"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = CLIPVisionEmbeddings(config, **kw)
        self.pre_layrnorm = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)
        self.encoder = CLIPEncoder(config, attention_impl=attention_impl, **kw)
        self.post_layernorm = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """pixel_values (B, H, W, C) -> (pooler_output (B, hidden), hidden_states as ``CLIPVisionOutput``)."""
        hidden_states = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return self.post_layernorm(hidden_states[-1][:, 0]), hidden_states


class CLIPVisionModelWithProjection(nnx.Module, PretrainedMixin):
    """transformers ``CLIPVisionModelWithProjection``: ``vision_model`` + ``visual_projection`` (no bias)."""

    config_class = CLIPVisionConfig
    weights_names: ClassVar[tuple[str, ...]] = ("model.safetensors", "pytorch_model.bin")
    # Older transformers saved the position_ids buffer.
    ignore_keys: ClassVar[tuple[str, ...]] = (r"vision_model\.embeddings\.position_ids",)

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = "xla"):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                                  attention_impl=attention_impl)
        self.visual_projection = linear(config.hidden_size, config.projection_dim, ("embed", "mlp"),
                                        use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        """Encodes images.

        Args:
          pixel_values: (B, image_size, image_size, num_channels) float, normalised as ``CLIPImageProcessor``
            does (RGB in [0, 1], minus CLIP's mean, divided by its std; roughly [-1.8, 2.2]).

        Returns:
          ``CLIPVisionOutput``, float arrays of the computation dtype.

        Raises:
          ValueError: the spatial size is not ``image_size`` x ``image_size``.
        """
        pooled, hidden_states = self.vision_model(pixel_values)
        return CLIPVisionOutput(image_embeds=self.visual_projection(pooled), last_hidden_state=hidden_states[-1],
                                pooler_output=pooled, hidden_states=hidden_states)
