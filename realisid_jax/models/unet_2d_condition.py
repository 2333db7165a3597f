"""The Stable Diffusion 1.5 / SDXL denoising UNet in Flax NNX (NHWC), with ControlNet residual inputs.

Mirrors diffusers ``models/unets/unet_2d_condition.py::UNet2DConditionModel``: the same config keys, module
tree and parameter names (``conv_in``, ``time_proj``, ``time_embedding``, ``add_time_proj``,
``add_embedding``, ``down_blocks``, ``mid_block``, ``up_blocks``, ``conv_norm_out``, ``conv_out``), so a
diffusers ``unet/`` folder loads with ``from_pretrained`` by a mechanical rename.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from realisid_jax.models.embeddings import Timesteps, TimestepEmbedding, broadcast_timesteps, text_time_input
from realisid_jax.models.layers import conv, group_norm
from realisid_jax.models.modeling_utils import ModelConfig, PretrainedMixin, freeze_nested
from realisid_jax.models.unet_blocks import FEATURE_MAP, UNetMidBlock2DCrossAttn, get_down_block, get_up_block
from realisid_jax.sharding import constrain


# Config values this implementation supports, by key: a key absent from a config class is not checked. Each
# entry is (predicate on the value, what is supported). Anything else raises instead of being ignored.
_SUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "class_embed_type": (lambda v: v is None, "None"),
    "num_class_embeds": (lambda v: v is None, "None"),
    "addition_embed_type": (lambda v: v in (None, "text_time"), "None or 'text_time' (SDXL)"),
    "encoder_hid_dim": (lambda v: v is None, "None"),
    "encoder_hid_dim_type": (lambda v: v is None, "None"),
    "time_embedding_type": (lambda v: v == "positional", "'positional'"),
    "time_embedding_act_fn": (lambda v: v is None, "None"),
    "timestep_post_act": (lambda v: v is None, "None"),
    "time_cond_proj_dim": (lambda v: v is None, "None"),
    "act_fn": (lambda v: v in ("silu", "swish"), "'silu'"),
    "resnet_time_scale_shift": (lambda v: v == "default", "'default'"),
    "dual_cross_attention": (lambda v: not v, "False"),
    "upcast_attention": (lambda v: not v, "False"),
    "only_cross_attention": (lambda v: not any(v if isinstance(v, tuple) else (v,)), "False"),
    "attention_type": (lambda v: v == "default", "'default'"),
    "class_embeddings_concat": (lambda v: not v, "False"),
    "norm_num_groups": (lambda v: v is not None, "an int"),
    "dropout": (lambda v: v == 0, "0.0"),
    "mid_block_type": (lambda v: v in ("UNetMidBlock2DCrossAttn", None), "'UNetMidBlock2DCrossAttn' or None"),
}


def check_supported(config: ModelConfig) -> None:
    """Validates a UNet/ControlNet config against what this implementation computes.

    Raises:
      NotImplementedError: a config value that would change the model in a way not implemented here
        (class embeddings, other added embeddings, upcast attention, ...), naming the key and value.
      ValueError: ``addition_embed_type="text_time"`` without its two dimensions, or per-block tuples whose
        length differs from ``down_block_types``.
    """
    name = type(config).__name__
    for key, (ok, supported) in _SUPPORTED.items():
        if hasattr(config, key) and not ok(getattr(config, key)):
            raise NotImplementedError(f"{name}.{key}={getattr(config, key)!r} is not supported (supported: "
                                      f"{supported})")
    if config.addition_embed_type == "text_time" and None in (config.addition_time_embed_dim,
                                                               config.projection_class_embeddings_input_dim):
        raise ValueError(f"{name}: addition_embed_type='text_time' needs addition_time_embed_dim and "
                         "projection_class_embeddings_input_dim")
    n = len(config.down_block_types)
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                "attention_head_dim", "num_attention_heads"):
        value = getattr(config, key, None)
        if isinstance(value, tuple) and len(value) != n:
            raise ValueError(f"{name}.{key}={value} needs one entry per down block ({n})")


def per_block(value, n: int) -> tuple:
    """An int-or-tuple config value as one entry per block."""
    return value if isinstance(value, tuple) else (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetEncoderConfig(ModelConfig):
    """The config keys of a UNet's encoder (embeddings, down path, mid block), shared by
    ``UNet2DConditionConfig`` and ``ControlNetConfig``; defaults as diffusers. Nested lists from
    ``config.json`` become nested tuples (hashable: configs are static jit arguments), and the values are
    checked against what this implementation computes (``check_supported``)."""

    in_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, freeze_nested(getattr(self, f.name)))
        check_supported(self)


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig(UNetEncoderConfig):
    """diffusers ``UNet2DConditionModel`` config (``unet/config.json``), defaults as diffusers.

    ``attention_head_dim`` is, as in diffusers, the number of heads per block when ``num_attention_heads`` is
    None (SD1.5: 8 heads; SDXL: (5, 10, 20) heads of width 64). Keys that only matter for features not
    implemented here are kept so that a non-default value raises ``NotImplementedError`` (see
    ``check_supported``) instead of being ignored.
    """

    sample_size: int | tuple[int, int] | None = None
    out_channels: int = 4
    center_input_sample: bool = False
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    dropout: float = 0.0
    reverse_transformer_layers_per_block: tuple | None = None
    dual_cross_attention: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    attention_type: str = "default"
    class_embeddings_concat: bool = False

    def __post_init__(self):
        super().__post_init__()
        if len(self.up_block_types) != len(self.down_block_types):
            raise ValueError(f"UNet2DConditionConfig: {len(self.down_block_types)} down blocks but "
                             f"{len(self.up_block_types)} up blocks")


class UNetEncoderMixin:
    """What the UNet and the ControlNet share: time/added embeddings, the down path, the mid block, and
    gradient checkpointing of each block. Needs ``config``, ``dtype``, ``time_proj``, ``time_embedding``,
    ``add_time_proj``, ``add_embedding``, ``down_blocks``, ``mid_block``."""

    gradient_checkpointing: bool = False
    remat_policy: Callable | None = None

    def enable_gradient_checkpointing(self, policy: Callable | None = None) -> None:
        """Run every down/mid/up block under ``jax.checkpoint`` (activations recomputed in the backward pass).

        Call before ``nnx.split`` / jit: the flag is static and lives in the graph definition. ``policy`` is a
        ``jax.checkpoint_policies`` entry (default: save nothing inside a block).
        """
        self.gradient_checkpointing = True
        self.remat_policy = policy

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False
        self.remat_policy = None

    def _run_block(self, block, *args, **static):
        """``block(*args, **static)``, rematerialised when gradient checkpointing is on (``static`` holds
        Python values such as ``upsample_size``, closed over rather than traced).

        ``jax.checkpoint`` of a pure function of the block's state, not ``nnx.remat``: blocks hold no mutable
        state, and their variables may belong to an outer trace (a module merged inside a ``jax.jit``), which
        ``nnx.remat`` refuses to touch."""
        if not self.gradient_checkpointing:
            return block(*args, **static)
        graphdef, state = nnx.split(block)

        def pure(state, *a):
            return nnx.merge(graphdef, state)(*a, **static)

        return jax.checkpoint(pure, policy=self.remat_policy)(state, *args)

    def time_embed(self, batch: int, timesteps, added_cond_kwargs: dict[str, jax.Array] | None) -> jax.Array:
        """Timestep embedding plus SDXL's ``text_time`` embedding: (B, time_embed_dim) in ``self.dtype``."""
        t_emb = self.time_proj(broadcast_timesteps(timesteps, batch)).astype(self.dtype)
        emb = self.time_embedding(t_emb)
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(text_time_input(self.add_time_proj, added_cond_kwargs).astype(emb.dtype))
        return emb

    def encode_down(self, sample: jax.Array, emb: jax.Array, encoder_hidden_states: jax.Array):
        """``down_blocks`` from the ``conv_in`` output: (last map, skips incl. the ``conv_in`` output)."""
        skips = (sample,)
        for block in self.down_blocks:
            sample, block_skips = self._run_block(block, sample, emb, encoder_hidden_states)
            skips += block_skips
        return sample, skips

    def encode_mid(self, sample: jax.Array, emb: jax.Array, encoder_hidden_states: jax.Array) -> jax.Array:
        if self.mid_block is None:
            return sample
        return self._run_block(self.mid_block, sample, emb, encoder_hidden_states)


def build_embeddings(module, config, time_embed_dim: int, kw: dict) -> None:
    """Sets ``time_proj``, ``time_embedding``, ``add_time_proj``, ``add_embedding`` on ``module``."""
    first = config.block_out_channels[0]
    module.time_proj = Timesteps(first, config.flip_sin_to_cos, config.freq_shift)
    module.time_embedding = TimestepEmbedding(first, time_embed_dim, **kw)
    if config.addition_embed_type == "text_time":
        module.add_time_proj = Timesteps(config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift)
        module.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, time_embed_dim, **kw)
    else:
        module.add_time_proj = module.add_embedding = None


def build_encoder(config, temb_channels: int, attention_impl: str | None, kw: dict):
    """``down_blocks`` and ``mid_block`` of a UNet config (the ControlNet's copy F is built the same way)."""
    n = len(config.down_block_types)
    channels = config.block_out_channels
    heads = per_block(config.num_attention_heads or config.attention_head_dim, n)
    layers = per_block(config.layers_per_block, n)
    cross = per_block(config.cross_attention_dim, n)
    depth = per_block(config.transformer_layers_per_block, n)
    down = []
    for i, block_type in enumerate(config.down_block_types):
        down.append(get_down_block(
            block_type, num_layers=layers[i], in_channels=channels[max(i - 1, 0)], out_channels=channels[i],
            temb_channels=temb_channels, add_downsample=i < n - 1, resnet_eps=config.norm_eps,
            resnet_groups=config.norm_num_groups, transformer_layers_per_block=depth[i], num_attention_heads=heads[i],
            cross_attention_dim=cross[i], downsample_padding=config.downsample_padding,
            use_linear_projection=config.use_linear_projection, attention_impl=attention_impl, **kw))
    mid = None
    if config.mid_block_type is not None:
        mid = UNetMidBlock2DCrossAttn(
            channels[-1], temb_channels, transformer_layers_per_block=depth[-1], resnet_eps=config.norm_eps,
            resnet_groups=config.norm_num_groups, num_attention_heads=heads[-1],
            output_scale_factor=config.mid_block_scale_factor, cross_attention_dim=cross[-1],
            use_linear_projection=config.use_linear_projection, attention_impl=attention_impl, **kw)
    return nnx.List(down), mid


class UNet2DConditionModel(UNetEncoderMixin, PretrainedMixin, nnx.Module):
    """Conditional denoising UNet of Stable Diffusion 1.5 and SDXL (NHWC), diffusers ``UNet2DConditionModel``.

    Construct with ``UNet2DConditionModel(config, rngs=nnx.Rngs(0))``, ``.abstract(config)`` (shapes only) or
    ``loading.from_pretrained(UNet2DConditionModel, folder, subfolder="unet")``. ``dtype`` is the computation
    dtype, ``param_dtype`` the storage dtype; ``attention_impl`` goes to ``jax.nn.dot_product_attention``.
    """

    config_class = UNet2DConditionConfig

    def __init__(self, config: UNet2DConditionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention_impl: str | None = "xla"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.dtype, self.param_dtype, self.attention_impl = dtype, param_dtype, attention_impl
        channels = config.block_out_channels
        n = len(channels)
        time_embed_dim = config.time_embedding_dim or channels[0] * 4
        self.conv_in = conv(config.in_channels, channels[0], config.conv_in_kernel, **kw)
        build_embeddings(self, config, time_embed_dim, kw)
        self.down_blocks, self.mid_block = build_encoder(config, time_embed_dim, attention_impl, kw)

        rev_channels = channels[::-1]
        rev_heads = per_block(config.num_attention_heads or config.attention_head_dim, n)[::-1]
        rev_layers = per_block(config.layers_per_block, n)[::-1]
        rev_cross = per_block(config.cross_attention_dim, n)[::-1]
        rev_depth = (config.reverse_transformer_layers_per_block
                     or per_block(config.transformer_layers_per_block, n)[::-1])
        self.up_blocks = nnx.List([
            get_up_block(block_type, num_layers=rev_layers[i] + 1, in_channels=rev_channels[min(i + 1, n - 1)],
                         out_channels=rev_channels[i], prev_output_channel=rev_channels[max(i - 1, 0)],
                         temb_channels=time_embed_dim, add_upsample=i < n - 1, resnet_eps=config.norm_eps,
                         resnet_groups=config.norm_num_groups, transformer_layers_per_block=rev_depth[i],
                         num_attention_heads=rev_heads[i], cross_attention_dim=rev_cross[i],
                         use_linear_projection=config.use_linear_projection, attention_impl=attention_impl, **kw)
            for i, block_type in enumerate(config.up_block_types)])
        self.num_upsamplers = n - 1
        self.conv_norm_out = group_norm(channels[0], config.norm_num_groups, config.norm_eps, **kw)
        self.conv_out = conv(channels[0], config.out_channels, config.conv_out_kernel, **kw)

    def __call__(self, sample: jax.Array, timesteps: jax.Array | int | float, encoder_hidden_states: jax.Array, *,
                 added_cond_kwargs: dict[str, jax.Array] | None = None,
                 down_block_additional_residuals: Sequence[jax.Array] | None = None,
                 mid_block_additional_residual: jax.Array | None = None) -> jax.Array:
        """Predicts the noise (or v) of a latent batch.

        Args:
          sample: (B, H, W, in_channels) noisy latents, NHWC. H, W need not be multiples of 2**num_upsamplers.
          timesteps: scalar or (B,) diffusion timesteps in [0, num_train_timesteps), int or float.
          encoder_hidden_states: (B, L, cross_attention_dim) text context.
          added_cond_kwargs: SDXL only: ``{"text_embeds": (B, pooled_dim), "time_ids": (B, 6)}``.
          down_block_additional_residuals: ControlNet residuals, one NHWC tensor per skip connection (the
            ``conv_in`` output, then each down-block resnet/transformer output and each down-sampler output),
            added to the skips; must come with ``mid_block_additional_residual``.
          mid_block_additional_residual: (B, h, w, block_out_channels[-1]), added after the mid block.

        Returns:
          (B, H, W, out_channels) in ``dtype``.

        Raises:
          ValueError: only one of the two residual arguments, or the wrong number of down residuals; missing
            ``added_cond_kwargs`` entries for an SDXL UNet.
        """
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("pass both down_block_additional_residuals and mid_block_additional_residual "
                             "(ControlNet residuals) or neither")
        b, h, w, _ = sample.shape
        factor = 2 ** self.num_upsamplers
        forward_upsample_size = h % factor != 0 or w % factor != 0
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.time_embed(b, timesteps, added_cond_kwargs)
        sample = constrain(self.conv_in(sample), FEATURE_MAP)
        sample, skips = self.encode_down(sample, emb, encoder_hidden_states)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has {len(down_block_additional_residuals)} "
                                 f"tensors; this UNet has {len(skips)} skip connections")
            skips = tuple(s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals, strict=True))
        sample = self.encode_mid(sample, emb, encoder_hidden_states)
        if mid_block_additional_residual is not None:
            sample = sample + mid_block_additional_residual.astype(sample.dtype)
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[1:3]) if forward_upsample_size and i < len(self.up_blocks) - 1 else None
            sample = self._run_block(block, sample, block_skips, emb, encoder_hidden_states, upsample_size=size)
        sample = jax.nn.silu(self.conv_norm_out(sample))
        return self.conv_out(sample)
