"""The SD 1.5 / SDXL variational autoencoder (``AutoencoderKL``), channels-last.

Mirrors diffusers ``models/autoencoders/autoencoder_kl.py`` and ``autoencoders/vae.py`` (``Encoder``,
``Decoder``, ``DiagonalGaussianDistribution``); the module tree and names equal diffusers', so a diffusers
``vae/`` folder loads with ``AutoencoderKL.from_pretrained``. Tiled and sliced decoding are not provided: the
whole image is one XLA program, sharded over the mesh instead.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from realisid_jax.models.layers import conv, group_norm
from realisid_jax.models.modeling_utils import ModelConfig, PretrainedMixin
from realisid_jax.models.vae_blocks import IMAGE_AXES, VAE_EPS, DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from realisid_jax.sharding import constrain

_SIZE = int | tuple[int, ...]

# Pixels per latent cell of the SD / SDXL VAE (diffusers' ``pipeline.vae_scale_factor``): 2 ** (levels - 1).
VAE_SCALE_FACTOR = 8


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(ModelConfig):
    """diffusers ``AutoencoderKL`` ``config.json`` keys, with diffusers' defaults.

    Raises:
      ValueError: a block type other than ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``, an activation other than
        SiLU, or block-type lists whose lengths differ from ``block_out_channels``.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: _SIZE = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        down = set(self.down_block_types) - {"DownEncoderBlock2D"}
        unsupported = down | (set(self.up_block_types) - {"UpDecoderBlock2D"})
        if unsupported:
            raise ValueError(f"AutoencoderKL supports DownEncoderBlock2D / UpDecoderBlock2D blocks only, got "
                             f"{sorted(unsupported)}")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"AutoencoderKL supports act_fn='silu' only, got {self.act_fn!r}")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types ({len(self.down_block_types)}) and up_block_types "
                             f"({len(self.up_block_types)}) need one entry per block_out_channels ({n})")


@struct.dataclass
class DiagonalGaussianDistribution:
    """The encoder's posterior N(mean, exp(logvar)), a pytree (can leave a jit).

    Attributes:
      mean: (B, h, w, latent_channels). logvar: same shape, clipped to [-30, 20] as diffusers.
    Mirrors diffusers ``DiagonalGaussianDistribution`` (non-deterministic).
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussianDistribution:
        """``moments`` (..., 2 * latent_channels): mean channels first, then log-variance channels."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * eps, eps ~ N(0, 1) drawn from ``key`` in the mean's dtype."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


class Encoder(nnx.Module):
    """Image (B, H, W, in_channels) -> posterior moments (B, H/f, W/f, 2 * latent_channels),
    f = 2 ** (len(block_out_channels) - 1). Mirrors diffusers ``Encoder`` with ``double_z=True``.
    """

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = "xla"):
        c = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        widths = c.block_out_channels
        self.conv_in = conv(c.in_channels, widths[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(widths[max(i - 1, 0)], width, num_layers=c.layers_per_block, groups=c.norm_num_groups,
                               add_downsample=i < len(widths) - 1, **kw)
            for i, width in enumerate(widths)])
        self.mid_block = UNetMidBlock2D(widths[-1], groups=c.norm_num_groups, attention_head_dim=widths[-1],
                                        add_attention=c.mid_block_add_attention, attention_impl=attention_impl, **kw)
        self.conv_norm_out = group_norm(widths[-1], c.norm_num_groups, VAE_EPS, **kw)
        self.conv_out = conv(widths[-1], 2 * c.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain(self.conv_in(x), IMAGE_AXES)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels), unclipped (about [-1, 1]).
    Each up block has ``layers_per_block + 1`` resnets. Mirrors diffusers ``Decoder`` with ``norm_type="group"``.
    """

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = "xla"):
        c = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        widths = tuple(reversed(c.block_out_channels))
        self.conv_in = conv(c.latent_channels, widths[0], 3, **kw)
        self.mid_block = UNetMidBlock2D(widths[0], groups=c.norm_num_groups, attention_head_dim=widths[0],
                                        add_attention=c.mid_block_add_attention, attention_impl=attention_impl, **kw)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(widths[max(i - 1, 0)], width, num_layers=c.layers_per_block + 1,
                             groups=c.norm_num_groups, add_upsample=i < len(widths) - 1, **kw)
            for i, width in enumerate(widths)])
        self.conv_norm_out = group_norm(widths[-1], c.norm_num_groups, VAE_EPS, **kw)
        self.conv_out = conv(widths[-1], c.out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = constrain(self.conv_in(z), IMAGE_AXES)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(PretrainedMixin, nnx.Module):
    """KL-regularised image autoencoder of Stable Diffusion 1.5 / SDXL; NHWC, images in [-1, 1].

    ``encode(x)``: x (B, H, W, in_channels), H and W multiples of f = 2 ** (len(block_out_channels) - 1) ->
    ``DiagonalGaussianDistribution`` over (B, H/f, W/f, latent_channels). ``decode(z)``: unscaled latents ->
    (B, H, W, out_channels), roughly [-1, 1] (not clipped). Diffusion latents are
    ``(z - shift_factor) * scaling_factor``; the pipeline applies ``scaling_factor`` / ``shift_factor``.
    Outputs have the computation ``dtype``; SDXL's VAE (``force_upcast``) overflows in float16, and is meant to
    run in float32 or bfloat16.

    Mirrors diffusers ``AutoencoderKL`` (``encoder``, ``decoder``, ``quant_conv``, ``post_quant_conv``).
    """

    config_class = AutoencoderKLConfig

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = "xla"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.encoder = Encoder(config, attention_impl=attention_impl, **kw)
        self.decoder = Decoder(config, attention_impl=attention_impl, **kw)
        latent = config.latent_channels
        self.quant_conv = conv(2 * latent, 2 * latent, 1, **kw) if config.use_quant_conv else None
        self.post_quant_conv = conv(latent, latent, 1, **kw) if config.use_post_quant_conv else None

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        """0.0 when the config has none (SD 1.5, SDXL)."""
        return self.config.shift_factor or 0.0

    def encode(self, x: jax.Array) -> DiagonalGaussianDistribution:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussianDistribution.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction of ``x``: decodes a posterior sample when ``key`` is given, else the posterior mean
        (diffusers ``forward`` with ``sample_posterior=key is not None``)."""
        posterior = self.encode(x)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))
