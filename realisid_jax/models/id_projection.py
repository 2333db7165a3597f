"""RealisID's trainable ID projection: CLIP-vision penultimate tokens -> p_id, the ControlNets' context.

The IP-Adapter-plus Resampler (a Perceiver resampler): ``num_queries`` learned latents cross-attend to the
image tokens (concatenated with themselves) through ``depth`` blocks. Mirrors diffusers
``models/embeddings.py::IPAdapterPlusImageProjection`` (module tree ``latents``, ``proj_in``, ``layers[i]``
with ``ln0``, ``ln1``, ``attn``, ``ff``; ``proj_out``, ``norm_out``), so its ``state_dict()`` loads by a
mechanical rename.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from realisid_jax.models.layers import TOKENS, Attention, layer_norm, linear
from realisid_jax.models.modeling_utils import ModelConfig, PretrainedMixin
from realisid_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class IDProjectionConfig(ModelConfig):
    """``IPAdapterPlusImageProjection``'s init kwargs (diffusers defaults, except ``num_queries`` = 16,
    RealisID's 16 ID tokens); configs' ``c.model.id_projection``."""

    embed_dims: int = 768
    output_dims: int = 1024
    hidden_dims: int = 1280
    depth: int = 4
    dim_head: int = 64
    heads: int = 16
    num_queries: int = 16
    ffn_ratio: float = 4


class GELUProjection(nnx.Module):
    """diffusers ``activations.GELU``: ``proj`` then exact (erf) GELU."""

    def __init__(self, dim_in: int, dim_out: int, *, use_bias: bool, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.proj = linear(dim_in, dim_out, ("embed", "mlp"), use_bias=use_bias, rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.proj(x), approximate=False)


class GELUFeedForward(nnx.Module):
    """diffusers ``FeedForward(dim, dim, activation_fn="gelu", mult, bias=False)``: ``net[0]`` GELU,
    ``net[1]`` dropout (identity at p = 0), ``net[2]`` Linear."""

    def __init__(self, dim: int, mult: float, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        inner = int(dim * mult)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.net = nnx.List([GELUProjection(dim, inner, use_bias=False, **kw), nnx.Dropout(0.0),
                             linear(inner, dim, ("mlp", "embed"), use_bias=False, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class IDProjectionBlock(nnx.Module):
    """diffusers ``IPAdapterPlusImageProjectionBlock``: latents attend to [LN0(x); LN1(latents)], then a
    pre-LN GELU MLP (``ff[0]`` LayerNorm, ``ff[1]`` FeedForward), both residual."""

    def __init__(self, embed_dims: int, dim_head: int, heads: int, ffn_ratio: float, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32, attention_impl: str | None = "xla"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ln0 = layer_norm(embed_dims, **kw)
        self.ln1 = layer_norm(embed_dims, **kw)
        self.attn = Attention(embed_dims, heads=heads, dim_head=dim_head, out_bias=False,
                              attention_impl=attention_impl, **kw)
        self.ff = nnx.List([layer_norm(embed_dims, **kw), GELUFeedForward(embed_dims, ffn_ratio, **kw)])

    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        """x (B, L, C) projected image tokens; latents (B, Q, C) -> (B, Q, C)."""
        residual = latents
        latents = self.ln1(latents)
        context = jnp.concatenate([self.ln0(x), latents], axis=1)
        latents = self.attn(latents, context) + residual
        return self.ff[1](self.ff[0](latents)) + latents


class IDProjection(PretrainedMixin, nnx.Module):
    """p_id projection (IP-Adapter-plus Resampler). Mirrors diffusers ``IPAdapterPlusImageProjection``.

    Call: ``image_hidden_states`` (B, L, embed_dims) float — the CLIP vision encoder's penultimate hidden
    states (ViT-H/14: L = 257, 1280 channels) — -> (B, num_queries, output_dims), layer-normalised tokens.
    """

    config_class = IDProjectionConfig

    def __init__(self, config: IDProjectionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = "xla"):
        c = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.dtype = dtype
        init = nnx.with_partitioning(nnx.initializers.normal(c.hidden_dims ** -0.5), (None, None, "embed"))
        self.latents = nnx.Param(init(rngs.params(), (1, c.num_queries, c.hidden_dims), param_dtype))
        self.proj_in = linear(c.embed_dims, c.hidden_dims, ("embed", "mlp"), **kw)
        self.proj_out = linear(c.hidden_dims, c.output_dims, ("mlp", "embed"), **kw)
        self.norm_out = layer_norm(c.output_dims, **kw)
        self.layers = nnx.List([IDProjectionBlock(c.hidden_dims, c.dim_head, c.heads, c.ffn_ratio,
                                                  attention_impl=attention_impl, **kw) for _ in range(c.depth)])

    def __call__(self, image_hidden_states: jax.Array) -> jax.Array:
        x = constrain(self.proj_in(image_hidden_states), TOKENS)
        latents = jnp.broadcast_to(self.latents[...].astype(self.dtype),
                                   (x.shape[0], *self.latents.shape[1:]))
        for block in self.layers:
            latents = constrain(block(x, latents), TOKENS)
        return self.norm_out(self.proj_out(latents))
