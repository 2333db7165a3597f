"""``manifest.jsonl``: generated glyph-world images and what each was asked to show, in a form anyone can score.

One JSON object per line, one line per image::

    {"image": "images/00017.png", "variant": "realisid", "caption": "a glyph on a teal background",
     "background": "teal", "height": 256, "width": 256,
     "persons": [{"identity": "A", "box": [40.0, 52.0, 104.0, 116.0], "rotation_deg": -12.5,
                  "reference": "refs/A-3.png"}]}

``image`` and ``reference`` are paths relative to the manifest's folder (absolute paths pass through); ``box`` is
``[x0, y0, x1, y1]`` in the output image's pixels; ``rotation_deg`` is counter-clockwise, as Pillow's
``Image.rotate(angle)`` turns an image; ``background`` is a name of ``world.BACKGROUNDS`` and ``identity`` one of
``world.IDENTITIES``. ``score_manifest`` scores every image with the glyph scorer and summarises per variant and
per box-size bucket.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from realisid_jax.face.image import load_image
from realisid_jax.glyphs import world
from realisid_jax.glyphs.scorer import BOX_FRACTIONS, Scorer, score_image

MANIFEST_NAME = "manifest.jsonl"


class ManifestError(ValueError):
    """A manifest line that is not JSON or not a record of the format above; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class Person:
    """One requested person: ``identity`` (of ``world.IDENTITIES``), ``box`` (x0, y0, x1, y1) output pixels,
    ``rotation_deg`` counter-clockwise, ``reference`` the reference image's path as written in the manifest."""

    identity: str
    box: tuple[float, float, float, float]
    rotation_deg: float
    reference: str


@dataclasses.dataclass(frozen=True)
class Record:
    """One generated image and its request; ``image`` as written in the manifest (see ``Record.path``)."""

    image: str
    variant: str
    caption: str
    background: str
    height: int
    width: int
    persons: tuple[Person, ...]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "persons": [{**dataclasses.asdict(p), "box": list(p.box)}
                                                        for p in self.persons]}


def resolve(manifest_path: str | os.PathLike, path: str) -> Path:
    """A manifest path (``image`` or ``reference``) as a file path: relative to the manifest's folder."""
    return Path(manifest_path).parent / path


def write_manifest(path: str | os.PathLike, records: Iterable[Record]) -> Path:
    """Writes ``records`` as ``manifest.jsonl`` lines to ``path`` (a file, or a folder to write
    ``MANIFEST_NAME`` into); each record is validated first. Returns the file written.

    Raises:
      ManifestError: an invalid record (its index named).
    """
    path = Path(path)
    path = path / MANIFEST_NAME if path.is_dir() else path
    lines = []
    for index, record in enumerate(records):
        lines.append(json.dumps(_parse(record.to_json(), f"record {index}").to_json()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def read_manifest(path: str | os.PathLike) -> list[Record]:
    """Reads a ``manifest.jsonl`` (blank lines skipped).

    Raises:
      FileNotFoundError: no such file.
      ManifestError: a line that is not JSON or not a valid record; the message is ``FILE:LINE: what``.
    """
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
        records.append(_parse(item, where))
    return records


_FIELDS = {"image": str, "variant": str, "caption": str, "background": str, "height": int, "width": int,
           "persons": list}
_PERSON_FIELDS = {"identity": str, "box": list, "rotation_deg": (int, float), "reference": str}


def _check_fields(item, fields: dict, where: str) -> None:
    if not isinstance(item, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(item).__name__}")
    missing = [k for k in fields if k not in item]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
    for key, kind in fields.items():
        if not isinstance(item[key], kind) or isinstance(item[key], bool):
            raise ManifestError(f"{where}: field {key!r} has the wrong type ({type(item[key]).__name__})")


def _parse(item, where: str) -> Record:
    _check_fields(item, _FIELDS, where)
    if item["background"] not in world.BACKGROUNDS:
        raise ManifestError(f"{where}: unknown background {item['background']!r} "
                            f"(one of {', '.join(world.BACKGROUNDS)})")
    if item["height"] <= 0 or item["width"] <= 0:
        raise ManifestError(f"{where}: height and width must be positive, got {item['height']}x{item['width']}")
    persons = []
    for k, p in enumerate(item["persons"]):
        at = f"{where}: persons[{k}]"
        _check_fields(p, _PERSON_FIELDS, at)
        if p["identity"] not in world.IDENTITIES:
            raise ManifestError(f"{at}: unknown identity {p['identity']!r} (one of {' '.join(world.IDENTITIES)})")
        box = p["box"]
        if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise ManifestError(f"{at}: box must be 4 numbers [x0, y0, x1, y1], got {box!r}")
        if not (box[2] > box[0] and box[3] > box[1]) or not all(math.isfinite(v) for v in box):
            raise ManifestError(f"{at}: box {box!r} is empty or not finite (x1 > x0 and y1 > y0 needed)")
        if not math.isfinite(p["rotation_deg"]):
            raise ManifestError(f"{at}: rotation_deg is not finite")
        persons.append(Person(p["identity"], tuple(float(v) for v in box), float(p["rotation_deg"]), p["reference"]))
    return Record(item["image"], item["variant"], item["caption"], item["background"], item["height"],
                  item["width"], tuple(persons))


def box_bucket(box: Sequence[float], width: int, height: int) -> str:
    """The nearest (in log scale) of ``scorer.BOX_FRACTIONS`` to the box edge over the image edge, as "1/N"."""
    fraction = max(box[2] - box[0], box[3] - box[1]) / max(width, height)
    nearest = min(BOX_FRACTIONS, key=lambda f: abs(math.log(fraction / f)))
    return f"1/{round(1 / nearest)}"


def record_of(spec: world.SceneSpec, *, image: str, variant: str, references: Sequence[str] | None = None,
              caption: str | None = None) -> Record:
    """The record of an image generated for a world request ``spec`` (its background, persons' identities, boxes
    and rotations; height and width = ``spec.size``); ``references``: one path per person (default "")."""
    references = [""] * len(spec.persons) if references is None else list(references)
    if len(references) != len(spec.persons):
        raise ValueError(f"{len(references)} references for {len(spec.persons)} persons")
    persons = tuple(Person(p.identity, tuple(float(v) for v in p.box), float(p.rotation_deg), ref)
                    for p, ref in zip(spec.persons, references))
    return Record(image, variant, spec.caption if caption is None else caption, spec.background, spec.size,
                  spec.size, persons)


def score_manifest(scorer: Scorer, manifest_path: str | os.PathLike) -> list[dict]:
    """Scores every image of a manifest with ``scorer.score_image``; ``summarize`` the rows for the figures.

    Returns:
      One dict per image: ``score_image``'s result plus ``image``, ``variant`` and each person's ``bucket``
      ("1/2" .. "1/10", ``box_bucket``).

    Raises:
      ManifestError: as ``read_manifest``; an image whose size is not the record's ``height`` x ``width``.
      face.errors.ImageReadError: a missing or unreadable image (the message names it).
    """
    rows = []
    for number, record in enumerate(read_manifest(manifest_path), start=1):
        image = load_image(resolve(manifest_path, record.image))
        if image.shape[:2] != (record.height, record.width):
            raise ManifestError(f"{manifest_path}: record {number} ({record.image}): image is "
                                f"{image.shape[1]}x{image.shape[0]}, the record says {record.width}x{record.height}")
        row = score_image(scorer, image, record)
        for person, request in zip(row["persons"], record.persons):
            person["bucket"] = box_bucket(request.box, record.width, record.height)
        rows.append({"image": record.image, "variant": record.variant, **row})
    return rows


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _median(values) -> float | None:
    return float(np.median(values)) if len(values) else None


def _person_figures(persons: list[dict]) -> dict:
    return {"identity_accuracy": _mean([p["correct"] for p in persons]),
            "median_iou": _median([p["iou"] for p in persons]),
            "median_rotation_error_deg": _median([p["rotation_error_deg"] for p in persons])}


def _figures(rows: list[dict]) -> dict:
    persons = [p for row in rows for p in row["persons"]]
    pairs = [row for row in rows if len(row["persons"]) == 2]
    order = [f"1/{round(1 / f)}" for f in BOX_FRACTIONS]
    buckets = {b: [p for p in persons if p["bucket"] == b] for b in order}
    return {"images": len(rows), "background_accuracy": _mean([row["background_correct"] for row in rows]),
            **_person_figures(persons), "two_person_images": len(pairs),
            "two_person_both_correct": _mean([row["both_correct"] for row in pairs]),
            "two_person_swapped": _mean([row["swapped"] for row in pairs]),
            "buckets": {b: {"persons": len(ps), **_person_figures(ps)} for b, ps in buckets.items() if ps}}


def summarize(rows: list[dict]) -> dict:
    """The figures of ``score_manifest``'s rows, over all of them and per variant.

    Returns:
      ``{"images", "background_accuracy", "identity_accuracy", "median_iou", "median_rotation_error_deg",
      "two_person_images", "two_person_both_correct" (both identities right, hence unswapped),
      "two_person_swapped" (each box shows the other's identity), "buckets": {"1/2": {"persons",
      "identity_accuracy", "median_iou", "median_rotation_error_deg"}, ...}, "variants": {variant: the same
      figures for its rows}}``; a figure with nothing to measure is ``None``, an empty bucket is left out.
    """
    variants = defaultdict(list)
    for row in rows:
        variants[row["variant"]].append(row)
    return {**_figures(rows), "variants": {v: _figures(group) for v, group in variants.items()}}
