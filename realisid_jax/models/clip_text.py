"""CLIP text encoders: SD 1.5's and SDXL's first (``CLIPTextModel``), SDXL's second (``CLIPTextModelWithProjection``).

Mirrors transformers ``models/clip/modeling_clip.py`` (5.23). The module tree is the checkpoints' one,
``text_model.embeddings.token_embedding`` … ``text_model.final_layer_norm`` (+ ``text_projection``), so a
``text_encoder/`` or ``text_encoder_2/`` folder of a diffusers pipeline loads with ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from realisid_jax.models.clip_encoder import CLIPEncoder
from realisid_jax.models.layers import layer_norm, linear
from realisid_jax.models.modeling_utils import ModelConfig, PretrainedMixin

# Before transformers PR #24773 CLIP configs carried eos_token_id=2 (SD 1.5 and SDXL still do); such models pool
# at the largest token id, which is <|endoftext|> (49407) in the CLIP vocabulary.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(ModelConfig):
    """transformers ``CLIPTextConfig`` ``config.json`` keys the model uses, with transformers' defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407


@struct.dataclass
class CLIPTextOutput:
    """Outputs of the CLIP text encoders (a pytree: returned from ``jax.jit``).

    Attributes:
      last_hidden_state: (B, L, hidden_size), after ``final_layer_norm``.
      pooler_output: (B, hidden_size), ``last_hidden_state`` at each sequence's end-of-text token.
      hidden_states: ``num_hidden_layers + 1`` arrays (B, L, hidden_size): the embeddings, then each layer's
        output (no final norm), as transformers' ``output_hidden_states=True``. SDXL reads ``hidden_states[-2]``.
      text_embeds: (B, projection_dim), ``text_projection(pooler_output)``; ``None`` for ``CLIPTextModel``.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...]
    text_embeds: jax.Array | None = None


class CLIPTextEmbeddings(nnx.Module):
    """transformers ``CLIPTextEmbeddings``: token embedding plus learned absolute position embedding."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed"))
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, embedding_init=init)
        self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size, **kw)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[-1]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                             f"{self.position_embedding.num_embeddings}")
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))[None]


class CLIPTextTransformer(nnx.Module):
    """The text tower (transformers 4's ``CLIPTextTransformer``, 5's inner ``CLIPTextModel``): causal encoder,
    final LayerNorm, end-of-text pooling."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = "xla"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.eos_token_id = config.eos_token_id
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, attention_impl=attention_impl, **kw)
        self.final_layer_norm = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        """See ``CLIPTextModel.__call__``."""
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        hidden_states = self.encoder(self.embeddings(input_ids), mask=mask, is_causal=True)
        last = self.final_layer_norm(hidden_states[-1])
        return CLIPTextOutput(last_hidden_state=last, pooler_output=self.pool(last, input_ids),
                              hidden_states=hidden_states)

    def pool(self, last_hidden_state: jax.Array, input_ids: jax.Array) -> jax.Array:
        """(B, L, C) -> (B, C) at the end-of-text position, transformers 5.23's rule: the first
        ``eos_token_id`` in each row (position 0 if there is none), or the largest id when
        ``eos_token_id == 2`` (legacy configs)."""
        if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
            position = jnp.argmax(input_ids, axis=-1)
        else:
            position = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        return jnp.take_along_axis(last_hidden_state, position[:, None, None], axis=1)[:, 0]


class _CLIPTextBase(PretrainedMixin):
    weights_names: ClassVar[tuple[str, ...]] = ("model.safetensors", "pytorch_model.bin")
    # Older transformers saved the position_ids buffer.
    ignore_keys: ClassVar[tuple[str, ...]] = (r"text_model\.embeddings\.position_ids",)
    config_class = CLIPTextConfig


class CLIPTextModel(nnx.Module, _CLIPTextBase):
    """transformers ``CLIPTextModel``: CLIP ViT-L/14's text tower for SD 1.5 and SDXL's first text encoder.

    Loads both on-disk layouts: ``text_model.``-prefixed keys (transformers 4, every SD/SDXL checkpoint) and the
    unprefixed keys transformers 5 writes.
    """

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = "xla"):
        self.config = config
        self.text_model = CLIPTextTransformer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                              attention_impl=attention_impl)

    @classmethod
    def rename_checkpoint(cls, state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()}

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        """Encodes token ids.

        Args:
          input_ids: (B, L) integer token ids, L <= ``max_position_embeddings`` (77), e.g. from
            ``realisid_jax.text.tokenizer.tokenize``.
          attention_mask: optional (B, L), 1 = real token, 0 = padding; combined with the causal mask. A row
            whose first token is padding has no key to attend to (transformers' output is undefined there too).

        Returns:
          ``CLIPTextOutput`` with ``text_embeds=None``; float arrays of the computation dtype.

        Raises:
          ValueError: L > ``max_position_embeddings``.
        """
        return self.text_model(input_ids, attention_mask)


class CLIPTextModelWithProjection(nnx.Module, _CLIPTextBase):
    """transformers ``CLIPTextModelWithProjection``: SDXL's second text encoder (OpenCLIP ViT-bigG/14), whose
    ``text_embeds`` are SDXL's pooled prompt embedding."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = "xla"):
        self.config = config
        self.text_model = CLIPTextTransformer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                              attention_impl=attention_impl)
        self.text_projection = linear(config.hidden_size, config.projection_dim, ("embed", "mlp"), use_bias=False,
                                      rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        """As ``CLIPTextModel.__call__``, plus ``text_embeds`` (B, projection_dim)."""
        out = self.text_model(input_ids, attention_mask)
        return out.replace(text_embeds=self.text_projection(out.pooler_output))

