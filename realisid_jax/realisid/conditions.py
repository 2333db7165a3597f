"""Per-person conditions on the host: reference photo -> CLIP input, pose photo -> landmark image c_pe,
face box -> normalised box; padded to the static maximum K with a validity mask.

User boxes are ``(x0, y0, x1, y1)`` in output-image pixels; the JAX ops take them normalised to [0, 1]
(``realisid_jax.realisid.ops``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from realisid_jax.face.analysis import FaceAnalyzer
from realisid_jax.face.draw import draw_landmark_image
from realisid_jax.face.image import as_rgb8, load_image
from realisid_jax.face.preprocess import CLIP_MEAN, CLIP_STD, ReferenceFace, preprocess_reference

ImageInput = str | os.PathLike | np.ndarray


class BoxError(ValueError):
    """A face box that is malformed, does not overlap the output image or does not fit in it."""


class SizeError(ValueError):
    """An output size the models cannot take (not a positive multiple of 8 latent cells)."""


class TooManyPersonsError(ValueError):
    """More persons than the configured static maximum ``realisid.max_persons``."""


@dataclasses.dataclass(frozen=True)
class Person:
    """One identity to generate.

    Attributes:
      reference: photo of the person (path or HxWx3 array); its largest face is used.
      box: ``(x0, y0, x1, y1)`` where the face goes, output-image pixels (floats allowed), overlapping the image;
        made square and moved inside the image by ``check_box``.
      pose: optional photo whose landmarks set pose and expression; default the reference's own.
      landmarks: optional (N, 2) landmarks in the unit frame of the square box (``ReferenceFace.landmarks``'s
        frame), given instead of a pose photo: e.g. ``face.draw.square_keypoints(30)``, a glyph turned by 30°.
    """

    reference: ImageInput
    box: Sequence[float]
    pose: ImageInput | None = None
    landmarks: np.ndarray | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class PersonConditions:
    """Host arrays for K = ``max_persons`` slots (padded slots are zeros with ``valid`` False).

    Attributes:
      reference_pixels: (K, S_clip, S_clip, 3) float32, CLIP-normalised masked square face crops.
      landmark_images: (K, P, P, 3) float32 in [0, 1], c_pe at the local branch's pixel size P.
      boxes: (K, 4) float32, normalised ``(x0, y0, x1, y1)``: the boxes actually used (``check_box``: square,
        inside the image).
      valid: (K,) bool.
      references: the analysed references (for the conditioning sheet).
    """

    reference_pixels: np.ndarray
    landmark_images: np.ndarray
    boxes: np.ndarray
    valid: np.ndarray
    references: tuple[ReferenceFace, ...]


def default_person(height: int, width: int, reference: ImageInput | None = None) -> Person:
    """The embedded default person (``realisid sample`` without ``--face``, training's sample images):
    ``reference`` (default scikit-image's astronaut, a public-domain NASA portrait) with a square face box a
    quarter of the shorter image side, centred horizontally, its centre at 2/5 of the height (pixels)."""
    if reference is None:
        from skimage import data

        reference = data.astronaut()
    side = min(height, width) / 4
    cx, cy = width / 2, 0.4 * height
    return Person(reference, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))


def _as_image(image: ImageInput) -> tuple[np.ndarray, str]:
    if isinstance(image, np.ndarray):
        return as_rgb8(image), "<array>"
    return load_image(image), str(image)


def check_box(box: Sequence[float], height: int, width: int) -> np.ndarray:
    """The box actually used for a user's pixel box, normalised to [0, 1] (float32).

    Training boxes are squares (``realisid_jax.data.prepare.fit_square``) and the landmark image c_pe is
    drawn in a square frame, so a user box becomes the square of its longer edge around its centre (no
    stretched face in the local crop, a c_loc shape seen in training), moved by the least amount that puts
    it inside the (width x height) image. A box wholly outside the image is refused rather than moved: where
    the user meant the face to go cannot be told from it.

    Raises:
      BoxError: not 4 finite numbers, empty, not overlapping the image, or its longer edge longer than the
        image's shorter side.
    """
    b = np.asarray(box, np.float64).reshape(-1)
    if b.size != 4 or not np.all(np.isfinite(b)):
        raise BoxError(f"a box is 4 numbers x0,y0,x1,y1 in pixels, got {list(box)}")
    x0, y0, x1, y1 = b
    text = ",".join(f"{v:g}" for v in b)
    if not (x1 > x0 and y1 > y0):
        raise BoxError(f"box {text} is empty: need x1 > x0 and y1 > y0")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise BoxError(f"box {text} lies wholly outside the {width}x{height} image (pixels, x0,y0,x1,y1); "
                       f"place it on the image")
    side = max(x1 - x0, y1 - y0)
    if side > min(width, height):
        raise BoxError(f"box {text} is made square by its longer edge ({side:g} px), which does not fit in the "
                       f"{width}x{height} image (pixels, x0,y0,x1,y1)")
    left = np.clip((x0 + x1 - side) / 2, 0, width - side)
    top = np.clip((y0 + y1 - side) / 2, 0, height - side)
    square = np.array([left, top, left + side, top + side])
    return (square / np.array([width, height, width, height])).astype(np.float32)


def prepare_persons(persons: Sequence[Person], *, height: int, width: int, max_persons: int,
                    landmark_px: int, analyzer: FaceAnalyzer, clip_size: int = 224,
                    clip_mean: Sequence[float] = CLIP_MEAN, clip_std: Sequence[float] = CLIP_STD,
                    landmark_layout: str = "face_mesh") -> PersonConditions:
    """Analyses every person's photos and builds the padded condition arrays; c_pe is drawn with
    ``landmark_layout`` (``face.draw.LANDMARK_LAYOUTS``) from ``Person.landmarks``, else the pose photo's, else the
    reference's landmarks. ``analyzer``: a ``FaceAnalyzer`` or another with its ``analyze`` (``PlainBackgroundAnalyzer``).

    Boxes and the person count are checked before any photo is analysed, so bad input fails fast.

    Raises:
      TooManyPersonsError, BoxError: as above; a box's message names its person (1-based). NoFaceError / ImageReadError / FaceTooSmallError: from the
      face analysis, naming the photo.
    """
    if len(persons) > max_persons:
        raise TooManyPersonsError(f"{len(persons)} persons given, the configured maximum is {max_persons} "
                                  f"(--config.realisid.max_persons)")
    boxes = np.zeros((max_persons, 4), np.float32)
    for k, person in enumerate(persons):
        try:
            boxes[k] = check_box(person.box, height, width)
        except BoxError as err:
            raise BoxError(f"person {k + 1}: {err}") from None
    pixels = np.zeros((max_persons, clip_size, clip_size, 3), np.float32)
    landmarks = np.zeros((max_persons, landmark_px, landmark_px, 3), np.float32)
    references = []
    for k, person in enumerate(persons):
        reference = _analyse(person.reference, analyzer, clip_size, clip_mean, clip_std)
        if person.landmarks is not None:
            points = np.asarray(person.landmarks, np.float32)
        elif person.pose is not None:
            points = _analyse(person.pose, analyzer, clip_size, clip_mean, clip_std).landmarks
        else:
            points = reference.landmarks
        pixels[k] = reference.pixels
        landmarks[k] = draw_landmark_image(points, landmark_px, layout=landmark_layout).astype(np.float32) / 255.0
        references.append(reference)
    valid = np.arange(max_persons) < len(persons)
    return PersonConditions(pixels, landmarks, boxes, valid, tuple(references))


def _analyse(image: ImageInput, analyzer: FaceAnalyzer, size: int, mean, std) -> ReferenceFace:
    rgb, source = _as_image(image)
    face = analyzer.analyze(rgb, policy="largest", source=source)[0]
    return preprocess_reference(rgb, face, size=size, mean=mean, std=std)


def conditioning_sheet(conditions: PersonConditions, height: int, width: int, *, thumb: int = 160) -> Image.Image:
    """One PNG-able sheet: per person a row of (reference crop, landmark image, location mask with the box
    actually used, its pixel coordinates written below it)."""
    n = len(conditions.references)
    sheet = Image.new("RGB", (3 * thumb, max(1, n) * thumb), "black")
    scale = thumb / max(height, width)
    for r in range(n):
        crop = Image.fromarray(conditions.references[r].crop).resize((thumb, thumb))
        marks = Image.fromarray((conditions.landmark_images[r] * 255).astype(np.uint8)).resize((thumb, thumb))
        mask = Image.new("RGB", (thumb, thumb), (40, 40, 40))
        x0, y0, x1, y1 = conditions.boxes[r] * np.array([width, height, width, height]) * scale
        draw = ImageDraw.Draw(mask)
        draw.rectangle([x0, y0, x1, y1], fill="white", outline="lime")
        used = conditions.boxes[r] * np.array([width, height, width, height])
        draw.text((2, thumb - 12), ",".join(f"{v:.0f}" for v in used), fill="lime")
        for c, tile in enumerate((crop, marks, mask)):
            sheet.paste(tile, (c * thumb, r * thumb))
    return sheet
