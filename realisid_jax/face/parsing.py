"""Face masks: the ``FaceParser`` protocol and the offline landmark-oval backend.

The paper zeroes the reference face's background with a BiSeNet face-parsing mask. Without those
weights the offline stand-in is the filled face-mesh oval (``mesh.FACE_OVAL``): it covers forehead,
cheeks and chin and leaves out hair, ears and neck, close to BiSeNet's skin+features classes. A
BiSeNet backend fits the same protocol once a user supplies its weights.
"""
from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np

from realisid_jax.face import mesh

_SUBPIXEL_BITS = 4  # cv2.fillPoly fixed-point precision: 1/16 pixel


class FaceParser(Protocol):
    """Segments one face."""

    def __call__(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """``image``: uint8 (H, W, 3) RGB; ``landmarks``: (468, 2) float32 pixels.
        Returns an (H, W) bool mask, True on the face."""
        ...


class LandmarkOvalParser:
    """The face mask as the filled polygon of the 36 face-oval landmarks."""

    def __call__(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        return polygon_mask(landmarks[list(mesh.FACE_OVAL)], image.shape[:2])


def polygon_mask(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise a polygon (N, 2) float pixel ``(x, y)`` into an (H, W) bool mask of ``shape``.

    A pixel is inside when OpenCV's scan conversion covers its centre ``(j + 0.5, i + 0.5)``; the
    polygon may extend outside the image.
    """
    canvas = np.zeros(shape, np.uint8)
    # fillPoly wants integer vertices with pixel centres on integers: shift by half a pixel and
    # keep _SUBPIXEL_BITS of fraction.
    pts = np.round((np.asarray(polygon, np.float64) - 0.5) * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(canvas, [pts.reshape(-1, 1, 2)], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return canvas.astype(bool)
