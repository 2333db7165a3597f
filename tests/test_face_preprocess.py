"""Reference preprocessing (square box, zero padding, masking, CLIP normalisation, crop frame)."""
import numpy as np
import pytest
import skimage.data

from realisid_jax.face.analysis import Face, FaceAnalyzer
from realisid_jax.face.preprocess import (
    CLIP_MEAN, CLIP_STD, crop_box, normalize, preprocess_reference, square_box, to_box_frame)

ASTRONAUT = skimage.data.astronaut()
ZERO = (0.0 - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)


def _face(box, mask_box, shape=(512, 512)):
    """A hand-made Face: rectangular mask, landmarks spread over the box."""
    mask = np.zeros(shape, bool)
    x0, y0, x1, y1 = mask_box
    mask[y0:y1, x0:x1] = True
    rng = np.random.default_rng(0)
    b = np.asarray(box, np.float32)
    pts = (b[:2] + rng.random((468, 2)) * (b[2:] - b[:2])).astype(np.float32)
    return Face(b, 0.9, pts, mask, 0.99, b)


def test_square_box_keeps_centre_and_longer_side():
    np.testing.assert_allclose(square_box((10, 20, 30, 60)), (0, 20, 40, 60))
    np.testing.assert_allclose(square_box((0, 0, 8, 2)), (0, -3, 8, 5))
    assert square_box((1, 2, 3, 4)).dtype == np.float32


def test_crop_box_exact_and_zero_padded():
    img = np.arange(10 * 10 * 3, dtype=np.uint8).reshape(10, 10, 3)
    np.testing.assert_array_equal(crop_box(img, (2, 3, 6, 7), 4), img[3:7, 2:6])
    flat = np.full((10, 10, 3), 200, np.uint8)
    out = crop_box(flat, (-10, -10, 10, 10), 20)
    assert np.all(out[:10, :10] == 0) and np.all(out[10:, 10:] == 200)
    assert np.all(out[:9, 11:] == 0) and np.all(out[11:, :9] == 0)


def test_to_box_frame():
    np.testing.assert_allclose(to_box_frame(np.array([[50, 50], [250, 150]]), (50, 50, 250, 250)),
                               [[0, 0], [1, 0.5]])


def test_normalize_values():
    px = np.array([[0, 128, 255]], np.uint8).reshape(1, 1, 3)
    want = (px / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(normalize(px), want, rtol=1e-6)


def test_reference_square_masked_normalised():
    face = _face((100, 50, 200, 250), (120, 100, 180, 200))
    ref = preprocess_reference(ASTRONAUT, face)
    np.testing.assert_allclose(ref.square_box, (50, 50, 250, 250))
    assert ref.pixels.shape == (224, 224, 3) and ref.pixels.dtype == np.float32
    assert ref.crop.shape == (224, 224, 3) and ref.crop.dtype == np.uint8
    assert ref.mask.shape == (224, 224) and ref.mask.dtype == bool
    # Mask box (120, 100)-(180, 200) in the 200-px square at 224/200 scale.
    ys, xs = np.nonzero(ref.mask)
    np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1],
                               np.array([70, 50, 130, 150]) * 224 / 200, atol=1.5)
    np.testing.assert_allclose(ref.pixels[~ref.mask], np.broadcast_to(ZERO, (np.sum(~ref.mask), 3)),
                               rtol=1e-6)
    np.testing.assert_allclose(ref.pixels, normalize(ref.crop), rtol=1e-6)
    # Inside the mask the crop is the photo, resampled: compare with a plain crop-and-resize.
    plain = crop_box(ASTRONAUT, (50, 50, 250, 250), 224)
    np.testing.assert_array_equal(ref.crop[ref.mask], plain[ref.mask])
    assert np.abs(plain[112, 112].astype(int) - ASTRONAUT[150, 150]).max() < 20
    np.testing.assert_allclose(ref.landmarks, (face.landmarks - 50) / 200, rtol=1e-5, atol=1e-6)


def test_reference_out_of_image_is_zero():
    face = _face((-40, -40, 60, 60), (0, 0, 60, 60))
    ref = preprocess_reference(ASTRONAUT, face, size=100)
    assert np.all(ref.crop[:35, :] == 0) and np.all(ref.crop[:, :35] == 0)
    assert ref.crop[70, 70].any()
    np.testing.assert_allclose(ref.pixels[10, 10], ZERO, rtol=1e-6)


def test_reference_custom_encoder_config():
    face = _face((100, 50, 200, 250), (0, 0, 512, 512))
    ref = preprocess_reference(ASTRONAUT, face, size=336, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert ref.pixels.shape == (336, 336, 3)
    assert ref.pixels.min() >= -1 and ref.pixels.max() <= 1
    np.testing.assert_allclose(ref.pixels, ref.crop / 127.5 - 1, atol=1e-6)


def test_reference_rejects_mismatched_mask():
    with pytest.raises(ValueError, match="mask"):
        preprocess_reference(ASTRONAUT[:256], _face((100, 50, 200, 250), (0, 0, 10, 10)))


def test_reference_from_real_analysis(face_models):
    (face,) = FaceAnalyzer().analyze(ASTRONAUT)
    ref = preprocess_reference(ASTRONAUT, face)
    assert np.all((ref.landmarks >= -0.01) & (ref.landmarks <= 1.01))
    # The box is the landmarks' box: the longer side spans the square exactly.
    span = ref.landmarks.max(0) - ref.landmarks.min(0)
    assert span.max() == pytest.approx(1.0, abs=1e-4)
    assert 0.5 < ref.mask.mean() < 0.85  # an oval in its bounding square (measured 0.72)
    assert np.all(ref.crop[~ref.mask] == 0) and ref.crop[ref.mask].mean() > 60
