"""Canonical 3-D face: the mean Face Mesh shape of real photos, derived by this project.

``canonical_face_model()`` is a (468, 3) shape in Face Mesh landmark order (1 nose tip, 10 forehead,
152 chin). Axes: x towards the subject's left (image right for a face looking at the camera), y up,
z out of the face towards the viewer. Origin: the centroid of the 468 points. Unit: the distance
between the outer eye corners (landmarks 33 and 263) is 1.

Derivation (``derive_canonical_face``), offline on the photos shipped in scikit-image:

1. Photos: ``skimage.data.astronaut()`` and the 100 faces of ``skimage.data.lfw_subset()`` (25x25
   grey crops, bicubic up-scaled to 200 px on a 300x300 grey canvas so the detector finds them).
   BlazeFace picks the highest-scoring face, the two-pass ``FaceMeshLandmarker`` gives its
   ``points3d`` (image pixels, MediaPipe's depth); faces whose landmark presence is below
   ``MIN_LANDMARK_SCORE`` are dropped (one LFW face, presence 0.08).
2. Generalised Procrustes analysis: every face is similarity-aligned (rotation, uniform scale,
   translation; least squares) onto the current mean, the mean of the aligned faces becomes the new
   mean, until it moves less than 1e-10 (4 iterations). The mean is then turned so that the
   photos' rotations onto it average to the identity: it is the face as the average photo sees it.
3. Left-right symmetry: the sagittal plane is fitted to the mirror pairs that the contours of
   ``face.mesh`` define (eyes, eyebrows, face oval, lips, nose: 68 left-right pairs and 16 midline
   points) and turned onto x = 0, which fixes yaw and roll. The mirror partner of every one of the
   468 points is then its nearest neighbour in the mirrored shape; ``mirror_permutation`` checks that
   this pairing is an involution and agrees with all contour pairs. The model is the average of the
   shape and its mirror image. Pitch is not fixed by symmetry: it stays the average photo's.

Measured (``tests/test_canonical_face.py``): 100 faces used. The symmetry plane of the unsymmetrised mean
was turned by 3.5° of yaw and 2.5° of roll onto x = 0: the photos' average head yaw and tilt, now removed.
Relative to the model the photos' poses spread by 9.5° (yaw), 9.3° (pitch) and 4.0° (roll), their pitch
averaging 0 by construction. The astronaut's ``pose.estimate_head_pose`` against the model: yaw 0.46°,
pitch 2.10°, roll 3.26° (her eye line, annotated by hand, tilts 3.9°), re-projection error 2.26 px.
Compared once with MediaPipe's published canonical face (not kept in the project): after a similarity
alignment, the two differ by a 3.7° pitch (no yaw or roll) and 3 % of the eye-corner distance (RMS).

Limits: LFW faces are near-frontal, neutral-ish and tiny (25 px up-scaled), so the depth is the Face
Mesh model's prior more than a measurement; 100 faces give a mean, not an anthropometric model; the
zero of pitch is the average LFW photo's camera height, not an anatomical plane (pose *differences*,
what the evaluation reports, hardly depend on it). Deriving takes ~4 s, so the result is cached in
``realisid_jax.assets.cache_dir()`` under a name that changes with the method and the model files.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tempfile

import numpy as np

from realisid_jax.face import mesh

MIN_LANDMARK_SCORE = 0.5  # FaceAnalyzer's default: below it the crop holds no face
_METHOD_VERSION = "1"  # bump when the derivation changes: the cache name follows it
_LFW_FACES = 100  # skimage's lfw_subset: 100 faces, then 100 non-faces
_LFW_SIDE, _CANVAS = 200, 300
_IMAGE_TO_MODEL = np.array([1.0, -1.0, -1.0])  # image x right, y down, depth away -> model axes
_MIRROR = np.array([-1.0, 1.0, 1.0])


@dataclasses.dataclass(frozen=True, eq=False)  # array fields: no elementwise ==
class CanonicalFaceFit:
    """Result of ``derive_canonical_face``.

    Attributes:
      model: (468, 3) float64, the canonical face (axes and unit in the module docstring).
      mirror: (468,) int, ``mirror[i]`` is the landmark mirroring ``i`` (itself on the midline).
      rotations: (N, 3, 3) float64, the rotation of each used photo's landmarks onto ``model`` (onto the
        mean before symmetrisation, which the symmetrisation hardly turns).
      sagittal_yaw: yaw (about y) of the unsymmetrised mean's symmetry plane, degrees.
      sagittal_roll: roll (about z) of the unsymmetrised mean's symmetry plane, degrees.
    """

    model: np.ndarray
    mirror: np.ndarray
    rotations: np.ndarray
    sagittal_yaw: float
    sagittal_roll: float


def canonical_face_model() -> np.ndarray:
    """The canonical face, (468, 3) float64, read-only; derived on first use, then read from the cache.

    Raises:
      realisid_jax.assets.AssetError: the Face Mesh model files are missing and cannot be fetched.
    """
    return _cached_model()


def __getattr__(name: str):
    # CANONICAL_FACE_MODEL stays a module attribute but is only derived when first read.
    if name == "CANONICAL_FACE_MODEL":
        return canonical_face_model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _cached_model() -> np.ndarray:
    from realisid_jax import assets

    path = assets.cache_dir() / f"canonical_face-{_cache_key()}.npy"
    model = _read(path)
    if model is None:
        model = derive_canonical_face().model
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, model, allow_pickle=False)
        os.replace(tmp, path)  # atomic: concurrent first uses never see a half-written file
    model.setflags(write=False)
    return model


def _cache_key() -> str:
    import skimage

    from realisid_jax import assets

    parts = [_METHOD_VERSION, skimage.__version__] + [
        assets.ASSETS[n].sha256 for n in ("face_detection_short_range.tflite", "face_landmark.tflite")]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _read(path) -> np.ndarray | None:
    try:
        model = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    ok = model.shape == (mesh.NUM_LANDMARKS, 3) and model.dtype == np.float64 and np.all(np.isfinite(model))
    return model if ok else None


def derive_canonical_face(detector=None, landmarker=None) -> CanonicalFaceFit:
    """Derive the canonical face from scikit-image's photos (method in the module docstring).

    Args:
      detector: a ``face.detect`` detector; default ``BlazeFaceDetector()``.
      landmarker: a landmarker whose results carry ``points3d``; default ``FaceMeshLandmarker()``.

    Returns:
      ``CanonicalFaceFit``. Deterministic for fixed model files (single-threaded interpreters).

    Raises:
      ValueError: the derived mirror pairing is inconsistent (see ``mirror_permutation``).
    """
    from realisid_jax.face.detect import BlazeFaceDetector
    from realisid_jax.face.landmarks import FaceMeshLandmarker

    detector = detector if detector is not None else BlazeFaceDetector()
    landmarker = landmarker if landmarker is not None else FaceMeshLandmarker()
    shapes = _face_shapes(_photos(), detector, landmarker)
    mean, rotations = generalized_procrustes(shapes)
    frame, yaw, roll = sagittal_frame(mean, contour_mirror_pairs())
    shape = mean @ frame.T
    mirror = mirror_permutation(shape)
    model = (shape + shape[mirror] * _MIRROR) / 2
    model -= model.mean(0)
    model /= np.linalg.norm(model[mesh.LEFT_EYE_OUTER] - model[mesh.RIGHT_EYE_OUTER])
    return CanonicalFaceFit(model, mirror, np.einsum("ij,njk->nik", frame, rotations), yaw, roll)


def _photos() -> list[np.ndarray]:
    import cv2
    import skimage.data

    photos = [skimage.data.astronaut()]
    margin = (_CANVAS - _LFW_SIDE) // 2
    for patch in skimage.data.lfw_subset()[:_LFW_FACES]:
        face = cv2.resize(np.round(patch * 255).astype(np.uint8), (_LFW_SIDE, _LFW_SIDE),
                          interpolation=cv2.INTER_CUBIC)
        grey = np.pad(face, margin, constant_values=128)
        photos.append(np.repeat(grey[..., None], 3, axis=-1))
    return photos


def _face_shapes(photos, detector, landmarker) -> np.ndarray:
    """(N, 468, 3) float64 landmarks in model axes, one per photo where a face is found."""
    shapes = []
    for photo in photos:
        detections = detector(photo)
        if not detections:
            continue
        marks = landmarker(photo, max(detections, key=lambda d: d.score))
        if marks.score >= MIN_LANDMARK_SCORE:
            shapes.append(marks.points3d.astype(np.float64) * _IMAGE_TO_MODEL)
    return np.stack(shapes)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity (Umeyama 1991, no reflection) mapping ``source`` (N, 3) onto ``target``
    (N, 3): ``(scale, rotation (3, 3), translation (3,))`` with ``target ~ scale * source @ rotation.T +
    translation``."""
    mu_s, mu_t = source.mean(0), target.mean(0)
    s0, t0 = source - mu_s, target - mu_t
    u, sigma, vt = np.linalg.svd(t0.T @ s0)
    flip = np.array([1.0, 1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rotation = u @ np.diag(flip) @ vt
    scale = float((sigma * flip).sum() / (s0 ** 2).sum())
    return scale, rotation, mu_t - scale * rotation @ mu_s


def _normalise(shape: np.ndarray) -> np.ndarray:
    centred = shape - shape.mean(0)
    return centred / np.linalg.norm(centred)


def _nearest_rotation(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m)
    return u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt


def generalized_procrustes(shapes: np.ndarray, *, tol: float = 1e-10,
                           max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Generalised Procrustes mean of ``shapes`` (N, P, 3) under similarity transforms.

    Returns:
      ``(mean, rotations)``: the mean (P, 3), centred with unit Frobenius norm, oriented so that the
      shapes' rotations onto it average (chordal mean) to the identity; and those rotations (N, 3, 3).

    Raises:
      RuntimeError: the mean still moved by more than ``tol`` after ``max_iter`` iterations.
    """
    mean = _normalise(shapes[0])
    for _ in range(max_iter):
        fits = [similarity_transform(s, mean) for s in shapes]
        aligned = np.stack([c * s @ r.T + t for s, (c, r, t) in zip(shapes, fits)])
        new = _normalise(aligned.mean(0))
        new = new @ similarity_transform(new, mean)[1].T  # the mean's orientation is arbitrary: hold it
        moved, mean = float(np.abs(new - mean).max()), new
        if moved < tol:
            break
    else:
        raise RuntimeError(f"Procrustes mean did not converge: still moving by {moved:.3g}")
    rotations = np.stack([similarity_transform(s, mean)[1] for s in shapes])
    average = _nearest_rotation(rotations.sum(0))
    return mean @ average, np.einsum("ji,njk->nik", average, rotations)


def contour_mirror_pairs() -> np.ndarray:
    """(K, 2) int landmark pairs that mirror each other, read off ``face.mesh``'s contours (the right and
    left eyes and eyebrows index by index; the closed face oval and lip loops and the nose-wing loop
    mirrored about their midline points; the nose bridge is on the midline), both orders, sorted."""
    pairs = list(zip(mesh.RIGHT_EYE, mesh.LEFT_EYE))
    for right, left in zip(mesh.RIGHT_EYEBROW, mesh.LEFT_EYEBROW):
        pairs += zip(right, left)
    for loop, top in ((mesh.FACE_OVAL, 0), (mesh.LIPS_OUTER, 0), (mesh.LIPS_INNER, 0), (mesh.NOSE[1], 6)):
        ring = loop[:-1]  # closed polylines repeat their first point
        pairs += [(ring[(top - k) % len(ring)], ring[(top + k) % len(ring)]) for k in range(len(ring))]
    pairs += [(i, i) for i in mesh.NOSE[0]]
    both = {(a, b) for a, b in pairs} | {(b, a) for a, b in pairs}
    return np.array(sorted(both))


def sagittal_frame(shape: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The smallest rotation turning the symmetry plane of ``shape`` (P, 3) onto x = 0.

    The plane's normal is the principal direction of the differences between mirror ``pairs`` (K, 2).
    Returns ``(rotation (3, 3), yaw, roll)``: the normal's yaw (towards z) and roll (towards y) in
    degrees before turning.
    """
    differences = shape[pairs[:, 0]] - shape[pairs[:, 1]]
    normal = np.linalg.svd(differences, full_matrices=False)[2][0]
    normal *= np.sign(normal[0])
    axis = np.cross(normal, [1.0, 0.0, 0.0])
    sin, cos = np.linalg.norm(axis), normal[0]
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + k + k @ k * ((1 - cos) / sin ** 2 if sin > 0 else 0.0)
    yaw, roll = np.degrees(np.arctan2(normal[2], normal[0])), np.degrees(np.arctan2(normal[1], normal[0]))
    return rotation, float(yaw), float(roll)


def mirror_permutation(shape: np.ndarray) -> np.ndarray:
    """Mirror partner of each landmark of ``shape`` (468, 3) whose symmetry plane is x = 0: the nearest
    point of the mirrored shape (after centring the plane on the points' mean x).

    Returns:
      (468,) int permutation, ``p[p[i]] == i``.

    Raises:
      ValueError: the pairing is not an involution or contradicts ``contour_mirror_pairs()``.
    """
    centred = shape - [shape[:, 0].mean(), 0.0, 0.0]
    mirrored = centred * _MIRROR
    partner = np.linalg.norm(centred[:, None] - mirrored[None], axis=-1).argmin(1)
    pairs = contour_mirror_pairs()
    if np.any(partner[partner] != np.arange(len(shape))) or np.any(partner[pairs[:, 0]] != pairs[:, 1]):
        raise ValueError("nearest-mirror pairing is not a consistent left-right symmetry of the face mesh")
    return partner
