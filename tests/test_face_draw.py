"""Landmark image c_pe (size, determinism, positions, colours) and the annotation drawer."""
import numpy as np
import pytest

from realisid_jax.face import mesh
from realisid_jax.face.draw import CONTOUR_COLORS, POINT_COLOR, annotate, draw_landmark_image


def _landmarks(seed=0):
    return np.random.default_rng(seed).uniform(0.1, 0.9, (468, 2)).astype(np.float32)


def test_shape_dtype_black_background():
    img = draw_landmark_image(_landmarks())
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    assert not img[:40].any() and not img[-40:].any()  # outside [0.1, 0.9]: black
    assert draw_landmark_image(_landmarks(), 256).shape == (256, 256, 3)


def test_deterministic():
    a = draw_landmark_image(_landmarks())
    b = draw_landmark_image(_landmarks().copy())
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != draw_landmark_image(_landmarks(1)).tobytes()


@pytest.mark.parametrize("size", [512, 192])
def test_points_at_their_pixels(size):
    pts = _landmarks()
    img = draw_landmark_image(pts, size)
    ij = np.floor(pts[:, ::-1] * size).astype(int)
    np.testing.assert_array_equal(img[ij[:, 0], ij[:, 1]], np.broadcast_to(POINT_COLOR, (468, 3)))


@pytest.mark.parametrize("name", list(mesh.CONTOURS))
def test_contours_in_fixed_colours(name):
    """A feature's polylines laid along the row y = 0.5 (x 0.2-0.8), every other point in a corner."""
    pts = np.full((468, 2), 0.01, np.float32)
    line = list(dict.fromkeys(i for p in mesh.CONTOURS[name] for i in p))
    pts[line, 0] = np.linspace(0.2, 0.8, len(line))
    pts[line, 1] = 0.5
    img = draw_landmark_image(pts, points=False)
    first = pts[list(mesh.CONTOURS[name][0]), 0] * 512
    x0, x1 = int(first.min()) + 3, int(first.max()) - 3  # anti-aliased ends excluded
    np.testing.assert_array_equal(img[255:257, x0:x1], np.broadcast_to(
        CONTOUR_COLORS[name], (2, x1 - x0, 3)))
    assert not img[250:253].any() and not img[259:262].any()  # 2 px thick at 512


def test_annotate():
    image = np.full((64, 64, 3), 100, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    out = annotate(image, [np.array([10, 10, 50, 50], np.float32)],
                   landmarks=[np.array([[30.5, 30.5]], np.float32)], masks=[mask], scores=[0.9])
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[30, 30], POINT_COLOR)
    assert (out[25, 25] != 100).any() and (out[5, 60] == 100).all()
    assert out[30, 10, 1] > 200  # green box edge
    np.testing.assert_array_equal(image, 100)  # input untouched
