"""Generation records in PNG text chunks: every image ``realisid sample`` and ``realisid app`` write carries
the whole request, so ``realisid sample --from-png FILE`` re-runs it from the file alone.

One ``tEXt``/``iTXt`` chunk per scalar field, keyed ``realisid:<field>`` with a JSON value (readable with any
PNG tool, e.g. ``identify -verbose``), and per person the reference (and pose) photo as a lossless PNG in a
compressed ``zTXt`` chunk: the photo the face analysis saw, bit for bit, so the conditions come out the same.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, PngImagePlugin

_PREFIX = "realisid:"
#: Command-line weight flags recorded with each image (``argparse`` attribute names).
WEIGHT_FLAGS = ("base", "branches", "image_encoder", "variant", "lora")
# A photo chunk holds a whole PNG (base64): far above Pillow's 1 MiB decompression guard for text chunks.
_MAX_PHOTO_CHUNK = 256 * 1024 * 1024


class MetadataError(ValueError):
    """A PNG without a (complete) generation record."""


@dataclasses.dataclass(frozen=True, eq=False)
class Generation:
    """One request, as actually run.

    Attributes:
      prompt, negative_prompt: the texts (``negative_prompt`` None = the config's).
      seed: the initial-noise seed (int); image ``image_index`` of ``num_images`` drawn from it.
      boxes: per person ``(x0, y0, x1, y1)`` output pixels, as the pipeline used them (squared, inside).
      steps, scheduler: denoising steps and sampler name (``schedulers.SCHEDULERS``).
      text_guidance_scale, id_guidance_scale: λ_t and λ_i of paper Eq. 8.
      id_start_fraction: delayed ID conditioning, fraction of the steps without ID.
      height, width: output size, pixels.
      config: config file as given; config_overrides: ``a.b=value`` strings applied to it.
      weights: ``base`` / ``branches`` / ``image_encoder`` folders (None = the config's random weights),
        ``variant``, ``lora`` (``[file, scale]`` pairs, in merge order).
      references: per person (H, W, 3) uint8 RGB reference photo; poses: per person pose photo or None.
      rotations: per person the pose of a square subject in degrees, counter-clockwise (``Person.landmarks`` =
        ``face.draw.square_keypoints(rotation)``), or None (its pose photo's or reference's own); () = all None
        (records written before rotations were recorded read so).
    """

    prompt: str
    negative_prompt: str | None
    seed: int
    boxes: tuple[tuple[float, float, float, float], ...]
    steps: int
    scheduler: str
    text_guidance_scale: float
    id_guidance_scale: float
    id_start_fraction: float
    height: int
    width: int
    num_images: int
    config: str
    config_overrides: tuple[str, ...] = ()
    weights: dict = dataclasses.field(default_factory=dict)
    image_index: int = 0
    references: tuple[np.ndarray, ...] = ()
    poses: tuple[np.ndarray | None, ...] = ()
    rotations: tuple[float | None, ...] = ()

    def for_image(self, index: int) -> Generation:
        """The same record for image ``index`` of the batch."""
        return dataclasses.replace(self, image_index=index)


_SCALARS = tuple(f.name for f in dataclasses.fields(Generation) if f.name not in ("references", "poses"))
_OPTIONAL = ("rotations",)  # fields added later: a record without one reads as the field's default


def png_info(generation: Generation) -> PngImagePlugin.PngInfo:
    """PNG text chunks holding ``generation`` (pass as ``Image.save(..., pnginfo=...)``)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "realisid-jax")
    for name in _SCALARS:
        info.add_text(_PREFIX + name, json.dumps(getattr(generation, name), ensure_ascii=False))
    for kind, photos in (("reference", generation.references), ("pose", generation.poses)):
        for k, photo in enumerate(photos):
            if photo is not None:
                info.add_text(f"{_PREFIX}{kind}:{k}", _encode_photo(photo), zip=True)
    return info


def save_png(image: Image.Image | np.ndarray, path: str | os.PathLike, generation: Generation) -> None:
    """Writes ``image`` as a PNG carrying ``generation``."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path, format="PNG", pnginfo=png_info(generation))


def read_generation(path: str | os.PathLike) -> Generation:
    """The record of a PNG written by ``save_png``.

    Raises:
      FileNotFoundError: no such file. MetadataError: not a PNG, or no complete realisid record in it.
    """
    limit = PngImagePlugin.MAX_TEXT_CHUNK
    PngImagePlugin.MAX_TEXT_CHUNK = _MAX_PHOTO_CHUNK
    try:
        with Image.open(path) as image:
            image.load()
            text = dict(getattr(image, "text", {}))
    except Image.UnidentifiedImageError:
        raise MetadataError(f"{path} is not an image") from None
    finally:
        PngImagePlugin.MAX_TEXT_CHUNK = limit
    missing = [n for n in _SCALARS if _PREFIX + n not in text and n not in _OPTIONAL]
    if missing:
        raise MetadataError(f"{path} carries no realisid generation record (missing: {', '.join(missing)})")
    fields = {n: json.loads(text[_PREFIX + n]) for n in _SCALARS if _PREFIX + n in text}
    fields["boxes"] = tuple(tuple(float(v) for v in b) for b in fields["boxes"])
    fields["config_overrides"] = tuple(fields["config_overrides"])
    fields["rotations"] = tuple(None if r is None else float(r) for r in fields.get("rotations", ()))
    n = len(fields["boxes"])
    references = tuple(_photo(text, f"reference:{k}", path) for k in range(n))
    poses = tuple(_decode_photo(text[key]) if (key := f"{_PREFIX}pose:{k}") in text else None for k in range(n))
    return Generation(**fields, references=references, poses=poses)


def _photo(text: dict, name: str, path) -> np.ndarray:
    if _PREFIX + name not in text:
        raise MetadataError(f"{path}: the generation record has no {name} photo")
    return _decode_photo(text[_PREFIX + name])


def _encode_photo(photo: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(photo, np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode_photo(text: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(text))) as image:
        return np.asarray(image.convert("RGB"))


def pixel_boxes(normalised: np.ndarray, valid: np.ndarray, height: int, width: int) -> tuple:
    """The valid rows of (K, 4) normalised boxes as pixel tuples (``PersonConditions.boxes`` -> ``boxes``)."""
    scale = np.array([width, height, width, height], np.float64)
    return tuple(tuple(float(v) for v in np.asarray(b, np.float64) * scale) for b in np.asarray(normalised)[valid])


def recorded_persons(generation: Generation) -> list:
    """The record's persons as pipeline input (``realisid.conditions.Person``; a rotation becomes its landmarks)."""
    from realisid_jax.face.draw import square_keypoints
    from realisid_jax.realisid.conditions import Person

    n = len(generation.boxes)
    poses: Sequence = generation.poses or (None,) * n
    rotations: Sequence = generation.rotations or (None,) * n
    return [Person(ref, box, pose, None if rotation is None else square_keypoints(rotation))
            for ref, box, pose, rotation in zip(generation.references, generation.boxes, poses, rotations)]


def person_photos(persons: Sequence) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray | None, ...]]:
    """(references, poses) of ``Person``s as the (H, W, 3) uint8 RGB arrays the face analysis reads (files are
    decoded by the project's one image loader, so a re-run sees the same pixels)."""
    from realisid_jax.face.image import as_rgb8, load_image

    def rgb(photo):
        if photo is None:
            return None
        return as_rgb8(photo) if isinstance(photo, np.ndarray) else load_image(photo)

    return tuple(rgb(p.reference) for p in persons), tuple(rgb(p.pose) for p in persons)
