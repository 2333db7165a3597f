"""Down, mid and up blocks of the SD/SDXL UNet (NHWC), and the ``get_down_block``/``get_up_block`` factory.

Mirrors diffusers ``models/unets/unet_2d_blocks.py``: ``DownBlock2D``, ``CrossAttnDownBlock2D``,
``UNetMidBlock2DCrossAttn``, ``UpBlock2D``, ``CrossAttnUpBlock2D`` (``resnet_time_scale_shift="default"``,
no dual cross-attention, no FreeU). Every block takes the same positional arguments, so the UNet loops over
blocks (and wraps them in ``nnx.remat``) without asking which kind each one is:

* down: ``(hidden_states, temb, encoder_hidden_states) -> (hidden_states, skips)``
* mid: ``(hidden_states, temb, encoder_hidden_states) -> hidden_states``
* up: ``(hidden_states, skips, temb, encoder_hidden_states, upsample_size=None) -> hidden_states``
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from realisid_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from realisid_jax.models.transformer_2d import Transformer2DModel
from realisid_jax.sharding import constrain

FEATURE_MAP = ("activation_batch", None, None, "activation_embed")

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")


def _per_layer(value: int | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """A block's ``transformer_layers_per_block``: one int for all layers, or one per layer."""
    if isinstance(value, int):
        return (value,) * num_layers
    if len(value) != num_layers:
        raise ValueError(f"transformer_layers_per_block {tuple(value)} needs {num_layers} entries")
    return tuple(value)


def _attentions(num_layers: int, channels: int, *, num_attention_heads: int, transformer_layers_per_block,
                cross_attention_dim: int, resnet_groups: int, use_linear_projection: bool, attention_impl, **kw):
    layers = _per_layer(transformer_layers_per_block, num_layers)
    return nnx.List([
        Transformer2DModel(num_attention_heads, channels // num_attention_heads, channels, num_layers=n,
                           norm_num_groups=resnet_groups, cross_attention_dim=cross_attention_dim,
                           use_linear_projection=use_linear_projection, attention_impl=attention_impl, **kw)
        for n in layers])


class DownBlock2D(nnx.Module):
    """``resnets`` then an optional stride-2 ``downsamplers[0]``; every output is a skip for the up path.

    ``__call__(x (B, H, W, in_channels), temb (B, T), encoder_hidden_states=None)`` ->
    ``(y (B, H', W', out_channels), skips)`` with one skip per resnet plus one after down-sampling.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_groups: int = 32, add_downsample: bool = True,
                 downsample_padding: int = 1, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=temb_channels,
                          groups=resnet_groups, eps=resnet_eps, **kw) for i in range(num_layers)])
        self.downsamplers = (nnx.List([Downsample2D(out_channels, out_channels, padding=downsample_padding, **kw)])
                             if add_downsample else None)

    def __call__(self, hidden_states: jax.Array, temb: jax.Array, encoder_hidden_states: jax.Array | None = None):
        skips = ()
        for resnet in self.resnets:
            hidden_states = constrain(resnet(hidden_states, temb), FEATURE_MAP)
            skips += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = constrain(self.downsamplers[0](hidden_states), FEATURE_MAP)
            skips += (hidden_states,)
        return hidden_states, skips


class CrossAttnDownBlock2D(nnx.Module):
    """``DownBlock2D`` with a ``Transformer2DModel`` (``attentions[i]``) after each resnet.

    ``__call__(x (B, H, W, in_channels), temb (B, T), encoder_hidden_states (B, L, cross_attention_dim))`` ->
    ``(y, skips)`` as ``DownBlock2D``.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int = 1,
                 transformer_layers_per_block: int | Sequence[int] = 1, resnet_eps: float = 1e-6,
                 resnet_groups: int = 32, num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 add_downsample: bool = True, downsample_padding: int = 1, use_linear_projection: bool = False,
                 attention_impl: str | None = "xla", rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=temb_channels,
                          groups=resnet_groups, eps=resnet_eps, **kw) for i in range(num_layers)])
        self.attentions = _attentions(num_layers, out_channels, num_attention_heads=num_attention_heads,
                                      transformer_layers_per_block=transformer_layers_per_block,
                                      cross_attention_dim=cross_attention_dim, resnet_groups=resnet_groups,
                                      use_linear_projection=use_linear_projection, attention_impl=attention_impl,
                                      **kw)
        self.downsamplers = (nnx.List([Downsample2D(out_channels, out_channels, padding=downsample_padding, **kw)])
                             if add_downsample else None)

    def __call__(self, hidden_states: jax.Array, temb: jax.Array, encoder_hidden_states: jax.Array):
        skips = ()
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            hidden_states = attn(resnet(hidden_states, temb), encoder_hidden_states)
            hidden_states = constrain(hidden_states, FEATURE_MAP)
            skips += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = constrain(self.downsamplers[0](hidden_states), FEATURE_MAP)
            skips += (hidden_states,)
        return hidden_states, skips


class UNetMidBlock2DCrossAttn(nnx.Module):
    """``resnets[0]``, then ``attentions[i]`` + ``resnets[i + 1]`` pairs, at constant width.

    ``__call__(x (B, H, W, C), temb (B, T), encoder_hidden_states (B, L, cross_attention_dim))`` -> (B, H, W, C).
    """

    def __init__(self, in_channels: int, temb_channels: int, *, num_layers: int = 1,
                 transformer_layers_per_block: int | Sequence[int] = 1, resnet_eps: float = 1e-6,
                 resnet_groups: int = 32, num_attention_heads: int = 1, output_scale_factor: float = 1.0,
                 cross_attention_dim: int = 1280, use_linear_projection: bool = False,
                 attention_impl: str | None = "xla", rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels, in_channels, temb_channels=temb_channels, groups=resnet_groups,
                          eps=resnet_eps, output_scale_factor=output_scale_factor, **kw)
            for _ in range(num_layers + 1)])
        self.attentions = _attentions(num_layers, in_channels, num_attention_heads=num_attention_heads,
                                      transformer_layers_per_block=transformer_layers_per_block,
                                      cross_attention_dim=cross_attention_dim, resnet_groups=resnet_groups,
                                      use_linear_projection=use_linear_projection, attention_impl=attention_impl,
                                      **kw)

    def __call__(self, hidden_states: jax.Array, temb: jax.Array, encoder_hidden_states: jax.Array) -> jax.Array:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            hidden_states = resnet(attn(hidden_states, encoder_hidden_states), temb)
        return constrain(hidden_states, FEATURE_MAP)


def _up_resnets(in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int, num_layers: int,
                resnet_eps: float, resnet_groups: int, kw) -> nnx.List:
    """Each resnet takes the running map concatenated with one skip; the last skip has ``in_channels``."""
    return nnx.List([
        ResnetBlock2D((prev_output_channel if i == 0 else out_channels)
                      + (in_channels if i == num_layers - 1 else out_channels),
                      out_channels, temb_channels=temb_channels, groups=resnet_groups, eps=resnet_eps, **kw)
        for i in range(num_layers)])


def _pop_skip(hidden_states: jax.Array, skips: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Concatenates the last skip on the channel axis (``torch.cat(dim=1)`` in NCHW) and drops it."""
    return jnp.concatenate([hidden_states, skips[-1].astype(hidden_states.dtype)], axis=-1), skips[:-1]


class UpBlock2D(nnx.Module):
    """``resnets`` over (running map ++ skip) then an optional 2x ``upsamplers[0]``.

    ``__call__(x (B, H, W, prev_output_channel), skips (tuple, last consumed first), temb (B, T),
    encoder_hidden_states=None, upsample_size=None)`` -> (B, H', W', out_channels); ``upsample_size`` (H', W')
    replaces 2x when the skip sizes are odd.
    """

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int, *,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_groups: int = 32, add_upsample: bool = True,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = _up_resnets(in_channels, prev_output_channel, out_channels, temb_channels, num_layers,
                                   resnet_eps, resnet_groups, kw)
        self.upsamplers = nnx.List([Upsample2D(out_channels, out_channels, **kw)]) if add_upsample else None

    def __call__(self, hidden_states: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array,
                 encoder_hidden_states: jax.Array | None = None,
                 upsample_size: tuple[int, int] | None = None) -> jax.Array:
        for resnet in self.resnets:
            hidden_states, skips = _pop_skip(hidden_states, skips)
            hidden_states = constrain(resnet(hidden_states, temb), FEATURE_MAP)
        if self.upsamplers is not None:
            hidden_states = constrain(self.upsamplers[0](hidden_states, upsample_size), FEATURE_MAP)
        return hidden_states


class CrossAttnUpBlock2D(nnx.Module):
    """``UpBlock2D`` with a ``Transformer2DModel`` (``attentions[i]``) after each resnet; same call signature
    (``encoder_hidden_states`` (B, L, cross_attention_dim) required)."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int, *,
                 num_layers: int = 1, transformer_layers_per_block: int | Sequence[int] = 1,
                 resnet_eps: float = 1e-6, resnet_groups: int = 32, num_attention_heads: int = 1,
                 cross_attention_dim: int = 1280, add_upsample: bool = True, use_linear_projection: bool = False,
                 attention_impl: str | None = "xla", rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = _up_resnets(in_channels, prev_output_channel, out_channels, temb_channels, num_layers,
                                   resnet_eps, resnet_groups, kw)
        self.attentions = _attentions(num_layers, out_channels, num_attention_heads=num_attention_heads,
                                      transformer_layers_per_block=transformer_layers_per_block,
                                      cross_attention_dim=cross_attention_dim, resnet_groups=resnet_groups,
                                      use_linear_projection=use_linear_projection, attention_impl=attention_impl,
                                      **kw)
        self.upsamplers = nnx.List([Upsample2D(out_channels, out_channels, **kw)]) if add_upsample else None

    def __call__(self, hidden_states: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array,
                 encoder_hidden_states: jax.Array | None = None,
                 upsample_size: tuple[int, int] | None = None) -> jax.Array:
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            hidden_states, skips = _pop_skip(hidden_states, skips)
            hidden_states = constrain(attn(resnet(hidden_states, temb), encoder_hidden_states), FEATURE_MAP)
        if self.upsamplers is not None:
            hidden_states = constrain(self.upsamplers[0](hidden_states, upsample_size), FEATURE_MAP)
        return hidden_states


def get_down_block(down_block_type: str, *, num_layers: int, in_channels: int, out_channels: int,
                   temb_channels: int, add_downsample: bool, resnet_eps: float, resnet_groups: int,
                   transformer_layers_per_block: int | Sequence[int] = 1, num_attention_heads: int = 1,
                   cross_attention_dim: int | None = None, downsample_padding: int = 1,
                   use_linear_projection: bool = False, attention_impl: str | None = "xla", rngs: nnx.Rngs,
                   dtype=jnp.float32, param_dtype=jnp.float32) -> DownBlock2D | CrossAttnDownBlock2D:
    """diffusers ``get_down_block`` for the block types SD1.5/SDXL use.

    ``num_attention_heads`` is the head count; each head is ``out_channels // num_attention_heads`` wide.

    Raises:
      NotImplementedError: another block type (``AttnDownBlock2D``, ``SimpleCrossAttnDownBlock2D``, ...).
    """
    kw = dict(num_layers=num_layers, resnet_eps=resnet_eps, resnet_groups=resnet_groups,
              add_downsample=add_downsample, downsample_padding=downsample_padding, rngs=rngs, dtype=dtype,
              param_dtype=param_dtype)
    block_type = down_block_type.removeprefix("UNetRes")
    if block_type == "DownBlock2D":
        return DownBlock2D(in_channels, out_channels, temb_channels, **kw)
    if block_type == "CrossAttnDownBlock2D":
        if cross_attention_dim is None:
            raise ValueError("CrossAttnDownBlock2D needs cross_attention_dim")
        return CrossAttnDownBlock2D(in_channels, out_channels, temb_channels,
                                    transformer_layers_per_block=transformer_layers_per_block,
                                    num_attention_heads=num_attention_heads, cross_attention_dim=cross_attention_dim,
                                    use_linear_projection=use_linear_projection, attention_impl=attention_impl, **kw)
    raise NotImplementedError(f"down block type {down_block_type!r} is not supported; supported: {DOWN_BLOCK_TYPES}")


def get_up_block(up_block_type: str, *, num_layers: int, in_channels: int, out_channels: int,
                 prev_output_channel: int, temb_channels: int, add_upsample: bool, resnet_eps: float,
                 resnet_groups: int, transformer_layers_per_block: int | Sequence[int] = 1,
                 num_attention_heads: int = 1, cross_attention_dim: int | None = None,
                 use_linear_projection: bool = False, attention_impl: str | None = "xla", rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32) -> UpBlock2D | CrossAttnUpBlock2D:
    """diffusers ``get_up_block`` for the block types SD1.5/SDXL use.

    Raises:
      NotImplementedError: another block type.
    """
    kw = dict(num_layers=num_layers, resnet_eps=resnet_eps, resnet_groups=resnet_groups, add_upsample=add_upsample,
              rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    block_type = up_block_type.removeprefix("UNetRes")
    if block_type == "UpBlock2D":
        return UpBlock2D(in_channels, prev_output_channel, out_channels, temb_channels, **kw)
    if block_type == "CrossAttnUpBlock2D":
        if cross_attention_dim is None:
            raise ValueError("CrossAttnUpBlock2D needs cross_attention_dim")
        return CrossAttnUpBlock2D(in_channels, prev_output_channel, out_channels, temb_channels,
                                  transformer_layers_per_block=transformer_layers_per_block,
                                  num_attention_heads=num_attention_heads, cross_attention_dim=cross_attention_dim,
                                  use_linear_projection=use_linear_projection, attention_impl=attention_impl, **kw)
    raise NotImplementedError(f"up block type {up_block_type!r} is not supported; supported: {UP_BLOCK_TYPES}")
