"""load_image / as_rgb8: every pixel format a photo arrives in, bad files, and same face after."""
import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from realisid_jax.face.analysis import FaceAnalyzer
from realisid_jax.face.detect import box_iou
from realisid_jax.face.errors import ImageReadError, NoFaceError
from realisid_jax.face.image import as_rgb8, load_image

ASTRONAUT = skimage.data.astronaut()
GRAY = cv2.cvtColor(ASTRONAUT, cv2.COLOR_RGB2GRAY)


@pytest.fixture(scope="module")
def analyzer(face_models):
    return FaceAnalyzer()


def _exif_rotated_jpeg(path):
    """Stored pixels turned 90° counter-clockwise, EXIF Orientation 6 ("rotate 90° CW to view")."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(ASTRONAUT, 1)).save(path, quality=95, exif=exif)


def _rgba_png(path):
    rgba = np.dstack([ASTRONAUT, np.full(GRAY.shape, 255, np.uint8)])
    Image.fromarray(rgba).save(path, compress_level=1)


def _rgb16_png(path):
    bgr16 = ASTRONAUT[..., ::-1].astype(np.uint16) * 257
    cv2.imwrite(str(path), bgr16, [cv2.IMWRITE_PNG_COMPRESSION, 1])


def _gray16_png(path):
    Image.fromarray(GRAY.astype(np.uint16) * 257).save(path, compress_level=1)


def _gray_png(path):
    Image.fromarray(GRAY).save(path, compress_level=1)


def test_rgb_png_roundtrip(tmp_path):
    Image.fromarray(ASTRONAUT).save(tmp_path / "a.png", compress_level=1)
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (512, 512, 3)
    np.testing.assert_array_equal(out, ASTRONAUT)


@pytest.mark.parametrize("writer, expected, tol", [
    (_rgb16_png, ASTRONAUT, 0),
    (_rgba_png, ASTRONAUT, 0),
    (_gray16_png, np.dstack([GRAY] * 3), 0),
    (_gray_png, np.dstack([GRAY] * 3), 0),
    (_exif_rotated_jpeg, ASTRONAUT, 12),
])
def test_formats_decode_to_display_rgb8(tmp_path, writer, expected, tol):
    path = tmp_path / f"img{'.jpg' if writer is _exif_rotated_jpeg else '.png'}"
    writer(path)
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == expected.shape
    err = np.abs(out.astype(int) - expected.astype(int))
    assert err.mean() <= tol / 4 and np.percentile(err, 99) <= tol + 1e-9


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    Image.fromarray(rgba).save(tmp_path / "t.png")
    out = load_image(tmp_path / "t.png")
    np.testing.assert_array_equal(out[0, 0], (10, 20, 30))
    np.testing.assert_array_equal(out[1, 1], (255, 255, 255))


def test_as_rgb8_arrays():
    np.testing.assert_array_equal(as_rgb8(np.array([[0.0, 1.0]])), [[[0] * 3, [255] * 3]])
    np.testing.assert_array_equal(as_rgb8(np.array([[65535]], np.uint16)), [[[255] * 3]])
    np.testing.assert_array_equal(as_rgb8(ASTRONAUT), ASTRONAUT)
    with pytest.raises(ValueError, match="shape"):
        as_rgb8(np.zeros((4, 4, 2)))


@pytest.mark.parametrize("content", [b"", b"this is not an image\n", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_bad_files_name_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match="broken.png"):
        load_image(path)


def test_truncated_jpeg(tmp_path):
    Image.fromarray(ASTRONAUT).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="nope.png.*not found"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize("writer", [_gray_png, _gray16_png, _rgba_png, _rgb16_png,
                                    _exif_rotated_jpeg])
def test_same_face_as_rgb_original(tmp_path, analyzer, writer):
    (ref,) = analyzer.analyze(ASTRONAUT)
    path = tmp_path / f"img{'.jpg' if writer is _exif_rotated_jpeg else '.png'}"
    writer(path)
    (face,) = analyzer.analyze_file(path)
    assert box_iou(face.box, ref.box)[0, 0] > 0.9
    assert np.abs(face.landmarks - ref.landmarks).mean() < 2.0


def test_analyze_file_errors_name_the_file(tmp_path, analyzer):
    Image.fromarray(np.full((200, 200), 128, np.uint8)).save(tmp_path / "flat.png")
    with pytest.raises(NoFaceError, match="flat.png"):
        analyzer.analyze_file(tmp_path / "flat.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageReadError, match="notes.txt"):
        analyzer.analyze_file(tmp_path / "notes.txt")
