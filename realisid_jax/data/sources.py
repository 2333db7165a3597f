"""The source folder of ``realisid prepare-data``: its photos with their captions, and every other file in it
accounted for.

Captions come from a sidecar ``<stem>.txt`` next to the photo, else from a ``captions.jsonl`` in the photo's
folder (lines ``{"file": "<name relative to that folder>", "text": "..."}``). Caption files are read as UTF-8 (a
UTF-8 or UTF-16 byte-order mark is honoured); one that is not valid UTF-8 is read as Windows-1252, else as
Latin-1 (which decodes any bytes), and is named in ``SourceScan.decoded``. Not a charset detector
(charset-normalizer): on a caption's few dozen bytes its guess wanders between code pages, while Windows-1252 is
what a non-UTF-8 Western caption nearly always is and agrees with Latin-1 on every printable Latin-1 character.
"""
from __future__ import annotations

import codecs
import dataclasses
import json
import os
from collections.abc import Collection
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_SUFFIX = ".txt"
CAPTIONS_FILE = "captions.jsonl"
# Tried in order after UTF-8; Latin-1 maps every byte, so the last one never fails.
_FALLBACK_ENCODINGS = ("cp1252", "latin-1")


@dataclasses.dataclass(frozen=True)
class SourceItem:
    """One photo of the source folder: ``name`` is its POSIX path relative to that folder."""

    name: str
    path: Path
    caption: str | None


@dataclasses.dataclass(frozen=True)
class SourceScan:
    """Every file under a source folder, each in exactly one of ``photos``, ``captions`` and ``others``.

    Attributes:
      photos: the photos, sorted by relative path, with their captions (None: none, or an empty one).
      captions: relative POSIX paths of the caption files (``.txt`` files and ``captions.jsonl``).
      decoded: caption file -> the encoding it was read with, for those that are not UTF-8.
      orphans: captions that name no photo, ``{"file": ..., "message": ...}``: a ``.txt`` without a photo of its
        stem beside it, or a ``captions.jsonl`` line naming a missing photo (``file`` is then ``PATH:LINE``).
      others: relative POSIX paths of the files that are neither (other formats, hidden files).
    """

    photos: list[SourceItem]
    captions: list[str]
    decoded: dict[str, str]
    orphans: list[dict[str, str]]
    others: list[str]


def read_caption(file: str | os.PathLike) -> tuple[str, str]:
    """A caption file's text and the encoding it was read with (``"utf-8"``, ``"utf-16"``, ``"cp1252"`` or
    ``"latin-1"``); see the module docstring. Raises ``OSError`` only (an unreadable file)."""
    data = Path(file).read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        attempts = ("utf-16", "utf-8-sig", *_FALLBACK_ENCODINGS)
    else:
        attempts = ("utf-8-sig", *_FALLBACK_ENCODINGS)
    for encoding in attempts:
        try:
            return data.decode(encoding), "utf-8" if encoding == "utf-8-sig" else encoding
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")


def scan_sources(src: str | os.PathLike, *, skip_dirs: Collection[str] = ()) -> SourceScan:
    """Lists every file under ``src`` (recursive) as a photo, a caption or another file; folders named in
    ``skip_dirs`` (e.g. a work folder inside ``src``) are not looked into.

    Raises:
      FileNotFoundError: ``src`` is not a folder.
      ValueError: a ``captions.jsonl`` line is not a JSON object with string "file" and "text".
    """
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"source folder {root} not found")
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and not set(skip_dirs) & set(p.relative_to(root).parts[:-1]))
    name = {path: path.relative_to(root).as_posix() for path in files}
    photos = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    captions = [p for p in files if p.suffix.lower() == CAPTION_SUFFIX or p.name == CAPTIONS_FILE]
    decoded, orphans = {}, []

    def read(file: Path) -> str:
        text, encoding = read_caption(file)
        if encoding != "utf-8":
            decoded[name[file]] = encoding
        return text

    photo_paths = {p.resolve() for p in photos}
    listed = {}  # resolved photo path -> caption from a captions.jsonl
    for file in (p for p in captions if p.name == CAPTIONS_FILE):
        for number, target, caption in _caption_lines(file, read(file)):
            path = (file.parent / target).resolve()
            if path in photo_paths:
                listed[path] = caption
            else:
                orphans.append({"file": f"{name[file]}:{number}",
                                "message": f"caption for {target!r}, which is not a photo in {file.parent}"})
    sidecars = {p.with_suffix(CAPTION_SUFFIX) for p in photos}
    texts = {}
    for file in (p for p in captions if p.suffix.lower() == CAPTION_SUFFIX):
        if file in sidecars:
            texts[file] = read(file)
        else:
            orphans.append({"file": name[file],
                            "message": f"caption without a photo: no {file.stem}.jpg/.png/... beside it"})
    items = [SourceItem(name[p], p, _caption(texts.get(p.with_suffix(CAPTION_SUFFIX), listed.get(p.resolve()))))
             for p in photos]
    known = set(photos) | set(captions)
    return SourceScan(items, [name[p] for p in captions], decoded, orphans, [name[p] for p in files if p not in known])


def _caption(text: str | None) -> str | None:
    return (text or "").strip() or None


def _caption_lines(file: Path, text: str):
    """(line number, photo name relative to the file's folder, caption) per line of a ``captions.jsonl``."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            target, caption = record["file"], record["text"]
            if not (isinstance(target, str) and isinstance(caption, str)):
                raise TypeError("'file' and 'text' must be strings")
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{file}:{number}: bad caption line ({err}): {line[:200]}") from err
        yield number, target, caption
