"""Face landmarkers: the ``Landmarker`` protocol and the MediaPipe Face Mesh backend.

The MediaPipe Face Mesh model (``face_landmark.tflite``, MediaPipe "Face Mesh" model card) takes a
192x192 RGB crop in [0, 1] around a face, rotated so that the eyes are level, and returns 468 3-D
points in crop pixels plus a face-presence logit. The crop ("region of interest") follows
MediaPipe's face_landmark graphs: the detection box made square by its longer side and enlarged
1.5x, rotated by the eye line; then, as MediaPipe's tracking loop does, the crop is recomputed from
the first landmarks (their box in the eye-aligned frame, enlarged 1.5x, rotated by the line between
outer eye corners 33 and 263) and the model is run again. The second pass makes the result
independent of how tight or loose the detector's box is.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Protocol

import numpy as np

from realisid_jax.face import mesh
from realisid_jax.face.detect import Detection, tflite_interpreter
from realisid_jax.face.image import warp_affine

_MESH_INPUT = 192


@dataclasses.dataclass(frozen=True, eq=False)  # array fields: no elementwise ==
class LandmarkResult:
    """Landmarks of one face.

    Attributes:
      points: (468, 2) float32 ``(x, y)`` image pixels, MediaPipe Face Mesh index order.
      score: face-presence probability in [0, 1] (low means the crop holds no face).
      points3d: (468, 3) float32 ``(x, y, z)``: ``x, y`` as ``points``; ``z`` the model's depth in
        the same image-pixel scale as ``x`` (MediaPipe's convention: relative depth, smaller is
        nearer the camera, origin near the head's centre), or None when the landmarker gives no depth.
    """

    points: np.ndarray
    score: float
    points3d: np.ndarray | None = None


class Landmarker(Protocol):
    """Places the 468 MediaPipe face-mesh landmarks on a detected face."""

    def __call__(self, image: np.ndarray, detection: Detection) -> LandmarkResult:
        """``image``: uint8 (H, W, 3) RGB; ``detection``: the face to mark."""
        ...


@dataclasses.dataclass(frozen=True)
class Roi:
    """A square, rotated crop: centre ``(cx, cy)`` and side ``size`` in image pixels; ``angle`` in
    radians, positive turning the crop's x axis from the image's x axis towards its y axis (down)."""

    cx: float
    cy: float
    size: float
    angle: float

    def crop_to_image(self, n: int) -> np.ndarray:
        """(2, 3) affine map from an n x n crop's pixels to image pixels."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        a = self.size / n * np.array([[c, -s], [s, c]])
        return np.concatenate([a, (np.array([self.cx, self.cy]) - a @ [n / 2, n / 2])[:, None]], 1)


class FaceMeshLandmarker:
    """MediaPipe Face Mesh (468 points) on a detector's face, two passes (see module docstring).

    Args:
      model_path: the ``.tflite`` file; default ``realisid_jax.assets.face_landmark_model()``.
      roi_scale: crop side / face side, 1.5 as in MediaPipe.
      refine_steps: extra passes with the crop taken from the previous landmarks.
      num_threads: interpreter threads.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, *, roi_scale: float = 1.5,
                 refine_steps: int = 1, num_threads: int = 1):
        if model_path is None:
            from realisid_jax.assets import face_landmark_model
            model_path = face_landmark_model()
        self._interp = tflite_interpreter(model_path, num_threads)
        self._input = self._interp.get_input_details()[0]["index"]
        by_size = {int(np.prod(d["shape"])): d["index"] for d in self._interp.get_output_details()}
        self._points, self._presence = by_size[3 * mesh.NUM_LANDMARKS], by_size[1]
        self.roi_scale = roi_scale
        self.refine_steps = refine_steps

    def __call__(self, image: np.ndarray, detection: Detection) -> LandmarkResult:
        """``image``: uint8 (H, W, 3) RGB. Returns the landmarks of the last pass."""
        result = self._run(image, roi_from_detection(detection, self.roi_scale))
        for _ in range(self.refine_steps):
            result = self._run(image, roi_from_landmarks(result.points, self.roi_scale))
        return result

    def _run(self, image: np.ndarray, roi: Roi) -> LandmarkResult:
        to_image = roi.crop_to_image(_MESH_INPUT)
        crop = warp_affine(image, _invert_affine(to_image), (_MESH_INPUT, _MESH_INPUT),
                           border="replicate")
        self._interp.set_tensor(self._input, crop.astype(np.float32)[None] / 255.0)
        self._interp.invoke()
        xyz = self._interp.get_tensor(self._points).reshape(mesh.NUM_LANDMARKS, 3)
        points = xyz[:, :2] @ to_image[:, :2].T + to_image[:, 2]
        # The crop-to-image map is a rotation times roi.size / n: depth scales like x and y, unrotated.
        depth = xyz[:, 2] * (roi.size / _MESH_INPUT)
        logit = float(self._interp.get_tensor(self._presence).ravel()[0])
        return LandmarkResult(points.astype(np.float32), float(1 / (1 + np.exp(-logit))),
                              np.column_stack([points, depth]).astype(np.float32))


def roi_from_detection(detection: Detection, scale: float = 1.5) -> Roi:
    """Square crop around a detection, rotated by its eye line when it has keypoints."""
    x0, y0, x1, y1 = (float(v) for v in detection.box)
    angle = 0.0
    if detection.keypoints is not None:
        (rx, ry), (lx, ly) = detection.keypoints[0], detection.keypoints[1]
        angle = float(np.arctan2(ly - ry, lx - rx))
    return Roi((x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * scale, angle)


def roi_from_landmarks(points: np.ndarray, scale: float = 1.5) -> Roi:
    """Square crop around face-mesh landmarks (468, 2): their box in the eye-aligned frame."""
    d = points[mesh.LEFT_EYE_OUTER] - points[mesh.RIGHT_EYE_OUTER]
    angle = float(np.arctan2(d[1], d[0]))
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    aligned = points @ rot  # rot.T applied to each point: image frame -> eye-aligned frame
    lo, hi = aligned.min(0), aligned.max(0)
    cx, cy = rot @ ((lo + hi) / 2)
    return Roi(float(cx), float(cy), float((hi - lo).max()) * scale, angle)


def _invert_affine(m: np.ndarray) -> np.ndarray:
    a_inv = np.linalg.inv(m[:, :2])
    return np.concatenate([a_inv, (-a_inv @ m[:, 2])[:, None]], axis=1)
