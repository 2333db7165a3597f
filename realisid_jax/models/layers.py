"""Shared layers: logically-partitioned Linear/Conv/norms, the one attention helper, diffusers' Attention.

Layout is channels-last everywhere (NHWC images, (B, L, C) tokens): XLA's native layout on TPU and GPU.
Parameter names follow flax (``kernel``, ``scale``, ``bias``, ``embedding``); ``weights.convert`` maps them
to PyTorch's (``weight``) with the transposes a state dict needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from realisid_jax.sharding import constrain

CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
TOKENS = ("activation_batch", "activation_length", "activation_embed")


def _partitioned(init, names):
    return nnx.with_partitioning(init, names)


def linear(in_features: int, out_features: int, names: tuple[str | None, str | None] = ("embed", "mlp"), *,
           rngs: nnx.Rngs, use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
           kernel_init=nnx.initializers.lecun_normal()) -> nnx.Linear:
    """``nnx.Linear`` whose kernel (in, out) carries logical axis ``names``. Mirrors ``torch.nn.Linear``."""
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=_partitioned(kernel_init, names), rngs=rngs)


def conv(in_features: int, out_features: int, kernel_size: int = 3, *, rngs: nnx.Rngs, stride: int = 1,
         padding: int | str | Sequence[tuple[int, int]] | None = None, use_bias: bool = True,
         dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=nnx.initializers.lecun_normal()) -> nnx.Conv:
    """NHWC ``nnx.Conv`` with an HWIO kernel on logical axes ``CONV_AXES``. Mirrors ``torch.nn.Conv2d``.

    ``padding`` is PyTorch's symmetric integer padding (default ``kernel_size // 2``) or flax's explicit
    per-side pairs.
    """
    if padding is None:
        padding = kernel_size // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nnx.Conv(in_features, out_features, (kernel_size, kernel_size), strides=stride, padding=padding,
                    use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=_partitioned(kernel_init, CONV_AXES), rngs=rngs)


def zero_conv(in_features: int, out_features: int, kernel_size: int = 1, **kwargs) -> nnx.Conv:
    """Zero-initialised conv (ControlNet's Z1 output / Z2, RealisID Eq. 2): a new branch starts as a no-op."""
    return conv(in_features, out_features, kernel_size, kernel_init=nnx.initializers.zeros_init(), **kwargs)


def group_norm(num_channels: int, num_groups: int, epsilon: float, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.GroupNorm:
    """``torch.nn.GroupNorm`` over the last (channel) axis, groups of contiguous channels as in PyTorch."""
    return nnx.GroupNorm(num_channels, num_groups=num_groups, epsilon=epsilon, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)


def layer_norm(num_features: int, epsilon: float = 1e-5, *, rngs: nnx.Rngs, use_bias: bool = True,
               use_scale: bool = True, dtype=jnp.float32, param_dtype=jnp.float32) -> nnx.LayerNorm:
    """``torch.nn.LayerNorm`` over the last axis."""
    return nnx.LayerNorm(num_features, epsilon=epsilon, use_bias=use_bias, use_scale=use_scale, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, heads: int, *, implementation: str | None = "xla",
              mask: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
    """Multi-head scaled dot-product attention; the project's only attention kernel entry point.

    Args:
      query: (B, Lq, heads * head_dim).
      key, value: (B, Lk, heads * head_dim).
      heads: number of heads.
      implementation: ``jax.nn.dot_product_attention``'s: ``"xla"`` (CPU/TPU), ``"cudnn"`` (GPU flash
        attention, bf16/fp16 only), or ``None`` (JAX picks).
      mask: optional boolean, broadcastable to (B, heads, Lq, Lk); True = attend.
      is_causal: causal mask (CLIP text encoder).

    Returns:
      (B, Lq, heads * head_dim), dtype of ``query``. Scale 1/sqrt(head_dim) as ``F.scaled_dot_product_attention``.
    """
    b, lq, inner = query.shape
    lk = key.shape[1]
    head_dim = inner // heads
    q = query.reshape(b, lq, heads, head_dim)
    k = key.reshape(b, lk, heads, head_dim)
    v = value.reshape(b, lk, heads, head_dim)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=implementation)
    return out.reshape(b, lq, inner)


class Attention(nnx.Module):
    """diffusers ``models.attention_processor.Attention`` (self- or cross-attention), tokens (B, L, C).

    Parameter tree as diffusers: ``to_q``, ``to_k``, ``to_v``, ``to_out[0]``, optional ``group_norm``
    (the VAE's mid-block attention, with ``residual_connection``).
    """

    def __init__(self, query_dim: int, *, cross_attention_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, bias: bool = False, out_bias: bool = True, norm_num_groups: int | None = None,
                 eps: float = 1e-5, residual_connection: bool = False, rescale_output_factor: float = 1.0,
                 attention_impl: str | None = "xla", rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.heads = heads
        self.attention_impl = attention_impl
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = group_norm(query_dim, norm_num_groups, eps, **kw) if norm_num_groups else None
        self.to_q = linear(query_dim, inner, ("embed", "heads"), use_bias=bias, **kw)
        self.to_k = linear(kv_dim, inner, ("embed", "heads"), use_bias=bias, **kw)
        self.to_v = linear(kv_dim, inner, ("embed", "heads"), use_bias=bias, **kw)
        self.to_out = nnx.List([linear(inner, query_dim, ("heads", "embed"), use_bias=out_bias, **kw)])

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        """hidden_states (B, L, query_dim); encoder_hidden_states (B, Lk, cross_attention_dim) or None."""
        residual = hidden_states
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = attention(self.to_q(hidden_states), self.to_k(context), self.to_v(context), self.heads,
                        implementation=self.attention_impl, mask=mask)
        out = constrain(self.to_out[0](out), TOKENS)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor


class GEGLU(nnx.Module):
    """diffusers ``GEGLU``: ``proj`` to 2x width, value * GELU(gate) (exact erf GELU, as ``F.gelu``)."""

    def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.proj = linear(dim_in, dim_out * 2, ("embed", "mlp"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """diffusers ``FeedForward`` with GEGLU: ``net[0]`` GEGLU, ``net[1]`` dropout, ``net[2]`` Linear."""

    def __init__(self, dim: int, *, mult: int = 4, dim_out: int | None = None, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        inner = dim * mult
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.net = nnx.List([GEGLU(dim, inner, **kw), nnx.Dropout(0.0),
                             linear(inner, dim_out or dim, ("mlp", "embed"), **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))
