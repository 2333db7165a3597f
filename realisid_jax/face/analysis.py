"""``FaceAnalyzer``: detector + landmarker + parser -> ``Face`` records, on the host (NumPy).

This is the data-preparation and inference-input side of RealisID (paper Sec. "Method": face
detection, square reference crop, face-parsing mask, MediaPipe landmarks for c_pe). The default
pipeline is fully offline: MediaPipe BlazeFace short-range detection, MediaPipe Face Mesh
landmarks, and the landmark face oval as the parsing mask. The paper's MTCNN and BiSeNet plug in
through the ``Detector`` and ``FaceParser`` protocols.

Pixel convention: see ``realisid_jax.face.detect`` (continuous coordinates, image = [0, W] x [0, H]).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Literal

import numpy as np

from realisid_jax.face.detect import BlazeFaceDetector, Detection, Detector, box_iou
from realisid_jax.face.errors import FaceTooSmallError, NoFaceError
from realisid_jax.face.image import as_rgb8, load_image
from realisid_jax.face.landmarks import FaceMeshLandmarker, Landmarker
from realisid_jax.face.parsing import FaceParser, LandmarkOvalParser

Policy = Literal["largest", "all", "highest_score"]
POLICIES: tuple[str, ...] = ("largest", "all", "highest_score")


@dataclasses.dataclass(frozen=True, eq=False)  # array fields: no elementwise ==
class Face:
    """One analysed face in image coordinates.

    Attributes:
      box: (4,) float32 ``(x0, y0, x1, y1)`` pixels, the bounding box of the 468 landmarks
        (hairline-to-chin, cheek-to-cheek). Landmarks, not the detector, define it so that it means
        the same thing whichever detector found the face. May extend past the image border.
      score: detector confidence in [0, 1].
      landmarks: (468, 2) float32 ``(x, y)`` pixels, MediaPipe Face Mesh order.
      mask: (H, W) bool, True on the face (parser output; default the filled landmark oval).
      landmark_score: landmarker face-presence probability in [0, 1].
      detection_box: (4,) float32, the detector's own box.
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    mask: np.ndarray
    landmark_score: float
    detection_box: np.ndarray

    @property
    def size(self) -> float:
        """Longer side of ``box``, pixels."""
        return float(np.max(self.box[2:] - self.box[:2]))


class FaceAnalyzer:
    """Finds faces and their landmarks and masks in photos.

    Args:
      detector: a ``Detector``; default ``BlazeFaceDetector()``.
      landmarker: a ``Landmarker``; default ``FaceMeshLandmarker()``.
      parser: a ``FaceParser``; default ``LandmarkOvalParser()``.
      policy: which faces ``analyze`` returns: "largest" (one, largest box), "highest_score" (one,
        best detector score) or "all" (largest first).
      min_face_px: faces whose box's longer side is below this many pixels are dropped; when all are,
        ``FaceTooSmallError`` is raised. 32 px: smaller faces hold too little identity for the
        224-px CLIP reference crop.
      min_landmark_score: detections whose landmark face-presence probability is below this are
        rejected as false positives.
      dedupe_iou: two faces whose boxes overlap more than this are one face (keep the better score).

    The model files are fetched on first use (``realisid_jax.assets``).
    """

    def __init__(self, detector: Detector | None = None, landmarker: Landmarker | None = None,
                 parser: FaceParser | None = None, *, policy: Policy = "largest",
                 min_face_px: float = 32.0, min_landmark_score: float = 0.5,
                 dedupe_iou: float = 0.5):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.detector = detector if detector is not None else BlazeFaceDetector()
        self.landmarker = landmarker if landmarker is not None else FaceMeshLandmarker()
        self.parser = parser if parser is not None else LandmarkOvalParser()
        self.policy = policy
        self.min_face_px = min_face_px
        self.min_landmark_score = min_landmark_score
        self.dedupe_iou = dedupe_iou

    def analyze(self, image: np.ndarray, *, policy: Policy | None = None,
                source: object = "<array>") -> list[Face]:
        """Analyse one image.

        Args:
          image: (H, W[, 1|3|4]) array, uint8/uint16/float (see ``image.as_rgb8``).
          policy: overrides the analyser's policy for this call.
          source: name used in error messages (a file name).

        Returns:
          A non-empty list of ``Face``: one face for "largest"/"highest_score", all faces (largest
          first) for "all".

        Raises:
          NoFaceError: no face found (message names ``source``).
          FaceTooSmallError: faces found, all smaller than ``min_face_px``.
          ValueError: bad image shape/dtype or unknown policy.
        """
        policy = policy or self.policy
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        rgb = as_rgb8(image)
        faces = self._dedupe([f for d in self.detector(rgb) if (f := self._face(rgb, d))])
        if not faces:
            raise NoFaceError(source)
        big = [f for f in faces if f.size >= self.min_face_px]
        if not big:
            raise FaceTooSmallError(source, max(f.size for f in faces), self.min_face_px)
        big.sort(key=lambda f: -f.size)
        if policy == "largest":
            return big[:1]
        if policy == "highest_score":
            return [max(big, key=lambda f: f.score)]
        return big

    def analyze_file(self, path: str | os.PathLike, *, policy: Policy | None = None) -> list[Face]:
        """``load_image(path)`` then ``analyze``; errors name the file (``ImageReadError`` too)."""
        return self.analyze(load_image(path), policy=policy, source=path)

    def _face(self, image: np.ndarray, detection: Detection) -> Face | None:
        marks = self.landmarker(image, detection)
        if marks.score < self.min_landmark_score:
            return None
        box = np.concatenate([marks.points.min(0), marks.points.max(0)]).astype(np.float32)
        return Face(box, detection.score, marks.points, self.parser(image, marks.points),
                    marks.score, np.asarray(detection.box, np.float32))

    def _dedupe(self, faces: list[Face]) -> list[Face]:
        """Different detections can converge on one face after landmark refinement."""
        kept: list[Face] = []
        for f in sorted(faces, key=lambda f: -f.score):
            if not kept or box_iou(f.box, np.stack([k.box for k in kept])).max() <= self.dedupe_iou:
                kept.append(f)
        return kept
