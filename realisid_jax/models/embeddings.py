"""Timestep embeddings of the UNet and ControlNet: sinusoidal ``Timesteps``, the ``TimestepEmbedding`` MLP and
SDXL's ``text_time`` added condition (pooled text embeds + sinusoidal micro-conditioning time ids).

Mirrors diffusers ``models/embeddings.py`` (``get_timestep_embedding``, ``Timesteps``, ``TimestepEmbedding``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realisid_jax.models.layers import linear


def timestep_embedding(timesteps: jax.Array, embedding_dim: int, *, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0, max_period: int = 10000) -> jax.Array:
    """DDPM sinusoidal embedding, as diffusers ``get_timestep_embedding``.

    Args:
      timesteps: (N,) integer or float timesteps (fractional allowed).
      embedding_dim: output width; an odd width gets one zero column at the end.
      flip_sin_to_cos: order ``[cos, sin]`` instead of ``[sin, cos]``.
      downscale_freq_shift: frequencies are ``max_period ** (-k / (half - shift))``.

    Returns:
      (N, embedding_dim) float32.
    """
    half = embedding_dim // 2
    # Frequencies are host constants: torch computes them in float32 on every call, rounding them exactly
    # as numpy's float32 exp does; only the product with the (traced) timesteps is device work.
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / np.float32(half - downscale_freq_shift)
    freqs = np.exp(exponent.astype(np.float32))
    args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * freqs[None, :] * scale
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if embedding_dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Timesteps(nnx.Module):
    """Parameter-free sinusoidal projection, diffusers ``Timesteps``: (N,) -> (N, num_channels) float32."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1.0):
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def __call__(self, timesteps: jax.Array) -> jax.Array:
        return timestep_embedding(timesteps, self.num_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                                  downscale_freq_shift=self.downscale_freq_shift, scale=self.scale)


class TimestepEmbedding(nnx.Module):
    """``linear_1`` -> SiLU -> ``linear_2``: (B, in_channels) -> (B, out_dim or time_embed_dim).

    Mirrors diffusers ``TimestepEmbedding`` with ``act_fn="silu"``, no ``cond_proj``, no post-activation (the
    SD1.5/SDXL time embedding and SDXL's ``add_embedding``).
    """

    def __init__(self, in_channels: int, time_embed_dim: int, *, out_dim: int | None = None, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = linear(in_channels, time_embed_dim, ("embed", "mlp"), **kw)
        self.linear_2 = linear(time_embed_dim, out_dim or time_embed_dim, ("mlp", "embed"), **kw)

    def __call__(self, sample: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(sample)))


def broadcast_timesteps(timesteps: jax.Array | int | float, batch: int) -> jax.Array:
    """A scalar or (B,) timestep as a (B,) float32 vector, as diffusers ``timesteps.expand(batch)``.

    Raises:
      ValueError: ``timesteps`` is neither a scalar nor of length 1 or ``batch``.
    """
    t = jnp.asarray(timesteps).astype(jnp.float32).reshape(-1)
    if t.shape[0] not in (1, batch):
        raise ValueError(f"timesteps must be a scalar or have shape ({batch},), got {jnp.shape(timesteps)}")
    return jnp.broadcast_to(t, (batch,))


def text_time_input(add_time_proj: Timesteps, added_cond_kwargs: dict[str, jax.Array] | None) -> jax.Array:
    """SDXL ``text_time`` added-condition input: ``concat(text_embeds, add_time_proj(time_ids))``.

    Args:
      add_time_proj: the model's ``add_time_proj`` (``addition_time_embed_dim`` channels per time id).
      added_cond_kwargs: ``{"text_embeds": (B, pooled_dim), "time_ids": (B, n_ids)}``; SDXL's time ids are
        ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.

    Returns:
      (B, pooled_dim + n_ids * addition_time_embed_dim) float32, the input of ``add_embedding``.

    Raises:
      ValueError: ``added_cond_kwargs`` is missing or lacks ``text_embeds`` / ``time_ids``.
    """
    missing = [k for k in ("text_embeds", "time_ids") if k not in (added_cond_kwargs or {})]
    if missing:
        raise ValueError(f"addition_embed_type='text_time' needs added_cond_kwargs with {missing} "
                         "(SDXL: pooled text embeds (B, D) and time ids (B, 6))")
    text_embeds = jnp.asarray(added_cond_kwargs["text_embeds"])
    time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
    time_embeds = add_time_proj(time_ids.reshape(-1)).reshape(text_embeds.shape[0], -1)
    return jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
