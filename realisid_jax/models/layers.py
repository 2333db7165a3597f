"""Shared layers: logically-partitioned Linear/Conv/norms, the one attention helper, diffusers' Attention.

Layout is channels-last everywhere (NHWC images, (B, L, C) tokens): XLA's native layout on TPU and GPU.
Parameter names follow flax (``kernel``, ``scale``, ``bias``, ``embedding``); ``weights.convert`` maps them
to PyTorch's (``weight``) with the transposes a state dict needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from realisid_jax.models import splash
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


# XLA:CPU runs k x k convolutions on small maps (the 1280-channel 4x4 / 8x8 levels of the SD UNet) at a third
# of its matmul speed; as one (pixels, k*k*C_in) x (k*k*C_in, C_out) matmul they ran 2-3x faster here, and no
# slower up to 16x16 (docs/benchmarks.md). The patch matrix is k*k times the input, so larger maps keep the conv.
_IM2COL_MAX_PIXELS = 16 * 16
CONV_IMPLS = ("xla", "im2col")


def set_conv_impl(model: nnx.Module, impl: str) -> None:
    """Selects every ``nnx.Conv`` of ``model``'s convolution: ``"xla"`` (``jax.lax.conv_general_dilated``, TPU
    and GPU) or ``"im2col"`` (``im2col_conv_general_dilated``, faster on XLA:CPU; same maths). The config's
    ``conv_impl``; a static attribute, so it is part of the graph definition a jit traces. Keeps each conv's
    ``set_weight_gathering`` choice.

    Raises:
      ValueError: ``impl`` is none of ``CONV_IMPLS``.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    function = im2col_conv_general_dilated if impl == "im2col" else jax.lax.conv_general_dilated
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Conv):
            gathered = isinstance(module.conv_general_dilated, GatheredKernel)
            module.conv_general_dilated = GatheredKernel(function) if gathered else function


@dataclasses.dataclass(frozen=True)
class GatheredKernel:
    """A ``lax.conv_general_dilated`` / ``lax.dot_general`` whose kernel (``rhs``, already in the compute dtype)
    is constrained to be whole on every device before use: under FSDP an all-gather of one layer's weights just
    before that layer, and a reduce-scatter of their gradient after it (ZeRO-3, maxtext's FSDP).

    Left to itself, the SPMD partitioner may keep a kernel sharded over its output channels and move the
    activations instead (all-gathers of the batch, channel-sharded maps). At SDXL's widths its choices give the
    lower peak and fewer FLOPs per chip; at tiny widths each activation shard of a few channels is padded to
    the TPU's 128 lanes and the peak per chip grows with the chips, which this prevents (docs/training.md,
    ``bench/fsdp_peak.py``). The identity without an active mesh.
    """

    op: Callable

    def __call__(self, lhs, rhs, *args, **kwargs):
        return self.op(lhs, constrain(rhs, (None,) * rhs.ndim), *args, **kwargs)


def set_weight_gathering(model: nnx.Module, gather: bool) -> None:
    """Wraps (``gather``) or unwraps every ``nnx.Conv`` and ``nnx.Linear`` kernel op of ``model`` in
    ``GatheredKernel``: the config's ``mesh.gather_weights``. Same values either way; a static attribute, so
    call it before ``nnx.split`` / jit."""
    for _, module in nnx.iter_modules(model):
        if not isinstance(module, nnx.Conv | nnx.Linear):
            continue
        name = "conv_general_dilated" if isinstance(module, nnx.Conv) else "dot_general"
        op = getattr(module, name)
        op = op.op if isinstance(op, GatheredKernel) else op
        setattr(module, name, GatheredKernel(op) if gather else op)


def im2col_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                                dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``jax.lax.conv_general_dilated`` with NHWC/HWIO convs of small maps as one im2col matmul (same maths);
    every other convolution unchanged."""
    kh, kw = rhs.shape[:2]
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    dilations = (*(lhs_dilation or (1, 1)), *(rhs_dilation or (1, 1)))
    if (lhs.ndim != 4 or kh * kw == 1 or isinstance(padding, str)
            or lhs.shape[1] * lhs.shape[2] > _IM2COL_MAX_PIXELS or feature_group_count != 1
            or any(d != 1 for d in dilations) or dimension_numbers != nhwc
            or kwargs.get("out_sharding") is not None):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision, **kwargs)
    (top, bottom), (left, right) = padding
    sh, sw = window_strides
    x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    patches = jnp.concatenate([x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
                               for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.einsum("nhwk,ko->nhwo", patches, rhs.reshape(kh * kw * rhs.shape[2], rhs.shape[3]),
                      precision=precision, preferred_element_type=kwargs.get("preferred_element_type"))


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
      implementation: the config's ``attention_impl``: ``jax.nn.dot_product_attention``'s ``"xla"`` (TPU,
        CPU), ``"cudnn"`` (GPU flash attention, bf16/fp16 only) or ``None`` (JAX picks); ``"splash"``, the TPU
        Pallas flash kernel (``models.splash``) where it pays, XLA elsewhere (masked, causal or fewer than
        ``splash.MIN_KEYS`` keys); or ``"chunked"``, XLA attention over blocks of queries where the logits are
        large (faster on XLA:CPU; same maths).
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
    if implementation == "splash":
        if splash.applies(lk, mask, is_causal):
            return splash.splash_attention(q, k, v).reshape(b, lq, inner)
        implementation = "xla"
    if implementation == "chunked":
        if mask is None and not is_causal and lq * lk >= _CHUNK_MIN_LOGITS:
            return _query_chunked_attention(q, k, v).reshape(b, lq, inner)
        implementation = "xla"
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=implementation)
    return out.reshape(b, lq, inner)


# XLA:CPU: full (B, heads, Lq, Lk) logits of the UNet's self-attention (e.g. 8 x 1024 x 1024 float32 = 32 MiB)
# leave the caches between the max, exp, sum and second matmul passes; blocks of queries whose logits fit in
# ~4 MiB ran the 32x32-latent self-attention 3x faster here (docs/benchmarks.md). Exact same maths.
_CHUNK_MIN_LOGITS = 512 * 512
_CHUNK_LOGITS_BYTES = 4 * 2**20


def _query_chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention over blocks of queries (``lax.map``), (B, L, heads, head_dim) in and out."""
    b, lq, heads, d = q.shape
    lk = k.shape[1]
    rows = max(1, _CHUNK_LOGITS_BYTES // (4 * b * heads * lk))
    block = max(n for n in range(1, min(rows, lq) + 1) if lq % n == 0)
    scale = jnp.asarray(d ** -0.5, q.dtype)
    # (B*heads, ...) layouts make both matmuls plain batched GEMMs without per-block transposes.
    qt = jnp.transpose(q * scale, (0, 2, 1, 3)).reshape(b * heads, lq // block, block, d)
    kt = jnp.transpose(k, (0, 2, 3, 1)).reshape(b * heads, d, lk)
    vt = jnp.transpose(v, (0, 2, 1, 3)).reshape(b * heads, lk, d)

    def one_block(qb):
        logits = jnp.einsum("xqd,xdk->xqk", qb, kt, preferred_element_type=jnp.float32)
        weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
        out = jnp.einsum("xqk,xkd->xqd", weights.astype(v.dtype), vt, preferred_element_type=jnp.float32)
        return (out / jnp.sum(weights, axis=-1, keepdims=True)).astype(q.dtype)

    out = jax.lax.map(one_block, jnp.moveaxis(qt, 1, 0))  # (blocks, B*heads, block, d)
    return jnp.transpose(out.reshape(lq // block, b, heads, block, d), (1, 0, 3, 2, 4)).reshape(b, lq, heads, d)


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
