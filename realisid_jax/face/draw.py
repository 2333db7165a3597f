"""Rasterising landmarks into the pose-expression condition c_pe, and annotated previews.

c_pe (paper Sec. "Local branch") is an image of the face's landmarks in the frame of the square
face crop, at the local ControlNet's pixel size. Here: black background, the face-mesh contours
(``mesh.CONTOURS``) as anti-aliased polylines, one fixed colour per feature, then all 468 points as
white dots. Drawing is pure OpenCV on integer fixed-point coordinates, so the same landmarks give
the same bytes.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from realisid_jax.face import mesh

# One colour per feature, RGB; distinct hues so that the ControlNet can tell the parts apart.
CONTOUR_COLORS: dict[str, tuple[int, int, int]] = {
    "face_oval": (224, 224, 224),
    "right_eyebrow": (255, 128, 0),
    "left_eyebrow": (0, 128, 255),
    "right_eye": (255, 48, 48),
    "left_eye": (48, 48, 255),
    "nose": (255, 224, 0),
    "lips": (255, 0, 160),
}
POINT_COLOR = (255, 255, 255)
# A square subject's pose (the glyph world's persons): keypoints TL, TR, BR, BL of the rotated square, its "up" point
# (middle of the top edge) and its centre; drawn as the square's outline and a centre -> up line.
SQUARE_CONTOURS: dict[str, tuple[tuple[int, ...], ...]] = {"outline": ((0, 1, 2, 3, 0),), "up": ((5, 4),)}
SQUARE_COLORS: dict[str, tuple[int, int, int]] = {"outline": (224, 224, 224), "up": (255, 48, 48)}


def square_keypoints(rotation_deg: float) -> np.ndarray:
    """(6, 2) float32 unit box coordinates of the ``"square"`` layout: corners TL, TR, BR, BL of a square rotated
    counter-clockwise by ``rotation_deg`` (as Pillow's ``Image.rotate``) about the centre of its axis-aligned
    bounding box — the unit box —, then its up point (middle of its top edge) and its centre."""
    t = np.radians(rotation_deg)
    c, s = np.cos(t), np.sin(t)
    half = 0.5 / (abs(c) + abs(s))  # the rotated square's bounding box is the unit box
    local = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1], [0, -1], [0, 0]], np.float64) * half
    # Counter-clockwise on screen with y pointing down: x' = x c + y s, y' = -x s + y c.
    rotated = np.stack([local[:, 0] * c + local[:, 1] * s, -local[:, 0] * s + local[:, 1] * c], axis=1)
    return (rotated + 0.5).astype(np.float32)


# Layout name (``config.realisid.landmark_layout``) -> (contours over landmark indices, colour per contour).
LANDMARK_LAYOUTS = {"face_mesh": (mesh.CONTOURS, CONTOUR_COLORS), "square": (SQUARE_CONTOURS, SQUARE_COLORS)}

_SHIFT = 4  # fixed-point fraction bits for OpenCV drawing: 1/16 pixel
_MASK_TINT = np.array([0, 160, 255], np.float32)
_BOX_COLOR = (0, 255, 0)


def draw_landmark_image(landmarks: np.ndarray, size: int = 512, *, line_px: int | None = None,
                        points: bool = True, layout: str = "face_mesh") -> np.ndarray:
    """Rasterise landmarks as the c_pe condition image.

    Args:
      landmarks: (N, 2) unit coordinates of the square face crop (``ReferenceFace.landmarks``):
        (0, 0) top-left, (1, 1) bottom-right; points outside are clipped by the canvas.
      size: output side, pixels (the local branch's pixel size; 512 by default).
      line_px: contour thickness, pixels; default ``max(1, size // 256)``.
      points: also draw each landmark as a white dot of radius ``line_px // 2`` centred on the pixel
        that contains it (that single pixel when the radius is 0).
      layout: a name of ``LANDMARK_LAYOUTS``: ``"face_mesh"`` (468 landmarks, ``mesh.CONTOURS``) or
        ``"square"`` (6 keypoints of a rotated square subject, the glyph world's), drawn by the same code.

    Returns:
      (size, size, 3) uint8 RGB, black background.

    Raises:
      KeyError: an unknown ``layout``.
    """
    contours, colors = LANDMARK_LAYOUTS[layout]
    xy = np.asarray(landmarks, np.float64) * size
    line_px = max(1, size // 256) if line_px is None else line_px
    canvas = np.zeros((size, size, 3), np.uint8)
    pts = _fixed_point(xy)
    for name, polylines in contours.items():
        cv2.polylines(canvas, [pts[list(p)].reshape(-1, 1, 2) for p in polylines], False,
                      colors[name], line_px, cv2.LINE_AA, _SHIFT)
    if points:
        _draw_dots(canvas, xy, line_px // 2)
    return canvas


def annotate(image: np.ndarray, boxes: Sequence[np.ndarray], *,
             landmarks: Sequence[np.ndarray] = (), masks: Sequence[np.ndarray] = (),
             scores: Sequence[float] = ()) -> np.ndarray:
    """Preview of analysed faces: masks tinted, boxes, landmark dots, index and score labels.

    Args:
      image: (H, W, 3) uint8 RGB.
      boxes: per face (4,) ``(x0, y0, x1, y1)`` pixels.
      landmarks: per face (N, 2) pixels; masks: per face (H, W) bool; scores: per face float.

    Returns:
      New (H, W, 3) uint8 RGB image.
    """
    out = image.astype(np.float32)
    for m in masks:
        out[m] = 0.6 * out[m] + 0.4 * _MASK_TINT
    out = np.round(out).astype(np.uint8)
    scale = max(1, round(max(image.shape[:2]) / 512))
    for i, box in enumerate(boxes):
        p0, p1 = _fixed_point(np.reshape(box, (2, 2)))
        cv2.rectangle(out, tuple(map(int, p0)), tuple(map(int, p1)), _BOX_COLOR, scale,
                      cv2.LINE_AA, _SHIFT)
        label = f"{i}" + (f" {scores[i]:.2f}" if i < len(scores) else "")
        org = (int(box[0]), max(int(box[1]) - 4 * scale, 10 * scale))
        cv2.putText(out, label, org, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * scale, _BOX_COLOR, scale,
                    cv2.LINE_AA)
    for pts in landmarks:
        _draw_dots(out, pts, scale // 2)
    return out


def _draw_dots(canvas: np.ndarray, xy: np.ndarray, radius: int) -> None:
    """White dots centred on the pixel that contains each point (radius 0: that pixel alone)."""
    for x, y in np.floor(xy).astype(np.int64):
        cv2.circle(canvas, (int(x), int(y)), radius, POINT_COLOR, -1, cv2.LINE_8)


def _fixed_point(points: np.ndarray) -> np.ndarray:
    """Continuous pixel coordinates -> OpenCV fixed-point integers (pixel centres on integers)."""
    return np.round((np.asarray(points, np.float64) - 0.5) * (1 << _SHIFT)).astype(np.int32)
