"""Head pose and expression from the 468 Face Mesh landmarks (the paper's pose and expression errors).

Head pose: ``cv2.solvePnP`` of the 2-D landmarks against the project's canonical 3-D face
(``canonical_face.canonical_face_model()``, the mean Face Mesh shape of real photos; its zero pitch is
the average photo's) with a face-centred pinhole camera: principal point at the centre
of the landmark box, focal length ``FOCAL_IN_FACE_SIZES`` times the box's longer side. Centring the camera
on the face makes the pose that of the face as seen along its own viewing ray, so the same face pasted at
another place or scale of an image has the same pose (what matters when a generated face at a chosen box is
compared with a reference photo). The rotation is reported as intrinsic Euler angles in degrees,
``R = Rz(roll) @ Ry(yaw) @ Rx(pitch)`` in OpenCV camera axes (x right, y down, z forward): yaw turns the
head left/right, pitch nods it, roll tilts it in the image plane (positive = clockwise on screen).

Pose error (L1): ``|Δyaw|``, ``|Δpitch|``, ``|Δroll|`` (each wrapped to [0, 180]) and their mean, degrees.

Expression error: the generated face's landmarks are similarity-aligned (rotation, uniform scale,
translation; least squares, Umeyama) onto the target's using the rigid points ``RIGID_INDICES`` (nose and
the upper face oval, which do not move with expression); then the mean absolute coordinate difference
``mean(|Δx|, |Δy|)`` over the mouth, eye and eyebrow landmarks ``EXPRESSION_INDICES``, divided by the
target's face size (longer side of its landmark box). 0 for identical landmarks; 0.01 = on average 1% of
the face size. A 2-D alignment cannot undo out-of-plane rotation, so a yaw/pitch difference also raises
the expression error: read it together with the pose error.
"""

from __future__ import annotations

import dataclasses
import functools

import cv2
import numpy as np

from realisid_jax.face import mesh
from realisid_jax.eval.canonical_face import canonical_face_model

FOCAL_IN_FACE_SIZES = 5.0  # a face filling 1/5 of a ~53° field of view: a normal portrait lens



def _unique(groups) -> tuple[int, ...]:
    return tuple(sorted({i for g in groups for i in g}))


EXPRESSION_INDICES: tuple[int, ...] = _unique(
    [mesh.LIPS_OUTER, mesh.LIPS_INNER, mesh.RIGHT_EYE, mesh.LEFT_EYE, *mesh.RIGHT_EYEBROW, *mesh.LEFT_EYEBROW])
# Upper face oval: forehead point 10 and the 9 oval points on each side of it, which are the oval points
# above the nose tip in the canonical face (tests/test_canonical_face.py checks it); the jaw moves with the
# mouth.
_UPPER_OVAL = mesh.FACE_OVAL[:10] + mesh.FACE_OVAL[-10:-1]
RIGID_INDICES: tuple[int, ...] = _unique([*mesh.NOSE, _UPPER_OVAL])


@dataclasses.dataclass(frozen=True)
class HeadPose:
    """Euler angles in degrees (see the module docstring for axes and signs) and the PnP re-projection
    error, mean pixels per landmark."""

    yaw: float
    pitch: float
    roll: float
    reprojection_px: float

    def as_array(self) -> np.ndarray:
        """(3,) float64 ``(yaw, pitch, roll)``."""
        return np.array([self.yaw, self.pitch, self.roll])


@dataclasses.dataclass(frozen=True)
class PoseExpressionError:
    """Absolute angle differences (degrees), their mean ``pose`` and the ``expression`` error (face sizes)."""

    yaw: float
    pitch: float
    roll: float
    pose: float
    expression: float


def _check(landmarks: np.ndarray) -> np.ndarray:
    points = np.asarray(landmarks, np.float64)
    if points.shape != (mesh.NUM_LANDMARKS, 2) or not np.all(np.isfinite(points)):
        raise ValueError(f"expected finite (468, 2) landmarks, got shape {points.shape}")
    return points


@functools.cache
def _model() -> np.ndarray:
    """The canonical face in OpenCV camera axes: it has y up and z towards the viewer, the camera y down
    and z away from it."""
    return canonical_face_model() * np.array([1.0, -1.0, -1.0])


def face_size(landmarks: np.ndarray) -> float:
    """Longer side of the landmarks' bounding box (their units)."""
    points = _check(landmarks)
    return float(np.max(points.max(0) - points.min(0)))


def estimate_head_pose(landmarks: np.ndarray) -> HeadPose:
    """Head pose of one face.

    Args:
      landmarks: (468, 2) ``(x, y)`` image pixels, Face Mesh order (``Face.landmarks``).

    Returns:
      ``HeadPose``; a frontal, upright face gives angles near 0.

    Raises:
      ValueError: wrong shape, non-finite or degenerate (zero-size) landmarks, or PnP failed.
      realisid_jax.assets.AssetError: first call only, the canonical face is not cached and the Face Mesh
        model files it is derived with cannot be fetched.
    """
    points = _check(landmarks)
    model = _model()
    lo, hi = points.min(0), points.max(0)
    size = float(np.max(hi - lo))
    if size <= 0:
        raise ValueError("degenerate landmarks: zero-size face")
    focal = FOCAL_IN_FACE_SIZES * size
    cx, cy = (lo + hi) / 2
    camera = np.array([[focal, 0, cx], [0, focal, cy], [0, 0, 1]], np.float64)
    # Start in front of the camera at the distance where the model's size matches the face's: the
    # iterative solver then converges to the right (not the mirrored, behind-camera) solution.
    model_size = float(np.ptp(model[:, :2], axis=0).max())
    guess_t = np.array([[0.0], [0.0], [focal * model_size / size]])
    ok, rvec, tvec = cv2.solvePnP(model, points, camera, None, rvec=np.zeros((3, 1)), tvec=guess_t,
                                  useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        raise ValueError("cv2.solvePnP failed on these landmarks")
    projected = cv2.projectPoints(model, rvec, tvec, camera, None)[0].reshape(-1, 2)
    yaw, pitch, roll = _euler_degrees(cv2.Rodrigues(rvec)[0])
    return HeadPose(yaw, pitch, roll, float(np.linalg.norm(projected - points, axis=1).mean()))


def _euler_degrees(r: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) of ``R = Rz(roll) Ry(yaw) Rx(pitch)``."""
    pitch = np.arctan2(r[2, 1], r[2, 2])
    yaw = np.arcsin(np.clip(-r[2, 0], -1.0, 1.0))
    roll = np.arctan2(r[1, 0], r[0, 0])
    return tuple(float(np.degrees(a)) for a in (yaw, pitch, roll))


def angle_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| in degrees, wrapped into [0, 180]."""
    d = np.abs((np.asarray(a, np.float64) - np.asarray(b, np.float64) + 180.0) % 360.0 - 180.0)
    return d


def similarity_align(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2-D similarity transform (rotation, uniform scale, translation; no reflection) that best maps
    ``source`` (N, 2) onto ``target`` (N, 2) in least squares (Umeyama 1991); returns it as a (2, 3) matrix
    ``[s R | t]``."""
    src, dst = np.asarray(source, np.float64), np.asarray(target, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    u, sigma, vt = np.linalg.svd(d0.T @ s0 / len(src))
    flip = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rotation = u @ flip @ vt
    scale = float(np.trace(np.diag(sigma) @ flip) / s0.var(0).sum())
    return np.hstack([scale * rotation, (mu_d - scale * rotation @ mu_s)[:, None]])


def expression_error(landmarks: np.ndarray, target: np.ndarray) -> float:
    """Expression error of ``landmarks`` against ``target`` (both (468, 2) pixels of their own images), as
    defined in the module docstring; a float >= 0 in units of the target's face size."""
    points, goal = _check(landmarks), _check(target)
    rigid = list(RIGID_INDICES)
    m = similarity_align(points[rigid], goal[rigid])
    aligned = points @ m[:, :2].T + m[:, 2]
    idx = list(EXPRESSION_INDICES)
    return float(np.abs(aligned[idx] - goal[idx]).mean() / face_size(goal))


def pose_expression_error(landmarks: np.ndarray, target: np.ndarray) -> PoseExpressionError:
    """Pose and expression errors of a generated face's landmarks against the target's (the pose photo's,
    or the reference's own); (468, 2) pixels each."""
    a, b = estimate_head_pose(landmarks), estimate_head_pose(target)
    yaw, pitch, roll = angle_difference(a.as_array(), b.as_array())
    return PoseExpressionError(float(yaw), float(pitch), float(roll), float(np.mean([yaw, pitch, roll])),
                               expression_error(landmarks, target))
