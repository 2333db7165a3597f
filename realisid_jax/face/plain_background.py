"""Reference analysis of a subject drawn on a plain background (the glyph world's references and any glyph picture):
the counterpart of ``FaceAnalyzer`` for a config whose ``realisid.reference_analysis`` is ``"plain_background"``.

The background colour is the median of the image's border pixels; the subject ("ink") is every pixel whose colour is
at least ``threshold`` away from it (Euclidean RGB distance). Its bounding box plays the detected face box, its mask
the subject region (``Face.mask``, what the reference crop keeps) is that box made square by its longer edge: the
subject on its own plain background, since zeroing the background would hide a dark subject. Its landmarks are the
``"square"`` layout's six keypoints of that square, upright (``face.draw.square_keypoints(0)``): a glyph's rotation
is the user's choice of pose, not read from the picture.
"""

from __future__ import annotations

import numpy as np

from realisid_jax.face.analysis import Face
from realisid_jax.face.draw import square_keypoints
from realisid_jax.face.errors import NoSubjectError
from realisid_jax.face.image import as_rgb8


class PlainBackgroundAnalyzer:
    """Finds the subject of a picture on a plain background; same ``analyze`` interface as ``FaceAnalyzer``.

    Args:
      threshold: RGB distance (0..441) from the background colour above which a pixel is the subject's.
      min_pixels: fewer subject pixels than this raise ``NoSubjectError`` (a blank picture).
    """

    def __init__(self, threshold: float = 60.0, min_pixels: int = 16):
        self.threshold = float(threshold)
        self.min_pixels = int(min_pixels)

    def analyze(self, image: np.ndarray, *, policy: str | None = None, source: object = "<array>") -> list[Face]:
        """The one subject of ``image`` ((H, W[, C]), any dtype ``image.as_rgb8`` takes) as a ``Face``: ``box`` the
        ink's bounding box (pixels, half-open), ``mask`` (H, W) bool its square region, ``landmarks`` (6, 2) the upright
        keypoints of the ink's square box (pixels), scores 1. ``policy`` is accepted for ``FaceAnalyzer``'s
        interface (a picture holds one subject).

        Raises:
          NoSubjectError (a ``NoFaceError``): fewer than ``min_pixels`` pixels differ from the background (naming ``source``).
        """
        del policy
        rgb = as_rgb8(image).astype(np.float32)
        border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
        mask = np.linalg.norm(rgb - np.median(border, axis=0), axis=-1) >= self.threshold
        if mask.sum() < self.min_pixels:
            raise NoSubjectError(source, self.min_pixels, self.threshold)
        rows, cols = np.nonzero(mask)
        box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float32)
        side = float(np.max(box[2:] - box[:2]))
        centre = (box[:2] + box[2:]) / 2
        x0, y0 = np.floor(centre - side / 2).astype(int)
        region = np.zeros(mask.shape, bool)
        region[max(y0, 0):y0 + int(np.ceil(side)) + 1, max(x0, 0):x0 + int(np.ceil(side)) + 1] = True
        landmarks = (square_keypoints(0.0) - 0.5) * side + centre
        return [Face(box, 1.0, landmarks.astype(np.float32), region, 1.0, box.copy())]
