"""Reference analysis of a subject on a plain background (glyph pictures): box, region, keypoints, errors, and the
config's choice of analysis."""

import numpy as np
import pytest

from realisid_jax.config import load_config
from realisid_jax.face.analysis import FaceAnalyzer
from realisid_jax.face.draw import square_keypoints
from realisid_jax.face.errors import NoFaceError, NoSubjectError
from realisid_jax.face.plain_background import PlainBackgroundAnalyzer
from realisid_jax.face.preprocess import preprocess_reference, to_box_frame
from realisid_jax.realisid.pipeline import reference_analyzer


def _picture(ink=(20, 20, 20), background=(240, 210, 50)):
    image = np.empty((100, 120, 3), np.uint8)
    image[:] = background
    image[30:70, 40:60] = ink  # a 20 x 40 subject
    return image


@pytest.mark.parametrize("ink", [(20, 20, 20), (250, 250, 250)])
def test_subject_box_region_and_upright_keypoints(ink):
    image = _picture(ink)
    (face,) = PlainBackgroundAnalyzer().analyze(image, source="pic.png")
    np.testing.assert_array_equal(face.box, [40, 30, 60, 70])
    # The region is the box made square by its longer edge around its centre (40 x 40 at x 30..70).
    rows, cols = np.nonzero(face.mask)
    assert (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1) == (30, 71, 30, 71)
    square = np.array([30, 30, 70, 70], np.float32)
    np.testing.assert_allclose(to_box_frame(face.landmarks, square), square_keypoints(0.0), atol=1e-5)
    # The reference crop keeps the subject on its own background, dark ink included.
    crop = preprocess_reference(image, face, size=32).crop
    assert np.abs(crop.astype(int) - np.array(ink)).sum(-1).min() < 30
    assert np.abs(crop.astype(int) - np.array([240, 210, 50])).sum(-1).min() < 30


def test_blank_picture_is_refused_with_its_name():
    with pytest.raises(NoSubjectError, match="blank.png") as error:
        PlainBackgroundAnalyzer().analyze(np.full((64, 64, 3), 200, np.uint8), source="blank.png")
    assert isinstance(error.value, NoFaceError)  # handled wherever a missing face is


def test_config_chooses_the_reference_analysis():
    assert isinstance(reference_analyzer(load_config("configs/sdxl.py:glyphs")), PlainBackgroundAnalyzer)
    assert isinstance(reference_analyzer(load_config("configs/sdxl.py:tiny")), FaceAnalyzer)
    config = load_config("configs/sdxl.py:tiny", ["--config.realisid.reference_analysis=nope"])
    with pytest.raises(ValueError, match="plain_background"):
        reference_analyzer(config)
