"""The evaluation manifest: which generated image shows which reference persons, where, for which prompt.

``DIR/manifest.json`` next to the generated images (``realisid benchmark-prompts`` writes it; a
``realisid sample`` output folder holding ``image_000.png``… is evaluated by writing one with
``write_manifest``)::

    {
      "format": "realisid-eval-manifest",
      "version": 1,
      "images": [
        {
          "id": "astronaut-p00-f4-s0-0",            # unique; names the rows of the report
          "image": "images/astronaut-p00-f4-s0-0.png",
          "prompt": "a photo of a person ...",
          "seed": 0,                                # optional, informative
          "persons": [
            {
              "identity": "astronaut",              # optional; default: the reference file's stem
              "reference": "refs/astronaut.png",    # reference photo (its largest face)
              "box": [192.0, 102.4, 320.0, 230.4],  # x0, y0, x1, y1 output-image pixels, or null
              "pose": null                          # optional pose/expression photo (default: reference)
            }
          ]
        }
      ]
    }

Relative ``image`` paths are relative to DIR; relative ``reference``/``pose`` paths to the references
folder given to ``read_manifest`` (``realisid evaluate --refs``), by default DIR too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT = "realisid-eval-manifest"
VERSION = 1


class ManifestError(ValueError):
    """A manifest that is missing, not JSON, or not in the format above; the message names the entry."""


@dataclasses.dataclass(frozen=True)
class ManifestPerson:
    """One person of a generated image; paths are resolved (absolute) after ``read_manifest``."""

    reference: str
    box: tuple[float, float, float, float] | None = None
    pose: str | None = None
    identity: str | None = None

    @property
    def name(self) -> str:
        return self.identity or Path(self.reference).stem


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One generated image."""

    id: str
    image: str
    prompt: str
    persons: tuple[ManifestPerson, ...]
    seed: int | None = None


def write_manifest(folder: str | os.PathLike, entries: Sequence[ManifestEntry]) -> Path:
    """Writes ``folder/manifest.json`` (paths as given: make them relative for a movable folder); returns
    its path. Raises ManifestError on duplicate ids."""
    _check_ids(entries)
    path = Path(folder) / MANIFEST_NAME
    images = []
    for e in entries:
        persons = [{"identity": p.identity, "reference": str(p.reference),
                    "box": None if p.box is None else [float(v) for v in p.box],
                    "pose": None if p.pose is None else str(p.pose)} for p in e.persons]
        images.append({"id": e.id, "image": str(e.image), "prompt": e.prompt, "seed": e.seed, "persons": persons})
    path.write_text(json.dumps({"format": FORMAT, "version": VERSION, "images": images}, indent=1))
    return path


def read_manifest(folder: str | os.PathLike, refs: str | os.PathLike | None = None) -> list[ManifestEntry]:
    """Reads ``folder/manifest.json`` and resolves its paths (see the module docstring).

    Raises:
      ManifestError: missing file, bad JSON, wrong format/version, missing or malformed fields, duplicate
        ids; the message names the entry.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_NAME} in {folder} (write one with realisid_jax.eval.manifest."
                            "write_manifest, or generate with `realisid benchmark-prompts`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ManifestError(f"{path}: expected \"format\": {FORMAT!r}, \"version\": {VERSION}")
    ref_root = Path(refs) if refs is not None else folder
    entries = [_entry(item, i, folder, ref_root, path) for i, item in enumerate(data.get("images", []))]
    _check_ids(entries)
    return entries


def _resolve(root: Path, value: str) -> str:
    p = Path(value)
    return str(p if p.is_absolute() else root / p)


def _entry(item: dict, index: int, folder: Path, ref_root: Path, path: Path) -> ManifestEntry:
    where = f"{path}, images[{index}]"
    try:
        persons = tuple(_person(p, ref_root, f"{where}.persons[{k}]") for k, p in enumerate(item.get("persons", [])))
        return ManifestEntry(id=str(item["id"]), image=_resolve(folder, item["image"]), prompt=str(item["prompt"]),
                             persons=persons, seed=item.get("seed"))
    except (KeyError, TypeError) as err:
        raise ManifestError(f"{where}: missing or malformed field {err}") from err


def _person(p: dict, ref_root: Path, where: str) -> ManifestPerson:
    box = p.get("box")
    if box is not None:
        if len(box) != 4 or not box[2] > box[0] or not box[3] > box[1]:
            raise ManifestError(f"{where}: box must be [x0, y0, x1, y1] with x1 > x0, y1 > y0, got {box}")
        box = tuple(float(v) for v in box)
    pose = p.get("pose")
    return ManifestPerson(reference=_resolve(ref_root, p["reference"]), box=box,
                          pose=None if pose is None else _resolve(ref_root, pose), identity=p.get("identity"))


def _check_ids(entries: Sequence[ManifestEntry]) -> None:
    seen = set()
    for e in entries:
        if e.id in seen:
            raise ManifestError(f"duplicate image id {e.id!r} in the manifest")
        seen.add(e.id)
