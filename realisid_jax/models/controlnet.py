"""ControlNet (SD1.5 / SDXL) in Flax NNX (NHWC): the trainable copy of the UNet encoder behind both RealisID
branches (paper Eq. 2, 5, 6).

Mirrors diffusers ``models/controlnets/controlnet.py`` (``ControlNetConditioningEmbedding``,
``ControlNetModel``, ``ControlNetModel.from_unet``): same config keys, module tree and parameter names
(``conv_in``, ``time_embedding``, ``add_embedding``, ``controlnet_cond_embedding``, ``down_blocks``,
``mid_block``, ``controlnet_down_blocks``, ``controlnet_mid_block``), so diffusers ControlNet folders load with
``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realisid_jax.models.layers import conv, zero_conv
from realisid_jax.models.modeling_utils import (
    PretrainedMixin,
    abstract_module,
    fast_compile_options,
    init_rngs,
)
from realisid_jax.models.unet_2d_condition import (
    UNet2DConditionConfig, UNet2DConditionModel, UNetEncoderConfig, UNetEncoderMixin, build_embeddings, build_encoder)
from realisid_jax.models.unet_blocks import FEATURE_MAP
from realisid_jax.sharding import constrain

# Sub-trees that ``from_unet`` copies from the UNet (diffusers' ``load_weights_from_unet``).
_COPIED_FROM_UNET = ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block")


def _jit_init(build, key: jax.Array) -> nnx.Module:
    """``build(rngs)`` compiled as one program. Eagerly every initializer compiles on its own; and on CPU,
    LLVM-optimising threefry code is what costs (8 convs: 18 s at the default level, 1.5 s without backend
    optimisation, which init code does not need)."""
    graphdef = nnx.graphdef(abstract_module(build))
    init = jax.jit(lambda key: nnx.state(build(init_rngs(key))))
    return nnx.merge(graphdef, init.lower(key).compile(compiler_options=fast_compile_options())(key))


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(UNetEncoderConfig):
    """diffusers ``ControlNetModel`` config (``config.json``), defaults as diffusers.

    ``conditioning_channels``: channels of the pixel-space condition (RealisID: 1 for the location mask, 3
    for the landmark image). ``conditioning_embedding_out_channels``: widths of the condition encoder, which
    down-samples by ``2 ** (len - 1)`` (8 for the default 4 widths, pixel -> latent resolution).
    ``controlnet_conditioning_channel_order`` other than ``"rgb"`` and ``global_pool_conditions`` (old SD1.x
    community ControlNets) raise ``NotImplementedError``.
    """

    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":
            raise NotImplementedError(f"ControlNetConfig.mid_block_type={self.mid_block_type!r} is not supported "
                                      "(supported: 'UNetMidBlock2DCrossAttn')")
        if self.controlnet_conditioning_channel_order != "rgb":
            raise NotImplementedError("ControlNetConfig.controlnet_conditioning_channel_order="
                                      f"{self.controlnet_conditioning_channel_order!r} is not supported "
                                      "(supported: 'rgb')")
        if self.global_pool_conditions:
            raise NotImplementedError("ControlNetConfig.global_pool_conditions=True is not supported")

    @classmethod
    def from_unet_config(cls, unet_config: UNet2DConditionConfig, **overrides) -> ControlNetConfig:
        """The ControlNet config of a UNet's encoder, as diffusers ``ControlNetModel.from_unet`` builds it:
        every shared key copied from ``unet_config``, then ``overrides`` (e.g. ``conditioning_channels=1``)."""
        shared = {f.name: getattr(unet_config, f.name) for f in dataclasses.fields(UNetEncoderConfig)}
        return cls(**{**shared, **overrides})


class ControlNetConditioningEmbedding(nnx.Module):
    """Condition encoder: ``conv_in``, ``blocks`` (3x3 conv, stride-2 3x3 conv per width step), zero-initialised
    ``conv_out`` (the paper's Z1), SiLU between convs.

    ``__call__(cond (B, H, W, conditioning_channels))`` -> (B, H / 2**(n-1), W / 2**(n-1),
    conditioning_embedding_channels) with n = ``len(block_out_channels)``. Mirrors diffusers
    ``ControlNetConditioningEmbedding``.
    """

    def __init__(self, conditioning_embedding_channels: int, conditioning_channels: int = 3,
                 block_out_channels: Sequence[int] = (16, 32, 96, 256), *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv_in = conv(conditioning_channels, block_out_channels[0], 3, **kw)
        blocks = []
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            blocks += [conv(c_in, c_in, 3, **kw), conv(c_in, c_out, 3, stride=2, **kw)]
        self.blocks = nnx.List(blocks)
        self.conv_out = zero_conv(block_out_channels[-1], conditioning_embedding_channels, 3, **kw)

    def __call__(self, conditioning: jax.Array) -> jax.Array:
        # Its widths are small (16-256) and its maps large (the pixel resolution): unconstrained, an FSDP
        # partitioner shards these activations over their few channels, each shard padded to the TPU's 128
        # lanes, and gathers the batch instead of the weights.
        x = constrain(jax.nn.silu(self.conv_in(conditioning)), FEATURE_MAP)
        for block in self.blocks:
            x = constrain(jax.nn.silu(block(x)), FEATURE_MAP)
        return self.conv_out(x)


class ControlNetModel(UNetEncoderMixin, PretrainedMixin, nnx.Module):
    """ControlNet: UNet encoder + mid block copy F on ``conv_in(z_t) + Z1(cond)``, zero 1x1 convs Z2 per output.

    Construct with ``ControlNetModel(config, rngs=...)`` (fresh: Z1/Z2 zero, everything else random),
    ``ControlNetModel.from_unet(unet)`` (F copied from the UNet) or ``from_pretrained(ControlNetModel, folder)``.
    """

    config_class = ControlNetConfig

    def __init__(self, config: ControlNetConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = "xla"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.dtype, self.param_dtype, self.attention_impl = dtype, param_dtype, attention_impl
        channels = config.block_out_channels
        time_embed_dim = channels[0] * 4
        self.conv_in = conv(config.in_channels, channels[0], 3, **kw)
        build_embeddings(self, config, time_embed_dim, kw)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            channels[0], config.conditioning_channels, config.conditioning_embedding_out_channels, **kw)
        self.down_blocks, self.mid_block = build_encoder(config, time_embed_dim, attention_impl, kw)
        # One zero conv per skip connection the UNet takes: conv_in's output, each resnet, each down-sampler.
        skip_channels = [channels[0]]
        for block, c in zip(self.down_blocks, channels):
            skip_channels += [c] * (len(block.resnets) + (block.downsamplers is not None))
        self.controlnet_down_blocks = nnx.List([zero_conv(c, c, 1, **kw) for c in skip_channels])
        self.controlnet_mid_block = zero_conv(channels[-1], channels[-1], 1, **kw)

    def __call__(self, sample: jax.Array, timesteps: jax.Array | int | float, encoder_hidden_states: jax.Array,
                 controlnet_cond: jax.Array, *, conditioning_scale: float | jax.Array = 1.0,
                 added_cond_kwargs: dict[str, jax.Array] | None = None
                 ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """Residuals for the UNet's skip connections and mid block.

        Args:
          sample: (B, h, w, in_channels) noisy latents, NHWC.
          timesteps: scalar or (B,) diffusion timesteps.
          encoder_hidden_states: (B, L, cross_attention_dim) context (RealisID: the ID tokens p_id).
          controlnet_cond: (B, 8h, 8w, conditioning_channels) pixel-space condition, values as diffusers takes
            them (e.g. [0, 1] RGB images, a {0, 1} mask).
          conditioning_scale: multiplies every residual; a Python float or a traced scalar.
          added_cond_kwargs: SDXL only: ``{"text_embeds": (B, pooled_dim), "time_ids": (B, 6)}``.

        Returns:
          ``(down_block_res_samples, mid_block_res_sample)``: a tuple of NHWC tensors, one per UNet skip
          connection (pass as ``down_block_additional_residuals``), and (B, h', w', block_out_channels[-1])
          (``mid_block_additional_residual``), in ``dtype``.

        Raises:
          ValueError: ``controlnet_cond`` does not encode to the latent size; missing SDXL added conditions.
        """
        emb = self.time_embed(sample.shape[0], timesteps, added_cond_kwargs)
        sample = self.conv_in(sample)
        cond = self.controlnet_cond_embedding(controlnet_cond)
        if cond.shape != sample.shape:
            raise ValueError(f"controlnet_cond {controlnet_cond.shape} encodes to {cond.shape}, but the latent "
                             f"{sample.shape} needs the same shape (condition at the pixel resolution)")
        sample = constrain(sample + cond, FEATURE_MAP)
        sample, skips = self.encode_down(sample, emb, encoder_hidden_states)
        sample = self.encode_mid(sample, emb, encoder_hidden_states)
        scale = jnp.asarray(conditioning_scale, dtype=sample.dtype)
        blocks = self.controlnet_down_blocks
        down = tuple(constrain(block(s) * scale, FEATURE_MAP) for s, block in zip(skips, blocks, strict=True))
        mid = constrain(self.controlnet_mid_block(sample) * scale, FEATURE_MAP)
        return down, mid

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, *, conditioning_channels: int = 3,
                  conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
                  load_weights_from_unet: bool = True, rngs: nnx.Rngs | None = None) -> ControlNetModel:
        """A ControlNet for ``unet``, as diffusers ``ControlNetModel.from_unet``.

        With ``load_weights_from_unet``, ``conv_in``, the time/added embeddings, ``down_blocks`` and
        ``mid_block`` are copies of the UNet's (new buffers, so donating the ControlNet's state in a train
        step leaves the frozen UNet intact; same shardings); ``controlnet_cond_embedding.conv_out`` (Z1),
        ``controlnet_down_blocks`` and ``controlnet_mid_block`` (Z2) are zero, so the fresh branch adds
        nothing; the rest of the condition encoder is randomly initialised from one key drawn from ``rngs``
        (default ``nnx.Rngs(0)``). Without it, everything but Z1/Z2 is random. dtype, param_dtype and
        attention_impl follow the UNet.
        """
        config = ControlNetConfig.from_unet_config(
            unet.config, conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels))
        kw = dict(dtype=unet.dtype, param_dtype=unet.param_dtype, attention_impl=unet.attention_impl)
        key = (rngs if rngs is not None else nnx.Rngs(0)).params()
        if not load_weights_from_unet:
            return _jit_init(lambda rngs: cls(config, rngs=rngs, **kw), key)
        graphdef, abstract = nnx.split(cls.abstract(config, **kw))
        from_unet = dict(nnx.to_flat_state(nnx.state(unet, nnx.Param)))
        cond_embedding = _jit_init(lambda rngs: ControlNetConditioningEmbedding(
            config.block_out_channels[0], conditioning_channels, config.conditioning_embedding_out_channels,
            rngs=rngs, dtype=unet.dtype, param_dtype=unet.param_dtype), key)
        from_embedding = dict(nnx.to_flat_state(nnx.state(cond_embedding, nnx.Param)))

        def value(path, variable):
            # device_put, not jnp ops: a jnp.copy / jnp.zeros compiles once per distinct shape.
            if path[0] in _COPIED_FROM_UNET:
                weight = from_unet[path].get_value()
                return jax.device_put(weight, weight.sharding, may_alias=False)  # also a multi-host array
            if path[0] == "controlnet_cond_embedding":
                return from_embedding[path[1:]].get_value()
            return jax.device_put(np.zeros(variable.shape, variable.dtype))  # Z2

        state = nnx.from_flat_state([(p, v.replace(value(p, v))) for p, v in nnx.to_flat_state(abstract)])
        return nnx.merge(graphdef, state)
