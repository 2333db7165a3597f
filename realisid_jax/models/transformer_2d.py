"""The spatial transformer of the SD/SDXL UNet: ``BasicTransformerBlock`` and ``Transformer2DModel`` (NHWC).

Mirrors diffusers ``models/attention.py::BasicTransformerBlock`` (``norm_type="layer_norm"``, GEGLU
feed-forward) and ``models/transformers/transformer_2d.py::Transformer2DModel`` for continuous inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from realisid_jax.models.layer_scan import ScannedLayers, scan_layers
from realisid_jax.models.layers import TOKENS, Attention, FeedForward, conv, group_norm, layer_norm, linear
from realisid_jax.sharding import constrain


class BasicTransformerBlock(nnx.Module):
    """Pre-LN self-attention, cross-attention and GEGLU feed-forward, each with a residual.

    ``__call__(hidden_states (B, L, dim), encoder_hidden_states (B, Lk, cross_attention_dim) | None)`` ->
    (B, L, dim). Without ``cross_attention_dim`` there is no ``norm2``/``attn2`` (diffusers' layout).
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, *,
                 cross_attention_dim: int | None = None, norm_eps: float = 1e-5, attention_impl: str | None = "xla",
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        attn = dict(heads=num_attention_heads, dim_head=attention_head_dim, attention_impl=attention_impl, **kw)
        self.norm1 = layer_norm(dim, norm_eps, **kw)
        self.attn1 = Attention(dim, **attn)
        if cross_attention_dim is not None:
            self.norm2 = layer_norm(dim, norm_eps, **kw)
            self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **attn)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = layer_norm(dim, norm_eps, **kw)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array | None = None) -> jax.Array:
        hidden_states = hidden_states + self.attn1(self.norm1(hidden_states))
        if self.attn2 is not None:
            hidden_states = hidden_states + self.attn2(self.norm2(hidden_states), encoder_hidden_states)
        hidden_states = hidden_states + self.ff(self.norm3(hidden_states))
        return constrain(hidden_states, TOKENS)


class Transformer2DModel(ScannedLayers, nnx.Module):
    """GroupNorm -> ``proj_in`` -> ``transformer_blocks`` -> ``proj_out`` + residual, on an NHWC feature map.

    ``proj_in``/``proj_out`` are ``Linear`` on tokens when ``use_linear_projection`` (SDXL) and 1x1 convs on
    the map otherwise (SD1.5), as in diffusers (the two give different parameter shapes, so the checkpoint
    decides). ``__call__(x (B, H, W, in_channels), encoder_hidden_states (B, Lk, cross_attention_dim))`` ->
    (B, H, W, in_channels). With ``scan_layers`` (``layer_scan.set_scan_layers``) the ``transformer_blocks`` run
    as one ``lax.scan``.
    """

    def __init__(self, num_attention_heads: int, attention_head_dim: int, in_channels: int, *, num_layers: int = 1,
                 norm_num_groups: int = 32, cross_attention_dim: int | None = None,
                 use_linear_projection: bool = False, attention_impl: str | None = "xla", rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = group_norm(in_channels, norm_num_groups, 1e-6, **kw)
        if use_linear_projection:
            self.proj_in = linear(in_channels, inner, ("embed", "heads"), **kw)
            self.proj_out = linear(inner, in_channels, ("heads", "embed"), **kw)
        else:
            self.proj_in = conv(in_channels, inner, 1, **kw)
            self.proj_out = conv(inner, in_channels, 1, **kw)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim,
                                  cross_attention_dim=cross_attention_dim, attention_impl=attention_impl, **kw)
            for _ in range(num_layers)])

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array | None = None) -> jax.Array:
        b, h, w, _ = hidden_states.shape
        residual = hidden_states
        x = self.norm(hidden_states)
        if self.use_linear_projection:
            x = self.proj_in(x.reshape(b, h * w, -1))
        else:
            x = self.proj_in(x).reshape(b, h * w, -1)
        x = constrain(x, TOKENS)
        if self.scan_layers and len(self.transformer_blocks) > 1:
            x, _ = scan_layers(self.transformer_blocks, x, encoder_hidden_states)
        else:
            for block in self.transformer_blocks:
                x = block(x, encoder_hidden_states)
        if self.use_linear_projection:
            x = self.proj_out(x).reshape(b, h, w, -1)
        else:
            x = self.proj_out(x.reshape(b, h, w, -1))
        return x + residual
