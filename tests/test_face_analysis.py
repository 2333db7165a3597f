"""FaceAnalyzer on real photos shipped in scikit-image (astronaut, LFW subset), policies, errors.

Reference values were read off the photos by hand (pixel grid overlay), not from the detector:
astronaut, 512x512: face hairline-to-chin, cheek-to-cheek (177, 77, 263, 180); eye centres
(202, 101) (image left) and (246, 104); mouth centre y 144. The landmark box measured here is
(178.4, 69.8, 271.8, 176.9), IoU 0.81 with the hand box (the landmark oval reaches under the
hair on the forehead and the image-right cheek).
"""
import time

import cv2
import numpy as np
import pytest
import skimage.data

from realisid_jax.face import mesh
from realisid_jax.face.analysis import Face, FaceAnalyzer
from realisid_jax.face.detect import Detection, HaarCascadeDetector, box_iou
from realisid_jax.face.errors import FaceTooSmallError, NoFaceError

ASTRONAUT_FACE = np.array([177, 77, 263, 180], np.float32)
ASTRONAUT_EYES = np.array([[202, 101], [246, 104]], np.float32)  # subject's right, left
ASTRONAUT_MOUTH_Y = 144.0


@pytest.fixture(scope="module")
def analyzer(face_models):
    return FaceAnalyzer(policy="all")


@pytest.fixture(scope="module")
def astronaut():
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def astronaut_face(analyzer, astronaut) -> Face:
    (face,) = analyzer.analyze(astronaut)
    return face


def test_astronaut_box_matches_hand_annotation(astronaut_face):
    iou = float(box_iou(astronaut_face.box, ASTRONAUT_FACE)[0, 0])
    print(f"astronaut box {astronaut_face.box.round(1)}, IoU with hand box {iou:.3f}")
    assert iou >= 0.70
    assert astronaut_face.score >= 0.8
    assert astronaut_face.landmark_score >= 0.9


def test_astronaut_landmarks_in_place(astronaut_face):
    pts = astronaut_face.landmarks
    assert pts.shape == (468, 2) and pts.dtype == np.float32
    grown = ASTRONAUT_FACE + np.array([-12, -12, 12, 12], np.float32)
    assert np.all((pts >= grown[:2]) & (pts <= grown[2:]))
    eyes = np.stack([pts[list(mesh.RIGHT_EYE)].mean(0), pts[list(mesh.LEFT_EYE)].mean(0)])
    np.testing.assert_allclose(eyes, ASTRONAUT_EYES, atol=6)
    mouth_y = pts[[mesh.UPPER_LIP, mesh.LOWER_LIP]].mean(0)[1]
    assert abs(mouth_y - ASTRONAUT_MOUTH_Y) < 8
    assert eyes[:, 1].max() < mouth_y - 25  # eyes above the mouth
    assert pts[mesh.FOREHEAD, 1] < eyes[:, 1].min() < pts[mesh.CHIN, 1]


def test_astronaut_mask_is_the_face(astronaut_face, astronaut):
    mask = astronaut_face.mask
    assert mask.shape == astronaut.shape[:2] and mask.dtype == bool
    ys, xs = np.nonzero(mask)
    np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1],
                               astronaut_face.box, atol=2)
    assert mask[int(ASTRONAUT_EYES[0, 1]), int(ASTRONAUT_EYES[0, 0])]
    assert not mask[300, 256] and not mask[30, 220]  # suit, hair


def test_lfw_detection_and_false_positive_rates(analyzer):
    images = skimage.data.lfw_subset()  # 100 faces then 100 non-faces, 25x25 float
    start = time.perf_counter()
    found = []
    for img in images:
        try:
            found.append(bool(analyzer.analyze(img, policy="largest")))
        except FaceTooSmallError:
            found.append(True)
        except NoFaceError:
            found.append(False)
    found = np.array(found)
    rate, fp = found[:100].mean(), found[100:].mean()
    print(f"LFW subset: detection rate {rate:.2f}, false-positive rate {fp:.2f} "
          f"({time.perf_counter() - start:.1f} s)")
    assert rate >= 0.95  # measured 1.00
    assert fp <= 0.05  # measured 0.00


def test_lfw_faces_are_too_small_by_default(analyzer):
    face = skimage.data.lfw_subset()[0]
    with pytest.raises(FaceTooSmallError, match=r"minimum of 32 px") as info:
        analyzer.analyze(face, source="lfw0.png")
    assert "lfw0.png" in str(info.value) and info.value.min_size == 32


def _two_faces(astronaut):
    """1024² grey canvas, the astronaut at full size and at half size (faces ~107 and ~54 px)."""
    canvas = np.full((1024, 1024, 3), 128, np.uint8)
    canvas[20:532, 20:532] = astronaut
    canvas[600:856, 700:956] = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    return canvas


def test_several_faces_and_policies(analyzer, astronaut):
    canvas = _two_faces(astronaut)
    faces = analyzer.analyze(canvas, policy="all")
    assert len(faces) == 2
    big, small = faces
    assert big.size > small.size  # largest first
    assert box_iou(big.box, ASTRONAUT_FACE + 20)[0, 0] > 0.7
    assert box_iou(small.box, ASTRONAUT_FACE / 2 + np.array([700, 600, 700, 600]))[0, 0] > 0.6
    (largest,) = analyzer.analyze(canvas, policy="largest")
    np.testing.assert_array_equal(largest.box, big.box)
    (best,) = analyzer.analyze(canvas, policy="highest_score")
    assert best.score == max(f.score for f in faces)
    with pytest.raises(ValueError, match="policy"):
        analyzer.analyze(canvas, policy="biggest")


def test_small_face_found_by_tiles(analyzer, astronaut):
    """A face 1/19 of the image edge (the paper's small faces are < 1/6) needs the tile pass."""
    canvas = np.full((1024, 1024, 3), 128, np.uint8)
    canvas[600:856, 300:556] = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    (face,) = analyzer.analyze(canvas)
    assert 45 < face.size < 65
    assert analyzer.detector.min_tile_px <= 1024 / analyzer.detector.tile_divisions


def test_no_face_in_flat_grey(analyzer):
    with pytest.raises(NoFaceError, match="grey.png"):
        analyzer.analyze(np.full((256, 256, 3), 128, np.uint8), source="grey.png")


def test_too_small_threshold_is_configurable(analyzer, astronaut):
    strict = FaceAnalyzer(analyzer.detector, analyzer.landmarker, min_face_px=200)
    with pytest.raises(FaceTooSmallError, match="minimum of 200 px"):
        strict.analyze(astronaut)


def test_haar_backend_plugs_in(analyzer, astronaut, astronaut_face):
    haar = FaceAnalyzer(HaarCascadeDetector(), analyzer.landmarker)
    (face,) = haar.analyze(astronaut)
    # Landmark refinement makes the box independent of the detector.
    assert box_iou(face.box, astronaut_face.box)[0, 0] > 0.9


def test_custom_detector_protocol(analyzer, astronaut, astronaut_face):
    class FixedBox:
        def __call__(self, image):
            return [Detection(np.array([160, 60, 290, 190], np.float32), 0.7)]

    (face,) = FaceAnalyzer(FixedBox(), analyzer.landmarker).analyze(astronaut)
    assert face.score == pytest.approx(0.7)
    assert box_iou(face.box, astronaut_face.box)[0, 0] > 0.9

    class WrongPlace:
        def __call__(self, image):
            return [Detection(np.array([380, 300, 500, 420], np.float32), 0.9)]  # helmet

    with pytest.raises(NoFaceError):
        FaceAnalyzer(WrongPlace(), analyzer.landmarker).analyze(astronaut)
