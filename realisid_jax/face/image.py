"""The project's one image loader: any photo file or array to 8-bit RGB.

Photos arrive as 8- or 16-bit, grayscale, palette, CMYK, with alpha, or rotated by an EXIF
orientation tag; everything downstream (detector, landmarker, CLIP preprocessing, drawing) assumes
``uint8`` RGB of shape (H, W, 3) in display orientation, so the conversion happens once, here.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from realisid_jax.face.errors import ImageReadError

# Transparent pixels are composited onto white, as an image viewer shows them.
_ALPHA_BACKGROUND = (255, 255, 255)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as display-oriented 8-bit RGB.

    The EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``); 16-bit samples are scaled
    to 8 bits (``v * 255 / 65535``, rounded); grayscale is repeated over 3 channels; alpha is
    composited onto white; palette and CMYK images are converted by Pillow.

    Args:
      path: image file in any format Pillow reads (PNG, JPEG, TIFF, WebP, BMP, …).

    Returns:
      ``uint8`` array of shape (H, W, 3), values 0–255, RGB order.

    Raises:
      ImageReadError: the file is missing, not an image, truncated or otherwise undecodable; the
        message names the file.
    """
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is an error here: the photo would not fit anyway.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                return pil_to_rgb8(img)
    except FileNotFoundError as err:
        raise ImageReadError(path, "file not found") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
            Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageReadError(path, f"{type(err).__name__}: {err}") from err


def pil_to_rgb8(img: Image.Image) -> np.ndarray:
    """A decoded PIL image (any mode) as ``uint8`` (H, W, 3) RGB; see ``load_image`` for the rules."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return as_rgb8(np.asarray(img))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND + (255,))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def as_rgb8(array: np.ndarray) -> np.ndarray:
    """An image array as ``uint8`` (H, W, 3) RGB.

    Accepts shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (alpha composited onto white), with
    dtype ``uint8`` (0–255), ``uint16`` (0–65535), other integers (16-bit range if any value
    exceeds 255, else 8-bit) or floats (0–1, clipped).

    Raises:
      ValueError: any other shape or dtype.
    """
    a = np.asarray(array)
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[-1] == 3:
        return np.ascontiguousarray(a)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or 0 in a.shape:
        raise ValueError(f"expected an (H, W[, 1|3|4]) image, got shape {np.shape(array)}")
    x = _to_unit_float(a)
    if x.shape[-1] == 4:
        alpha = x[..., 3:]
        x = x[..., :3] * alpha + np.asarray(_ALPHA_BACKGROUND, np.float32) / 255.0 * (1 - alpha)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _to_unit_float(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        peak = 65535.0 if a.dtype == np.uint16 or a.max() > 255 else 255.0
        return a.astype(np.float32) / peak
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float32)
    raise ValueError(f"unsupported image dtype {a.dtype}")


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int], *,
                border: str = "constant") -> np.ndarray:
    """Resample ``image`` through an affine map given in continuous pixel coordinates.

    ``matrix`` (2, 3) maps a point of ``image`` to the output, both in the convention of
    ``realisid_jax.face.detect`` (pixel (i, j) covers ``[j, j+1) x [i, i+1)``). OpenCV puts pixel
    centres on integers, so the map is shifted by half a pixel on both sides before calling it.
    Only the part of ``image`` the output reads is touched (a small crop of a large photo costs
    little). ``cv2.warpAffine`` has no area filter, so a strong reduction is first done by
    ``cv2.resize`` with ``INTER_AREA`` (no aliasing) and the rest by bilinear warping.

    Args:
      image: (H, W) or (H, W, C) array (uint8 or float32).
      matrix: (2, 3) affine map, input pixels -> output pixels.
      size: output ``(width, height)``.
      border: "constant" (zeros outside the image) or "replicate" (edge pixels extended).

    Returns:
      Array of shape (height, width[, C]) and the dtype of ``image``.
    """
    import cv2  # deferred: this module must stay cheap to import

    m = np.asarray(matrix, np.float64)
    image, m = _crop_to_support(image, m, size)
    shrink = np.sqrt(abs(np.linalg.det(m[:, :2])))
    if shrink < 0.5:
        h, w = image.shape[:2]
        new_w, new_h = max(1, round(w * shrink * 2)), max(1, round(h * shrink * 2))
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        m = m @ np.diag([w / new_w, h / new_h, 1.0])
    cv_m = m.copy()
    cv_m[:, 2] += m[:, :2].sum(axis=1) * 0.5 - 0.5
    mode = {"constant": cv2.BORDER_CONSTANT, "replicate": cv2.BORDER_REPLICATE}[border]
    return cv2.warpAffine(image, cv_m, tuple(size), flags=cv2.INTER_LINEAR, borderMode=mode,
                          borderValue=0)


def _crop_to_support(image: np.ndarray, m: np.ndarray, size: tuple[int, int]):
    """Cut ``image`` to the bounding box of the points the output samples (plus a 2-pixel margin
    for interpolation), clipped to the image; returns the crop and the map re-based on it."""
    h, w = image.shape[:2]
    a_inv = np.linalg.inv(m[:, :2])
    out_w, out_h = size
    corners = np.array([[0, 0], [out_w, 0], [0, out_h], [out_w, out_h]], np.float64)
    src = (corners - m[:, 2]) @ a_inv.T
    x0, y0 = np.clip(np.floor(src.min(0)).astype(int) - 2, 0, [w - 1, h - 1])
    x1, y1 = np.clip(np.ceil(src.max(0)).astype(int) + 2, [x0 + 1, y0 + 1], [w, h])
    shifted = m.copy()
    shifted[:, 2] += m[:, :2] @ [x0, y0]
    return image[y0:y1, x0:x1], shifted
