"""ResNet block and 2x re-sampling, shared by the UNet, the ControlNets and the VAE (NHWC).

Mirror diffusers ``models/resnet.py`` (``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from realisid_jax.models.layers import conv, group_norm, linear


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-Conv twice, with an optional time-embedding shift and a 1x1 shortcut.

    ``__call__(x, temb)``: x (B, H, W, in_channels), temb (B, temb_channels) or None -> (B, H, W, out_channels).
    Mirrors diffusers ``ResnetBlock2D`` with ``time_embedding_norm="default"``.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_channels: int | None = 512,
                 groups: int = 32, eps: float = 1e-6, output_scale_factor: float = 1.0, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        out_channels = out_channels or in_channels
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.output_scale_factor = output_scale_factor
        self.norm1 = group_norm(in_channels, groups, eps, **kw)
        self.conv1 = conv(in_channels, out_channels, 3, **kw)
        self.time_emb_proj = linear(temb_channels, out_channels, ("embed", "mlp"), **kw) if temb_channels else None
        self.norm2 = group_norm(out_channels, groups, eps, **kw)
        self.conv2 = conv(out_channels, out_channels, 3, **kw)
        self.conv_shortcut = conv(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (shortcut + h) / self.output_scale_factor


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv named ``conv``. ``padding=1`` (UNet) pads symmetrically; ``padding=0`` (VAE) pads
    one pixel at the bottom/right only, as diffusers does for the VAE encoder."""

    def __init__(self, channels: int, out_channels: int | None = None, *, padding: int = 1, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        pads = ((padding, padding),) * 2 if padding else ((0, 1), (0, 1))
        self.conv = conv(channels, out_channels or channels, 3, stride=2, padding=pads, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x up-sampling then a 3x3 conv named ``conv``; ``output_size`` (H, W) overrides 2x
    when the skip connection has an odd size (diffusers' ``upsample_size``)."""

    def __init__(self, channels: int, out_channels: int | None = None, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.conv = conv(channels, out_channels or channels, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        b, h, w, c = x.shape
        oh, ow = output_size or (2 * h, 2 * w)
        # Index-based nearest resize: matches F.interpolate(mode="nearest") for any integer or odd size.
        rows = (jnp.arange(oh) * h // oh)
        cols = (jnp.arange(ow) * w // ow)
        return self.conv(x[:, rows][:, :, cols])
