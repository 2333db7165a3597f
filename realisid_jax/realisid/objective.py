"""RealisID's training objective: the face-weighted noise-prediction loss (paper Eq. 7) and condition dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from realisid_jax.realisid.ops import location_mask


def face_masks(boxes: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """c_loc of every sample on the latent grid: boxes (B, 4) normalised [0, 1] -> (B, h, w, 1) float32 in [0, 1]."""
    return jax.vmap(lambda box: location_mask(box, hw))(boxes)


def face_weighted_loss(pred: jax.Array, target: jax.Array, mask: jax.Array,
                       face_weight: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Eq. 7: ``mean((pred - target)^2) + face_weight * mean(((pred - target) * c_loc)^2)``.

    Means over all elements (this project's default; the paper writes squared norms). Computed in float32
    whatever the model's dtype.

    Args:
      pred, target: (B, h, w, C) predicted and true noise (epsilon).
      mask: (B, h, w, 1) c_loc on the latent grid, broadcast over channels.
      face_weight: lambda (``config.train.face_loss_weight``).

    Returns:
      ``(loss, mse, face_mse)``, float32 scalars.
    """
    err = pred.astype(jnp.float32) - target.astype(jnp.float32)
    mse = jnp.mean(jnp.square(err))
    face = jnp.mean(jnp.square(err * mask.astype(jnp.float32)))
    return mse + face_weight * face, mse, face


def condition_dropout(key: jax.Array, batch: int, drop_id: float, drop_text: float,
                      drop_both: float) -> tuple[jax.Array, jax.Array]:
    """Per-sample dropout of the conditions (paper: p = 0.05 each for ID only, text only, both).

    One uniform draw per sample picks exactly one of the disjoint events, so the three probabilities are
    exact (they must sum to at most 1).

    Returns:
      ``(no_id, no_text)``: (B,) bool; ``no_id`` zeroes the image features, ``no_text`` uses the
      empty prompt.
    """
    u = jax.random.uniform(key, (batch,))
    only_id = u < drop_id
    only_text = (u >= drop_id) & (u < drop_id + drop_text)
    both = (u >= drop_id + drop_text) & (u < drop_id + drop_text + drop_both)
    return only_id | both, only_text | both
