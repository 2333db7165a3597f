"""A tiny real source folder for ``prepare-data``, its tests and the training demo (offline).

The photos come from the scikit-image wheel: ``skimage.data.astronaut()`` (public-domain NASA
portrait of Eileen Collins, 512x512 RGB) and ``skimage.data.lfw_subset()`` (Labeled Faces in the
Wild, 25x25 grayscale: 100 tight face crops, then 100 non-face patches). The 25-pixel LFW faces are
up-scaled (bicubic) to 200 px and placed on a 240x300 grey portrait canvas at varying positions, so
that the face detector finds them and the crop logic sees non-square photos.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# scikit-image's lfw_subset: indices 0-99 are faces, 100-199 are not.
_LFW_FACES = 100
_FACE_SIDE = 200
_CANVAS = (300, 240)  # (H, W)
_TEMPLATES = (
    "a black and white close-up portrait of a person",
    "a grayscale photo of a person looking at the camera",
    "a monochrome headshot of a person on a grey background",
    "a person photographed in black and white, face in focus",
)
ASTRONAUT_CAPTION = "a photo of an astronaut in a white spacesuit in front of the American flag"


def write_sample_source(folder: str | os.PathLike, n: int) -> dict[str, list[str]]:
    """Write ``n`` captioned face photos plus one non-face photo and one corrupt file.

    Files (captions in sidecar ``.txt`` files):
      ``astronaut.jpg`` (512x512 RGB JPEG) then ``lfw_000.png`` ... (``n - 1`` grayscale PNGs,
      240x300): the faces; ``no_face.png``: an LFW non-face patch, same layout;
      ``corrupt.jpg``: the first 200 bytes of a JPEG (truncated).

    Args:
      folder: created if missing.
      n: number of face photos, 1 to 101.

    Returns:
      ``{"faces": [...], "no_face": [...], "corrupt_image": [...]}``: file names by expected
      outcome.

    Raises:
      ValueError: ``n`` out of range.
    """
    import cv2
    import skimage.data

    if not 1 <= n <= _LFW_FACES + 1:
        raise ValueError(f"n must be in [1, {_LFW_FACES + 1}], got {n}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    astronaut = cv2.imencode(".jpg", skimage.data.astronaut()[..., ::-1],
                             [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    _write(folder, "astronaut.jpg", astronaut, ASTRONAUT_CAPTION)
    lfw = skimage.data.lfw_subset()
    faces = ["astronaut.jpg"]
    for i in range(n - 1):
        name = f"lfw_{i:03d}.png"
        _write(folder, name, _png(_on_canvas(lfw[i], i)), _TEMPLATES[i % len(_TEMPLATES)])
        faces.append(name)
    _write(folder, "no_face.png", _png(_on_canvas(lfw[_LFW_FACES], 0)),
           "a black and white photo of a textured wall")
    _write(folder, "corrupt.jpg", astronaut[:200], "a photo that was cut off in transfer")
    return {"faces": faces, "no_face": ["no_face.png"], "corrupt_image": ["corrupt.jpg"]}


def _on_canvas(patch: np.ndarray, i: int) -> np.ndarray:
    """A 25x25 float patch in [0, 1] -> uint8 face up-scaled into a grey portrait canvas."""
    import cv2

    face = cv2.resize(np.round(patch * 255).astype(np.uint8), (_FACE_SIDE, _FACE_SIDE),
                      interpolation=cv2.INTER_CUBIC)
    canvas = np.full(_CANVAS, 128, np.uint8)
    y, x = 20 + (i * 7) % 60, (i * 11) % 40
    canvas[y:y + _FACE_SIDE, x:x + _FACE_SIDE] = face
    return canvas


def _png(image: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".png", image)[1].tobytes()


def _write(folder: Path, name: str, data: bytes, caption: str) -> None:
    (folder / name).write_bytes(data)
    (folder / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
