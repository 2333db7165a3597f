"""Jitted face ops of RealisID: crop + up-sample (local branch input), relocation R (Eq. 4), location mask c_loc.

Conventions (project-wide):
  * A box is ``(x0, y0, x1, y1)`` float32 **normalised to [0, 1]** of the image width / height, in
    continuous coordinates: the image spans ``[0, 1] x [0, 1]`` and cell ``(i, j)`` of an (h, w) grid covers
    ``[j/w, (j+1)/w] x [i/h, (i+1)/h]``, its centre at ``((j+0.5)/w, (i+0.5)/h)`` (the host-side pixel
    convention of ``realisid_jax.face.detect`` divided by the image size). So one box serves every latent
    level and the pixel-space masks, with sub-pixel precision. A box may extend past the image; a
    degenerate box (``x1 <= x0`` or ``y1 <= y0``) selects nothing.
  * Arrays are channels-last and unbatched, ``(H, W, C)``; boxes are data (traced), output sizes are static.
    Batch over images and persons with ``jax.vmap``.
  * Every op is a separable resampling ``out = Wy @ x @ Wx^T`` with per-axis weight matrices built from the
    box: static shapes, differentiable with respect to both the array and the box, and MXU-friendly (no
    gathers). The matmuls run at ``Precision.HIGHEST`` so that identity weights stay exact on TPU, where the
    default float32 matmul rounds its inputs to bfloat16.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Box widths are divided by in ``relocate``; a degenerate box must give zeros, not NaNs (padded persons).
_MIN_EXTENT = 1e-6


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _filter(centres: jax.Array, step: jax.Array, n: int) -> jax.Array:
    """(len(centres), n) resampling weights of a length-``n`` axis, each row summing to 1.

    A triangle of half-width ``max(step, 1)`` input cells centred at each cell-index ``centres[i]``: bilinear
    when enlarging (``step <= 1``), and when shrinking an antialiased (area-like) filter whose support spans
    the output cell's neighbourhood, so every input cell contributes and a zero-mean pattern averages out
    (PIL's / ``jax.image.scale_and_translate(antialias=True)``'s triangle filter). Centres are clamped so the
    footprint stays inside the axis rather than being cut at its end, where a truncated filter would no
    longer average out; for ``step <= 1`` this is the usual border clamp, so integer centres give exactly
    the identity rows.
    """
    half = jnp.maximum(step, 1.0)
    lo = jnp.minimum(half - 1.0, (n - 1) / 2)
    hi = jnp.maximum(n - half, (n - 1) / 2)
    centres = jnp.clip(centres, lo, hi)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(centres[:, None] - jnp.arange(n, dtype=jnp.float32)[None, :]) / half)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def _coverage(lo: jax.Array, hi: jax.Array, n: int) -> jax.Array:
    """(n,) fraction of each of the ``n`` cells of [0, 1] that the interval [lo, hi] covers, in [0, 1]."""
    # In cell units, so that a full box covers every cell exactly once.
    start = jnp.arange(n, dtype=jnp.float32)
    overlap = jnp.minimum(start + 1.0, hi * n) - jnp.maximum(start, lo * n)
    return jnp.clip(overlap, 0.0, 1.0)


def _resample(x: jax.Array, wy: jax.Array, wx: jax.Array) -> jax.Array:
    """(H, W, C) -> (h, w, C) with wy (h, H), wx (w, W)."""
    return jnp.einsum("yh,hwc,xw->yxc", wy.astype(x.dtype), x, wx.astype(x.dtype),
                      precision=jax.lax.Precision.HIGHEST)


def crop_and_resize(latent: jax.Array, box: jax.Array, size: int | Sequence[int]) -> jax.Array:
    """Resamples the ``box`` region of ``latent`` onto a fixed ``size`` grid (RealisID's ẑ_t, Eq. 5).

    Half-pixel-centre convention. Enlarging (the usual case, a face smaller than S latent cells) is bilinear,
    one sample per output cell (``torchvision.ops.roi_align(aligned=True, sampling_ratio=1)``); shrinking (a
    face larger than S) widens the triangle filter by the scale, so every latent cell in the box contributes
    (see ``_filter``). Sample positions are clamped to the border: a full-image box with ``size == (H, W)`` is
    exactly the identity.

    Args:
      latent: (H, W, C) float array.
      box: (4,) float ``(x0, y0, x1, y1)`` normalised to [0, 1].
      size: static output size, an int (square) or ``(size_h, size_w)``.

    Returns:
      (size_h, size_w, C), dtype of ``latent``. Differentiable in ``latent`` and ``box``.
    """
    out_h, out_w = _pair(size)
    height, width = latent.shape[:2]
    box = box.astype(jnp.float32)
    x0, y0, x1, y1 = box[0], box[1], box[2], box[3]
    # Output cell centre -> index space of the input's cell centres; the step is exactly 1 for a full box
    # with size == (H, W), so that case is the exact identity.
    step_y = (y1 - y0) * height / out_h
    step_x = (x1 - x0) * width / out_w
    sy = y0 * height + (jnp.arange(out_h, dtype=jnp.float32) + 0.5) * step_y - 0.5
    sx = x0 * width + (jnp.arange(out_w, dtype=jnp.float32) + 0.5) * step_x - 0.5
    return _resample(latent, _filter(sy, step_y, height), _filter(sx, step_x, width))


def location_mask(box: jax.Array, hw: Sequence[int]) -> jax.Array:
    """c_loc: (h, w, 1) float32, 1 inside ``box``, 0 outside, each border cell's covered fraction in between.

    Its sum is the box's area in cells (for the part inside the image), so sub-pixel boxes are exact.
    """
    box = box.astype(jnp.float32)
    height, width = _pair(hw)
    cover = _coverage(box[1], box[3], height)[:, None] * _coverage(box[0], box[2], width)[None, :]
    return cover[..., None]


def relocate(residual: jax.Array, box: jax.Array, hw: Sequence[int]) -> jax.Array:
    """RealisID's relocation R (Eq. 4): resizes a local residual back to the box's extent on an (h, w) grid.

    Each output cell takes the filtered value of ``residual`` (stretched over the box, half-pixel centres) at
    its centre, times the fraction of the cell that the box covers. The filter is bilinear when the box spans
    more cells than the residual and, when it spans fewer (small faces: the local residual shrinks 2x-8x),
    a triangle widened by the scale (``_filter``): every residual cell contributes, a zero-mean pattern stays
    ≈ 0 and the mass (sum x cell area) is kept within about 1%. The result is exactly zero outside the box,
    sub-pixel exact at its border, and defined for boxes smaller than one cell (deepest levels). A full-image
    box with ``residual.shape[:2] == hw`` is exactly the identity.

    Args:
      residual: (S_h, S_w, C) float array, one level of the local ControlNet's output.
      box: (4,) float ``(x0, y0, x1, y1)`` normalised to [0, 1].
      hw: static (h, w) of this level at the whole latent's resolution.

    Returns:
      (h, w, C), dtype of ``residual``. Differentiable in ``residual`` and ``box``.
    """
    height, width = _pair(hw)
    src_h, src_w = residual.shape[:2]
    box = box.astype(jnp.float32)
    x0, y0, x1, y1 = box[0], box[1], box[2], box[3]
    # Output cell centre -> index space of the residual's cell centres (inverse of crop_and_resize's map),
    # in output-cell units so that a full box with S == (h, w) has step exactly 1.
    step_y = src_h / (jnp.maximum(y1 - y0, _MIN_EXTENT) * height)
    step_x = src_w / (jnp.maximum(x1 - x0, _MIN_EXTENT) * width)
    sy = ((jnp.arange(height, dtype=jnp.float32) + 0.5) - y0 * height) * step_y - 0.5
    sx = ((jnp.arange(width, dtype=jnp.float32) + 0.5) - x0 * width) * step_x - 0.5
    wy = _coverage(y0, y1, height)[:, None] * _filter(sy, step_y, src_h)
    wx = _coverage(x0, x1, width)[:, None] * _filter(sx, step_x, src_w)
    return _resample(residual, wy, wx)


def relocate_levels(residuals: Sequence[jax.Array], box: jax.Array,
                    level_hws: Sequence[Sequence[int]]) -> tuple[jax.Array, ...]:
    """``relocate`` of every level of a ControlNet's output: ``residuals[i]`` onto ``level_hws[i]``.

    Raises:
      ValueError: if the numbers of residuals and of level sizes differ.
    """
    if len(residuals) != len(level_hws):
        raise ValueError(f"{len(residuals)} residuals but {len(level_hws)} level sizes")
    return tuple(relocate(r, box, hw) for r, hw in zip(residuals, level_hws))
