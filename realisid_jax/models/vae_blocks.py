"""The VAE's encoder/decoder stages and mid block (NHWC), mirroring diffusers ``models/unets/unet_2d_blocks.py``.

Each block takes and returns (B, H, W, C) feature maps; activations are constrained to ``IMAGE_AXES`` at block
boundaries, the points where a sharded decoder at 1024² would otherwise let XLA pick a layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from realisid_jax.models.layers import Attention
from realisid_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from realisid_jax.sharding import constrain

# Height shares the token axis name: the mid-block attention flattens H-major, so a height split is a
# contiguous split of its tokens.
IMAGE_AXES = ("activation_batch", "activation_length", None, "activation_embed")

# diffusers' VAE blocks use eps=1e-6 in every GroupNorm (resnets, attention, conv_norm_out).
VAE_EPS = 1e-6


class DownEncoderBlock2D(nnx.Module):
    """``num_layers`` ResnetBlock2D (no time embedding) then, unless final, a stride-2 ``downsamplers[0]`` with
    the VAE's bottom/right padding. (B, H, W, in) -> (B, H/2, W/2, out), or (B, H, W, out) without down-sampling.

    Mirrors diffusers ``DownEncoderBlock2D`` (``downsample_padding=0``).
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, add_downsample: bool,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups,
                          eps=VAE_EPS, **kw)
            for i in range(num_layers)])
        self.downsamplers = nnx.List([Downsample2D(out_channels, padding=0, **kw)]) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return constrain(x, IMAGE_AXES)


class UpDecoderBlock2D(nnx.Module):
    """``num_layers`` ResnetBlock2D then, unless final, a nearest-2x ``upsamplers[0]``.
    (B, H, W, in) -> (B, 2H, 2W, out), or (B, H, W, out) without up-sampling.

    Mirrors diffusers ``UpDecoderBlock2D`` (``resnet_time_scale_shift="default"``, no time embedding).
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int, add_upsample: bool,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups,
                          eps=VAE_EPS, **kw)
            for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = constrain(resnet(x), IMAGE_AXES)
        if self.upsamplers is not None:
            x = constrain(self.upsamplers[0](x), IMAGE_AXES)
        return x


class UNetMidBlock2D(nnx.Module):
    """ResnetBlock2D, then ``num_layers`` x (self-attention over the H*W tokens, ResnetBlock2D); (B, H, W, C) ->
    same shape.

    The attention is diffusers' VAE attention: its own GroupNorm, biased q/k/v, a residual connection, and
    ``channels // attention_head_dim`` heads (one head for the SD/SDXL VAE, whose head dim is the width).
    ``add_attention=False`` (``mid_block_add_attention``) keeps only the resnets. Mirrors diffusers
    ``UNetMidBlock2D`` with ``temb_channels=None`` and ``resnet_time_scale_shift="default"``.
    """

    def __init__(self, channels: int, *, groups: int, attention_head_dim: int, add_attention: bool = True,
                 num_layers: int = 1, attention_impl: str | None = "xla", rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=VAE_EPS,
                                               **kw) for _ in range(num_layers + 1)])
        self.attentions = nnx.List([
            Attention(channels, heads=channels // attention_head_dim, dim_head=attention_head_dim, bias=True,
                      norm_num_groups=groups, eps=VAE_EPS, residual_connection=True, attention_impl=attention_impl,
                      **kw)
            for _ in range(num_layers)]) if add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain(self.resnets[0](x), IMAGE_AXES)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                b, h, w, c = x.shape
                x = self.attentions[i](x.reshape(b, h * w, c)).reshape(b, h, w, c)
            x = constrain(resnet(x), IMAGE_AXES)
        return x
