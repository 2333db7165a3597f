"""Face ops: crop + up-sample, relocation R, location mask (boxes normalised to [0, 1])."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realisid_jax.realisid.ops import crop_and_resize, location_mask, relocate, relocate_levels

FULL = jnp.array([0.0, 0.0, 1.0, 1.0])
# Jitted once per static size: op-by-op dispatch would compile every primitive separately.
crop_jit = jax.jit(crop_and_resize, static_argnums=2)
relocate_jit = jax.jit(relocate, static_argnums=2)
mask_jit = jax.jit(location_mask, static_argnums=1)


def _rand(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _cells_inside(box, hw):
    """Boolean (h, w): cells that overlap the box with positive area."""
    h, w = hw
    x0, y0, x1, y1 = np.asarray(box, np.float64)
    rows = (np.arange(h) + 1) / h > y0
    rows &= np.arange(h) / h < y1
    cols = (np.arange(w) + 1) / w > x0
    cols &= np.arange(w) / w < x1
    return rows[:, None] & cols[None, :]


@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
def test_full_box_is_identity(hw):
    x = _rand((*hw, 3))
    crop, back = jax.jit(lambda x, b: (crop_and_resize(x, b, hw), relocate(x, b, hw)))(x, FULL)
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


def test_crop_matches_reference_bilinear():
    """Against an independent per-sample bilinear (half-pixel centres, border clamp) on a non-square latent."""
    x = np.asarray(_rand((6, 10, 2)))
    box = np.array([0.13, 0.27, 0.71, 0.94], np.float32)
    out = np.asarray(crop_jit(jnp.asarray(x), jnp.asarray(box), (5, 7)))
    ref = np.zeros_like(out)
    for i in range(5):
        for j in range(7):
            py = np.clip((box[1] + (i + 0.5) / 5 * (box[3] - box[1])) * 6 - 0.5, 0, 5)
            px = np.clip((box[0] + (j + 0.5) / 7 * (box[2] - box[0])) * 10 - 0.5, 0, 9)
            i0, j0 = int(np.floor(py)), int(np.floor(px))
            i1, j1 = min(i0 + 1, 5), min(j0 + 1, 9)
            fy, fx = py - i0, px - j0
            ref[i, j] = ((1 - fy) * ((1 - fx) * x[i0, j0] + fx * x[i0, j1])
                         + fy * ((1 - fx) * x[i1, j0] + fx * x[i1, j1]))
    np.testing.assert_allclose(out, ref, atol=1e-5)


BOXES = [
    [0.25, 0.125, 0.75, 0.625],      # cell-aligned
    [0.0, 0.6, 0.3, 1.0],            # touching the border
    [0.8, -0.1, 1.2, 0.3],           # past the border
    [0.31, 0.42, 0.37, 0.49],        # sub-cell at 8x8
    [0.5, 0.25, 0.625, 0.375],       # exactly one cell at 8x8
]


@pytest.mark.parametrize("hw", [(8, 8), (4, 6), (2, 2)])
def test_relocate_zero_outside_box(hw):
    r = _rand((4, 4, 3)) + 5.0  # no accidental zeros inside
    outs = np.asarray(jax.jit(jax.vmap(lambda b: relocate(r, b, hw)))(jnp.asarray(BOXES)))
    for box, out in zip(BOXES, outs):
        inside = _cells_inside(box, hw)
        assert inside.any()
        assert np.all(out[~inside] == 0.0)
        assert np.all(np.abs(out[inside]) > 0.0)


def test_relocate_cell_aligned_box_resizes():
    """A box of exactly 2x2 cells receives the 2x2 residual unchanged (coverage 1, sample at cell centres)."""
    r = _rand((2, 2, 3))
    box = jnp.array([0.25, 0.5, 0.5, 1.0])  # cols 2..3 of 8, rows 2..3 of 4
    out = np.array(relocate_jit(r, box, (4, 8)))
    np.testing.assert_array_equal(out[2:4, 2:4], np.asarray(r))
    out[2:4, 2:4] = 0
    assert np.all(out == 0)


def test_sub_cell_box_scales_by_coverage():
    """A box inside one cell: only that cell is non-zero, equal to (covered fraction) x the residual's value."""
    r = jnp.full((4, 4, 2), 3.0)
    box = jnp.array([0.30, 0.55, 0.40, 0.70])  # inside cell (row 1, col 1) of a 2x2 grid
    out = np.asarray(relocate_jit(r, box, (2, 2)))
    expected = np.zeros((2, 2, 2), np.float32)
    expected[1, 0] = 3.0 * (0.10 * 2) * (0.15 * 2)
    np.testing.assert_allclose(out, expected, rtol=1e-5)


@pytest.mark.parametrize("box,hw", [
    ([0.1, 0.2, 0.65, 0.9], (8, 8)),
    ([0.31, 0.42, 0.37, 0.49], (16, 12)),
    ([-0.2, 0.5, 0.3, 1.4], (8, 8)),
])
def test_location_mask_sums_to_box_area(box, hw):
    mask = np.asarray(mask_jit(jnp.asarray(box), hw))
    assert mask.shape == (*hw, 1) and mask.dtype == np.float32
    x0, y0, x1, y1 = np.clip(box, 0.0, 1.0)
    np.testing.assert_allclose(mask.sum(), (x1 - x0) * hw[1] * (y1 - y0) * hw[0], rtol=1e-5)
    assert mask.min() >= 0 and mask.max() <= 1
    inside = _cells_inside(box, hw)
    assert np.all(mask[~inside] == 0) and np.all(mask[inside] > 0)


def test_location_mask_binary_when_cell_aligned():
    mask = np.asarray(mask_jit(jnp.array([0.25, 0.5, 0.75, 1.0]), (4, 8)))[..., 0]
    expected = np.zeros((4, 8), np.float32)
    expected[2:, 2:6] = 1
    np.testing.assert_array_equal(mask, expected)


def test_gradients_reach_latent_and_box():
    x = _rand((8, 8, 4))
    box = jnp.array([0.2, 0.3, 0.7, 0.8])

    def loss(x, box):
        crop = crop_and_resize(x, box, 6)
        return jnp.sum(relocate(crop * crop, box, (8, 8))) + jnp.sum(location_mask(box, (8, 8)) * x[..., :1])

    gx, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, box)
    assert np.all(np.isfinite(gx)) and np.abs(gx).sum() > 0
    assert np.all(np.isfinite(gb)) and np.all(np.abs(gb) > 0)


def test_degenerate_box_is_finite_zero():
    r = _rand((4, 4, 2))
    box = jnp.zeros(4)
    out, grad = jax.jit(jax.value_and_grad(lambda r, b: relocate(r, b, (8, 8)).sum(), argnums=(0, 1)))(r, box)
    assert float(out) == 0.0
    assert all(np.all(np.isfinite(g)) for g in grad)
    assert float(mask_jit(box, (8, 8)).sum()) == 0.0


def test_vmap_over_persons_equals_loop():
    x = _rand((12, 8, 4))
    boxes = jnp.array([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.95, 0.6], [0.3, 0.7, 0.33, 0.74]])
    levels = (_rand((3, 4, 4, 5), 1), _rand((3, 2, 2, 7), 2))
    level_hws = ((12, 8), (3, 2))

    def person(box, r0, r1):
        crop = crop_and_resize(x, box, (4, 4))
        return crop, relocate_levels((r0, r1), box, level_hws), location_mask(box, (24, 16))

    batched = jax.jit(jax.vmap(person))(boxes, *levels)
    single_person = jax.jit(person)
    for k in range(3):
        single = single_person(boxes[k], levels[0][k], levels[1][k])
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
            np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_relocate_levels_checks_lengths():
    with pytest.raises(ValueError, match="2 residuals but 1 level"):
        relocate_levels((jnp.zeros((2, 2, 1)),) * 2, FULL, ((4, 4),))


# The local branch at SDXL 1024²: latent 128, residual levels 128 / 64 / 32 fed from a 64² crop (64 / 32 / 16).
LOCAL_LEVELS = [((64, 64), (128, 128)), ((32, 32), (64, 64)), ((16, 16), (32, 32))]
FACE_FRACTIONS = [4, 7, 16]  # face side as 1/n of the image edge: relocation shrinks by 2x, 3.5x, 8x


def _face_box(fraction, x0=0.3137, y0=0.2281):
    """A square box 1/fraction of the edge at a sub-cell offset on every level."""
    return jnp.array([x0, y0, x0 + 1 / fraction, y0 + 1 / fraction])


@pytest.mark.parametrize("fraction", FACE_FRACTIONS)
def test_every_local_cell_reaches_the_unet(fraction):
    """Shrinking filter: each cell of each local residual level has a non-zero gradient (no cells skipped)."""
    box = _face_box(fraction)
    for (src, dst) in LOCAL_LEVELS:
        r = _rand((*src, 2), 3)
        weight = jnp.asarray(np.random.default_rng(4).uniform(0.5, 1.5, (*dst, 2)).astype(np.float32))
        grad = np.asarray(jax.jit(jax.grad(lambda r: jnp.sum(relocate(r, box, dst) * weight)))(r))
        assert np.all(grad != 0), f"1/{fraction}, {src}->{dst}: {(grad == 0).mean():.0%} of cells unused"


@pytest.mark.parametrize("fraction", FACE_FRACTIONS)
@pytest.mark.parametrize("axis", [0, 1])
def test_stripes_average_out(fraction, axis):
    """A one-cell ±1 stripe pattern (area mean 0) relocates to ≈ 0 everywhere, at any sub-cell offset."""
    for x0 in (0.1, 0.3137, 0.55):
        box = _face_box(fraction, x0, 0.7 * x0 + 0.01)
        for (src, dst) in LOCAL_LEVELS:
            stripes = np.broadcast_to(((-1.0) ** np.arange(src[axis])).reshape((-1, 1, 1) if axis == 0 else (1, -1, 1)),
                                      (*src, 1))
            out = np.asarray(relocate_jit(jnp.asarray(stripes, jnp.float32), box, dst))
            assert abs(out.mean()) <= 0.05 and np.abs(out).max() <= 0.05, (x0, src, np.abs(out).max())


@pytest.mark.parametrize("fraction", FACE_FRACTIONS)
def test_relocate_preserves_mass(fraction):
    """sum x cell area is the same before (cells of the box) and after (cells of the level), within 1%."""
    box = _face_box(fraction)
    side = 1 / fraction
    for (src, dst) in LOCAL_LEVELS:
        r = np.random.default_rng(5).uniform(0.5, 1.5, (*src, 1)).astype(np.float32)
        out = np.asarray(relocate_jit(jnp.asarray(r), box, dst))
        mass_in = r.sum() * side * side / (src[0] * src[1])
        mass_out = out.sum() / (dst[0] * dst[1])
        np.testing.assert_allclose(mass_out, mass_in, rtol=0.01)


def test_crop_shrinking_averages_out():
    """A face larger than the local size: the crop's shrinking filter averages a ±1 stripe pattern out."""
    stripes = jnp.asarray(np.broadcast_to(((-1.0) ** np.arange(128))[None, :, None], (128, 128, 1)), jnp.float32)
    for side in (0.9, 1.0):
        out = np.asarray(crop_jit(stripes, jnp.array([0.0371, 0.02, 0.0371 + side, 0.02 + side]), 64))
        assert np.abs(out).max() <= 0.05, side
    grad = np.asarray(jax.jit(jax.grad(lambda x: crop_and_resize(x, jnp.array([0.03, 0.05, 0.93, 0.95]), 32).sum()))(
        stripes))
    assert np.all(grad[7:121, 4:119] != 0)  # every latent cell inside the box feeds the crop
