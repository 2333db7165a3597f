"""Reference-face preprocessing for the ID embedding p_id (paper Sec. "ID embedding").

Per the paper: the face box is made square by its longer edge (same centre), cropped, the
background is zeroed with the face-parsing mask, and the crop is resized and normalised for the
CLIP image encoder. Parts of the square that fall outside the image are zero (black) pixels, the
same value as the zeroed background, so that the encoder sees one kind of "nothing". Zeroing
happens in pixel space, before normalisation, as in the paper's image-space masking.

Output layout is HWC (channels last, what Flax convolutions take); transpose to CHW for a
PyTorch-layout encoder.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from realisid_jax.face.analysis import Face
from realisid_jax.face.image import as_rgb8, warp_affine

# OpenAI CLIP preprocessor (CLIPImageProcessor of openai/clip-vit-*): 224 px, these mean/std.
CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True, eq=False)  # array fields: no elementwise ==
class ReferenceFace:
    """A reference face ready for the CLIP image encoder.

    Attributes:
      pixels: (size, size, 3) float32 HWC, ``(rgb / 255 - mean) / std`` of the masked crop.
      crop: (size, size, 3) uint8 RGB, the masked square crop before normalisation.
      mask: (size, size) bool, the face mask in the crop frame.
      landmarks: (468, 2) float32, landmarks in the square-crop frame as unit coordinates:
        (0, 0) top-left corner, (1, 1) bottom-right corner of the square box.
      square_box: (4,) float32 ``(x0, y0, x1, y1)`` image pixels, the square box that was cropped.
      face: the analysed face this was made from.
    """

    pixels: np.ndarray
    crop: np.ndarray
    mask: np.ndarray
    landmarks: np.ndarray
    square_box: np.ndarray
    face: Face


def square_box(box: Sequence[float]) -> np.ndarray:
    """``(x0, y0, x1, y1)`` -> the square with the same centre and side = the longer edge (float32)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    half = max(x1 - x0, y1 - y0) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return np.array([cx - half, cy - half, cx + half, cy + half], np.float32)


def to_box_frame(points: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """Image-pixel points (N, 2) -> unit coordinates of ``box`` ((0, 0) top-left, (1, 1)
    bottom-right); float32 (N, 2)."""
    b = np.asarray(box, np.float64)
    return ((np.asarray(points, np.float64) - b[:2]) / (b[2:] - b[:2])).astype(np.float32)


def crop_box(image: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
    """Resample ``box`` of ``image`` to (size, size[, C]); zero outside the image.

    Area-averaged when shrinking, bilinear when enlarging (``image.warp_affine``). ``image``:
    (H, W[, C]) uint8 or float32; output has its dtype.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    m = np.array([[size / (x1 - x0), 0, -x0 * size / (x1 - x0)],
                  [0, size / (y1 - y0), -y0 * size / (y1 - y0)]])
    return warp_affine(image, m, (size, size), border="constant")


def normalize(rgb: np.ndarray, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """uint8 RGB (..., 3) -> float32 ``(rgb / 255 - mean) / std``."""
    x = rgb.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess_reference(image: np.ndarray, face: Face, *, size: int = CLIP_SIZE,
                         mean: Sequence[float] = CLIP_MEAN,
                         std: Sequence[float] = CLIP_STD) -> ReferenceFace:
    """Square, masked, normalised reference crop of ``face`` for the CLIP image encoder.

    Args:
      image: the photo ``face`` was found in, (H, W[, C]) (converted by ``image.as_rgb8``).
      face: from ``FaceAnalyzer.analyze`` on that image.
      size: encoder input side, pixels (``crop_size`` of the encoder's preprocessor config).
      mean, std: per-channel RGB normalisation of that preprocessor config (values for 0–1 pixels).

    Returns:
      ``ReferenceFace``.

    Raises:
      ValueError: ``face.mask`` does not match the image size, or a degenerate box.
    """
    rgb = as_rgb8(image)
    if face.mask.shape != rgb.shape[:2]:
        raise ValueError(f"face mask {face.mask.shape} does not match image {rgb.shape[:2]}")
    box = square_box(face.box)
    if not box[2] > box[0]:
        raise ValueError(f"degenerate face box {face.box}")
    mask = crop_box(face.mask.astype(np.float32), box, size) >= 0.5
    crop = crop_box(rgb, box, size) * mask[..., None]
    return ReferenceFace(normalize(crop, mean, std), crop, mask,
                         to_box_frame(face.landmarks, box), box, face)
