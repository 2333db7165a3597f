"""RealisID: the local and global ControlNet branches and the ID projection (paper Eqs. 3-6, multi-person).

The frozen UNet gets, at every skip connection and after the mid block,
``local_scale * Σ_k R(i_l^k, box_k) + global_scale * (1/K) Σ_k i_g^k`` where, per person k:

  * ``i_l^k = local_branch(crop_k(z_t), t, p_id^k, c_pe^k)`` runs on the face box cropped out of the latent and
    bilinearly up-sampled to ``local_latent_size``², and ``R`` relocates each of its residual levels back into
    the box (zero outside it);
  * ``i_g^k = global_branch(z_t, t, p_id^k, c_loc^k)`` runs on the whole latent, conditioned on the person's
    location mask.

Persons are padded to a static K with a validity mask and folded into the batch axis (B * K), so each branch
runs once per denoising step; with ``persons_per_pass`` P < K they run P at a time in a ``lax.scan`` that sums
their injections, so the branches' activations are those of P persons (what lets 4 persons sample on one 16 GiB
chip). Boxes follow ``realisid_jax.realisid.ops``: ``(x0, y0, x1, y1)`` normalised to [0, 1].
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from realisid_jax.realisid.ops import crop_and_resize, location_mask, relocate_levels
from realisid_jax.models.controlnet import ControlNetConfig, ControlNetModel
from realisid_jax.models.embeddings import broadcast_timesteps
from realisid_jax.models.id_projection import IDProjection, IDProjectionConfig
from realisid_jax.models.modeling_utils import abstract_module
from realisid_jax.models.unet_2d_condition import UNet2DConditionConfig
from realisid_jax.models.vae import VAE_SCALE_FACTOR

# Stand-in box of padded persons: keeps every op well conditioned; their outputs are masked out anyway.
_FULL_BOX = (0.0, 0.0, 1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class RealisIDConfig:
    """What ``RealisID`` is built from; ``from_config`` reads it from a project config.

    Attributes:
      local_branch, global_branch: ControlNet configs (the UNet's, with the branch's condition channels).
      id_projection: the p_id Resampler's config; its ``output_dims`` is both branches' context width.
      local_latent_size: S, the side of the up-sampled crop in latent cells (landmark image: 8S pixels).
      local_scale, global_scale: weights of the two injections (method notes: 1.0).
      persons_per_pass: P, how many of the K person slots each branch pass folds into its batch (0: all K);
        the passes run in sequence, K / P of them (K padded to a multiple of P). The sum is the same up to
        rounding; the memory of the branches' activations falls to P/K of it, at the price of smaller matmuls.
    """

    local_branch: ControlNetConfig
    global_branch: ControlNetConfig
    id_projection: IDProjectionConfig
    local_latent_size: int = 64
    local_scale: float = 1.0
    global_scale: float = 1.0
    persons_per_pass: int = 0

    def __post_init__(self):
        if self.persons_per_pass < 0:
            raise ValueError(f"persons_per_pass={self.persons_per_pass} must be >= 0 (0: all persons in one pass)")
        for name in ("local_branch", "global_branch"):
            width = getattr(self, name).cross_attention_dim
            widths = width if isinstance(width, tuple) else (width,)
            if any(w != self.id_projection.output_dims for w in widths):
                raise ValueError(f"{name}.cross_attention_dim={width} must equal id_projection.output_dims="
                                 f"{self.id_projection.output_dims}: p_id is the branches' context")

    @classmethod
    def from_config(cls, config: Any) -> RealisIDConfig:
        """From a project config (``configs/*.py``): ``model.unet`` with the ``model.local_branch`` /
        ``model.global_branch`` overrides, ``model.id_projection`` and the ``realisid`` section."""
        model, realisid = config.model, config.realisid
        unet = UNet2DConditionConfig.from_dict(dict(model.unet))
        return cls(
            local_branch=ControlNetConfig.from_unet_config(unet, **dict(model.local_branch)),
            global_branch=ControlNetConfig.from_unet_config(unet, **dict(model.global_branch)),
            id_projection=IDProjectionConfig.from_dict(dict(model.id_projection)),
            local_latent_size=int(realisid.local_latent_size),
            local_scale=float(realisid.local_scale),
            global_scale=float(realisid.global_scale),
            persons_per_pass=int(realisid.get("persons_per_pass", 0)),
        )


def _fold(x: jax.Array, k: int) -> jax.Array:
    """(B, ...) -> (B * K, ...), each image repeated for its K persons (person index fastest, so an image's
    persons stay on its data shard)."""
    return jnp.repeat(x, k, axis=0)


def _sum_persons(x: jax.Array, valid: jax.Array) -> jax.Array:
    """(B * K, ...) -> (B, ...): sum over valid persons (``where``, so padded slots cannot leak NaNs)."""
    b, k = valid.shape
    x = x.reshape(b, k, *x.shape[1:])
    return jnp.where(valid.reshape(b, k, *(1,) * (x.ndim - 2)), x, 0).sum(axis=1)


class RealisID(nnx.Module):
    """RealisID's trainable part: ``local_branch`` and ``global_branch`` (diffusers ``ControlNetModel``
    trees) and ``id_projection`` (diffusers ``IPAdapterPlusImageProjection`` tree).

    Construct with ``RealisID(config, rngs=...)`` (random branches) or ``RealisID.from_unet(unet, config)``
    (branches initialised from the UNet, as in the paper).
    """

    def __init__(self, config: RealisIDConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = "xla"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
        self.config = config
        self.dtype = dtype
        self.local_branch = ControlNetModel(config.local_branch, **kw)
        self.global_branch = ControlNetModel(config.global_branch, **kw)
        self.id_projection = IDProjection(config.id_projection, **kw)

    @classmethod
    def abstract(cls, config: RealisIDConfig, *, dtype=jnp.float32, param_dtype=None,
                 attention_impl: str | None = "xla") -> RealisID:
        """The model with ``ShapeDtypeStruct`` parameters (shapes, counts, shardings; no memory)."""
        return abstract_module(lambda rngs: cls(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype or dtype,
                                                attention_impl=attention_impl))

    @classmethod
    def from_unet(cls, unet, config: RealisIDConfig, *, rngs: nnx.Rngs | None = None) -> RealisID:
        """Both ControlNets copied from ``unet`` (``ControlNetModel.from_unet``: encoder + mid block weights,
        zero-initialised condition embedding output Z1 and residual convs Z2) and a fresh ``id_projection``;
        the new weights (condition encoders, projection) drawn from ``rngs`` (default ``nnx.Rngs(0)``), so the
        two branches' condition encoders differ. dtype, param_dtype and attention implementation follow ``unet``.
        """
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        model = cls.abstract(config, dtype=unet.dtype, param_dtype=unet.param_dtype,
                             attention_impl=unet.attention_impl)
        for name in ("local_branch", "global_branch"):
            branch = getattr(config, name)
            setattr(model, name, ControlNetModel.from_unet(
                unet, conditioning_channels=branch.conditioning_channels,
                conditioning_embedding_out_channels=branch.conditioning_embedding_out_channels, rngs=rngs))
        model.id_projection = IDProjection(config.id_projection, rngs=rngs, dtype=unet.dtype,
                                           param_dtype=unet.param_dtype, attention_impl=unet.attention_impl)
        return model

    def encode_id(self, image_hidden_states: jax.Array) -> jax.Array:
        """p_id from CLIP-vision penultimate hidden states: (..., L, embed_dims) -> (..., num_queries,
        output_dims); leading axes (e.g. batch and persons) are kept."""
        lead = image_hidden_states.shape[:-2]
        tokens = self.id_projection(image_hidden_states.reshape(-1, *image_hidden_states.shape[-2:]))
        return tokens.reshape(*lead, *tokens.shape[1:])

    def residuals(self, sample: jax.Array, timesteps: jax.Array | int | float, id_embedding: jax.Array,
                  boxes: jax.Array, valid: jax.Array, landmark_images: jax.Array,
                  added_cond_kwargs: Mapping[str, jax.Array] | None = None):
        """Both branches' injections for K (padded) persons, summed per residual level.

        Args:
          sample: (B, h, w, 4) noisy latents z_t, NHWC.
          timesteps: scalar or (B,) diffusion timesteps.
          id_embedding: (B, K, N, D) p_id per person (``encode_id`` output), D = ``id_projection.output_dims``.
          boxes: (B, K, 4) float face boxes ``(x0, y0, x1, y1)`` normalised to [0, 1].
          valid: (B, K) bool, False for padded person slots (their boxes and inputs are ignored).
          landmark_images: (B, K, 8S, 8S, 3) float in [0, 1], c_pe in each square face crop's frame
            (S = ``local_latent_size``).
          added_cond_kwargs: SDXL only, ``{"text_embeds": (B, P), "time_ids": (B, 6)}`` of the image. The
            global branch gets them as they are; the local branch gets ``text_embeds`` and the crop's own
            time ids ``(box_h_px, box_w_px, 0, 0, 8S, 8S)``.

        Returns:
          ``(down_block_res_samples, mid_block_res_sample)``: a tuple of NHWC arrays matching the UNet's skip
          connections and its mid-block output, ``local_scale * Σ_k valid_k R(i_l^k) + global_scale *
          Σ_k valid_k i_g^k / max(1, Σ_k valid_k)``; all zeros for an image without a valid person. Pass them
          as the UNet's ``down_block_additional_residuals`` / ``mid_block_additional_residual``.

        Raises:
          ValueError: on inconsistent shapes (persons, landmark image size).
        """
        b = sample.shape[0]
        k = boxes.shape[1]
        size = self.config.local_latent_size
        pixels = VAE_SCALE_FACTOR * size
        if boxes.shape != (b, k, 4) or valid.shape != (b, k) or id_embedding.shape[:2] != (b, k):
            raise ValueError(f"boxes {boxes.shape}, valid {valid.shape} and id_embedding {id_embedding.shape} "
                             f"must share (B, K) = ({b}, K), boxes ending in 4")
        if landmark_images.shape[:2] != (b, k) or landmark_images.shape[2:4] != (pixels, pixels):
            raise ValueError(f"landmark_images {landmark_images.shape} must be (B, K, {pixels}, {pixels}, C) for "
                             f"local_latent_size {size}")
        valid = valid.astype(bool)
        per_pass = self.config.persons_per_pass or k
        persons = (id_embedding, boxes.astype(jnp.float32), valid, landmark_images)
        t = broadcast_timesteps(timesteps, b)
        if per_pass >= k:
            local_levels, global_levels = self._persons_pass(sample, t, *persons, added_cond_kwargs)
        else:
            local_levels, global_levels = self._persons_in_sequence(sample, t, persons, added_cond_kwargs, per_pass)
        count = jnp.maximum(valid.sum(axis=1), 1).astype(jnp.float32)
        inv_count = (1.0 / count).reshape(b, 1, 1, 1)
        total = tuple(
            (self.config.local_scale * loc + self.config.global_scale * glob * inv_count).astype(glob.dtype)
            for loc, glob in zip(local_levels, global_levels))
        return total[:-1], total[-1]

    def _persons_pass(self, sample, t, id_embedding, boxes, valid, landmark_images, added_cond_kwargs):
        """One pass of both branches over K' persons folded into the batch: (Σ_k valid_k R(i_l^k), Σ_k valid_k
        i_g^k), each a tuple of the residual levels (down..., mid), (B, h_l, w_l, C_l) in the branches' dtype."""
        b, h, w, _ = sample.shape
        k = boxes.shape[1]
        size = self.config.local_latent_size
        boxes = jnp.where(valid[..., None], boxes, jnp.asarray(_FULL_BOX, jnp.float32))
        flat_boxes = boxes.reshape(b * k, 4)
        t = _fold(t, k)
        p_id = id_embedding.reshape(b * k, *id_embedding.shape[2:])
        global_added, local_added = self._added_conditions(added_cond_kwargs, flat_boxes, (h, w), k)

        masks = jax.vmap(location_mask, in_axes=(0, None))(flat_boxes, (VAE_SCALE_FACTOR * h, VAE_SCALE_FACTOR * w))
        g_down, g_mid = self.global_branch(_fold(sample, k), t, p_id, masks.astype(sample.dtype),
                                           added_cond_kwargs=global_added)
        crops = jax.vmap(jax.vmap(crop_and_resize, in_axes=(None, 0, None)), in_axes=(0, 0, None))(
            sample, boxes, size)
        l_down, l_mid = self.local_branch(
            crops.reshape(b * k, size, size, -1), t, p_id,
            landmark_images.reshape(b * k, *landmark_images.shape[2:]).astype(sample.dtype),
            added_cond_kwargs=local_added)

        global_levels = (*g_down, g_mid)
        level_hws = tuple(tuple(x.shape[1:3]) for x in global_levels)
        local_levels = jax.vmap(relocate_levels, in_axes=(0, 0, None))((*l_down, l_mid), flat_boxes, level_hws)
        return (tuple(_sum_persons(x, valid) for x in local_levels),
                tuple(_sum_persons(x, valid) for x in global_levels))

    def _persons_in_sequence(self, sample, t, persons, added_cond_kwargs, per_pass):
        """``_persons_pass`` over ``per_pass`` persons at a time in a ``lax.scan``, the sums carried in float32
        (K padded with invalid slots to a multiple of ``per_pass``); the same levels and dtypes."""
        b, k = persons[2].shape
        padded = -(-k // per_pass) * per_pass
        passes = tuple(
            jnp.moveaxis(jnp.pad(x, [(0, 0), (0, padded - k)] + [(0, 0)] * (x.ndim - 2))
                         .reshape(b, padded // per_pass, per_pass, *x.shape[2:]), 1, 0)
            for x in persons)
        one_pass = lambda group: self._persons_pass(sample, t, *group, added_cond_kwargs)  # noqa: E731
        levels = jax.eval_shape(one_pass, jax.tree.map(lambda x: x[0], passes))

        def add_pass(sums, group):
            return jax.tree.map(lambda total, x: total + x.astype(jnp.float32), sums, one_pass(group)), None

        zeros = jax.tree.map(lambda level: jnp.zeros(level.shape, jnp.float32), levels)
        sums, _ = jax.lax.scan(add_pass, zeros, passes)
        return jax.tree.map(lambda total, level: total.astype(level.dtype), sums, levels)

    def _added_conditions(self, added_cond_kwargs, flat_boxes, latent_hw, k):
        """SDXL added conditions of the global and local branches, folded to B * K (None for SD 1.5)."""
        if added_cond_kwargs is None:
            return None, None
        folded = {name: _fold(jnp.asarray(value), k) for name, value in added_cond_kwargs.items()}
        h, w = latent_hw
        pixels = VAE_SCALE_FACTOR * self.config.local_latent_size
        box_h = (flat_boxes[:, 3] - flat_boxes[:, 1]) * (VAE_SCALE_FACTOR * h)
        box_w = (flat_boxes[:, 2] - flat_boxes[:, 0]) * (VAE_SCALE_FACTOR * w)
        zeros = jnp.zeros_like(box_h)
        crop_ids = jnp.stack([box_h, box_w, zeros, zeros, zeros + pixels, zeros + pixels], axis=-1)
        local = {**folded, "time_ids": crop_ids}
        return folded, local


# The default of ``config.realisid.branches_class``; a config without the field builds this class too.
DEFAULT_BRANCHES_CLASS = "realisid_jax.realisid.branches:RealisID"


def branches_class(config: Any) -> type[RealisID]:
    """The class of RealisID's trainable part that ``config.realisid.branches_class`` names: an import path,
    ``"package.module:Class"`` (or ``"package.module.Class"``), of ``RealisID`` or a subclass of it. The
    components, the trainer's initial weights and the pipeline all build their branches with it, so a subclass
    (an extra branch, another relocation) is trained, checkpointed and sampled with no other wiring
    (docs/guides/extending.md). A class defined in a script or notebook is ``"__main__:Class"``.

    Returns:
      the class (``RealisID`` for the default, or when the config has no such field).

    Raises:
      ValueError: the path names no importable module, no attribute of it, or something that is not a
        ``RealisID`` subclass (one line, naming the field).
    """
    path = str(config.realisid.get("branches_class", DEFAULT_BRANCHES_CLASS))
    if path == DEFAULT_BRANCHES_CLASS:
        return RealisID
    module_name, colon, attr = path.partition(":")
    if not colon:
        module_name, _, attr = path.rpartition(".")
    where = f"config.realisid.branches_class={path!r}"
    if not module_name or not attr:
        raise ValueError(f"{where}: give an import path, package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{where}: cannot import {module_name!r} ({err})") from err
    cls = module
    for name in attr.split("."):
        if not hasattr(cls, name):
            raise ValueError(f"{where}: {module_name!r} has no {attr!r}")
        cls = getattr(cls, name)
    if not (isinstance(cls, type) and issubclass(cls, RealisID)):
        raise ValueError(f"{where}: {attr!r} is not a subclass of {DEFAULT_BRANCHES_CLASS.replace(':', '.')}")
    return cls

