"""Training-data preparation: a folder of captioned photos -> the ``realisid_faces`` TFDS dataset.

Per the paper's Training section: single-person image-text pairs, the reference face being the
target image's own face; detection, parsing and landmarks are computed once and stored with the
sample. Each photo is

1. read with ``realisid_jax.face.load_image`` (corrupt files are skipped: ``corrupt_image``);
2. analysed at its own resolution by ``FaceAnalyzer`` (policy "all"): no face -> ``no_face``; a
   second face at least ``max_other_face_ratio`` times the size of the largest -> ``multiple_faces``
   (the largest face is the subject, smaller background faces are tolerated);
3. resized by its shorter side to ``resolution`` and cropped to a square. The crop is centred, then
   moved along the longer axis by the least amount that keeps the subject's square face box inside
   it (a plain centre crop would cut off faces near the edge of landscape/portrait photos); the photo's
   size and the crop's offset are stored for SDXL's micro-conditioning;
4. the subject's box is made square by its longer edge (paper), mapped to the crop and moved inside
   ``[0, resolution]`` if it sticks out (clipped to the whole frame when larger than it); a side below
   ``min_face_px`` training pixels -> ``face_too_small``;
5. the reference crop for CLIP comes from the full-resolution photo
   (``face.preprocess.preprocess_reference``: square box, zero background, ``reference_size``).

Photos without a caption are skipped (``no_caption``) before any analysis. Captions come from a
sidecar ``<stem>.txt`` next to the photo, else from a ``captions.jsonl`` in the photo's folder
(lines ``{"file": "<name relative to that folder>", "text": "..."}``); a caption file that is not
UTF-8 is read as Windows-1252 or Latin-1 and named in the summary (``realisid_jax.data.sources``).
Every other file of the source folder is accounted for too: captions naming no photo
(``orphan_caption``) and files that are neither photos nor captions (``not_a_photo``) are listed in
``skipped.jsonl`` beside the skipped photos.

Resumability: each analysed photo's result (the sample's image-derived fields, or its skip reason) is
written atomically to ``OUT/_work/<options fingerprint>/<xx>/<key>.npz`` where the key hashes the
photo's relative path, size and modification time. A rerun only analyses photos without a result,
then rewrites the whole dataset from the cache (captions are read afresh, so editing a caption does
not re-analyse its photo). Unexpected exceptions are counted as ``error`` and not cached, so they are
retried on the next run.

With an ``InputEncoder`` (``prepare-data --precompute``) the frozen encoders' outputs are stored too
(``data.precomputed``: VAE posterior moments, text embeddings, CLIP image features; the empty prompt's
embeddings once), computed while the dataset is written from the very bytes it stores; they are not cached, an
interrupted run encodes again. Without, they are left to the trainer.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from realisid_jax.data import builder
from realisid_jax.data.sources import SourceItem, SourceScan, scan_sources
from realisid_jax.errors import disk_full
from realisid_jax.face.errors import FaceTooSmallError, ImageReadError, NoFaceError

if TYPE_CHECKING:  # JAX and the models are imported only when encoding (not in the analysis workers)
    from realisid_jax.data.precompute import InputEncoder

log = logging.getLogger(__name__)

WORK_DIR = "_work"
SUMMARY_FILE = "prepare_summary.json"
SKIPPED_FILE = "skipped.jsonl"
SKIP_REASONS = ("corrupt_image", "no_caption", "no_face", "face_too_small", "multiple_faces")
# Bump when the content of a cached result changes meaning, so old caches are not reused.
_CACHE_FORMAT = 2  # 2: original_size, crops_coords_top_left
_ARRAY_FIELDS = ("face_box", "landmarks")
_INT_FIELDS = ("original_size", "crops_coords_top_left")
_BYTES_FIELDS = ("image", "face_mask", "reference")


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """What a prepared sample looks like; every field is part of the cache fingerprint.

    Attributes:
      resolution: side of the square training image, pixels.
      reference_size: side of the CLIP reference crop (the image encoder's ``image_size``).
      image_format: "jpeg" or "png" encoding of the training image (mask and reference are PNG).
      jpeg_quality: 0-100, for "jpeg".
      min_face_px: smallest accepted side of the square face box in the training frame, pixels.
      max_other_face_ratio: a photo whose second-largest face is at least this fraction of the
        largest one's size is a multi-person photo and skipped; > 1 keeps all.
    """

    resolution: int = 1024
    reference_size: int = 224
    image_format: str = "jpeg"
    jpeg_quality: int = 95
    min_face_px: float = 32.0
    max_other_face_ratio: float = 0.5

    def __post_init__(self):
        # Normalised types: 16 and 16.0 must give the same fingerprint.
        for field in dataclasses.fields(self):
            kind = {"int": int, "float": float, "str": str}[field.type]
            object.__setattr__(self, field.name, kind(getattr(self, field.name)))
        if self.image_format not in builder.IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {builder.IMAGE_FORMATS}, "
                             f"got {self.image_format!r}")
        if self.resolution < 8 or self.reference_size < 8:
            raise ValueError(f"resolution {self.resolution} / reference_size "
                             f"{self.reference_size} too small")

    def fingerprint(self) -> str:
        """Short hash naming the cache folder of results made with these options."""
        blob = json.dumps([_CACHE_FORMAT, dataclasses.asdict(self)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class SkipSample(Exception):
    """A photo that cannot become a training sample; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# Source listing


def list_sources(src: str | os.PathLike) -> list[SourceItem]:
    """All photos under ``src`` (recursive, sorted by relative path) with their captions; the work folder of a
    dataset written inside ``src`` is not looked into. See ``realisid_jax.data.sources.scan_sources``.

    Raises:
      FileNotFoundError: ``src`` is not a folder.
      ValueError: a ``captions.jsonl`` line is not a JSON object with string "file" and "text".
    """
    return scan_sources(src, skip_dirs=(WORK_DIR,)).photos


# ---------------------------------------------------------------------------------------------
# One sample


def crop_offset(extent: float, lo: float, hi: float, size: int) -> int:
    """Start of a ``size``-long window on ``[0, extent]``: centred, moved by the least amount that
    makes it contain ``[lo, hi]`` (centred on it when longer than ``size``), kept inside
    ``[0, extent]``; an integer so that a photo already at the training size is copied exactly."""
    start = (extent - size) / 2
    start = (lo + hi - size) / 2 if hi - lo > size else min(max(start, hi - size), lo)
    # Clamped in whole pixels: a short side scaled to ``size`` is often 1023.9999999999999, whose float floor
    # would give -1 (a border row in the frame); 1e-6 px is far above that rounding, far below a pixel.
    last = max(0, int(np.floor(extent + 1e-6)) - size)
    return min(max(round(start), 0), last)


def frame_image(rgb: np.ndarray, to_frame: np.ndarray, size: int) -> np.ndarray:
    """The (size, size, 3) training frame of ``rgb`` through the (2, 3) map ``to_frame`` (photo -> frame px).

    Edge pixels are replicated: an up-scaled photo's outer pixel centres sample just past its border, where
    a constant (black) border would darken the outer rows and columns of the frame.
    """
    from realisid_jax.face.image import warp_affine

    return warp_affine(rgb, to_frame, (size, size), border="replicate")


def fit_square(box: np.ndarray, size: int) -> np.ndarray:
    """Move a square box inside ``[0, size]^2`` keeping its side; the whole frame if larger."""
    side = float(box[2] - box[0])
    if side >= size:
        return np.array([0, 0, size, size], np.float32)
    x0 = np.clip(box[0], 0, size - side)
    y0 = np.clip(box[1], 0, size - side)
    return np.array([x0, y0, x0 + side, y0 + side], np.float32)


def prepare_sample(path: str | os.PathLike, analyzer, options: PrepareOptions) -> dict[str, Any]:
    """Analyse one photo into the image-derived fields of a dataset example.

    Args:
      path: the photo.
      analyzer: a ``realisid_jax.face.FaceAnalyzer`` (its policy is overridden with "all").
      options: output geometry and acceptance thresholds.

    Returns:
      dict with ``image``, ``face_mask``, ``reference`` (encoded bytes), ``face_box`` (4,) float32
      and ``landmarks`` (468, 2) float32 (training-frame pixels), ``original_size`` (2,) int32 ``(h, w)``
      of the photo and ``crops_coords_top_left`` (2,) int32 ``(top, left)`` (see ``builder``).

    Raises:
      SkipSample: the photo is unusable; ``reason`` says why.
    """
    from realisid_jax.face.image import load_image, warp_affine
    from realisid_jax.face.preprocess import preprocess_reference, square_box

    try:
        rgb = load_image(path)
        faces = analyzer.analyze(rgb, policy="all", source=path)
    except ImageReadError as err:
        raise SkipSample("corrupt_image", str(err)) from err
    except NoFaceError as err:
        raise SkipSample("no_face", str(err)) from err
    except FaceTooSmallError as err:
        raise SkipSample("face_too_small", str(err)) from err
    subject = faces[0]
    if len(faces) > 1 and faces[1].size >= options.max_other_face_ratio * subject.size:
        raise SkipSample("multiple_faces", f"{path}: {len(faces)} faces, second one "
                         f"{faces[1].size:.0f} px vs {subject.size:.0f} px")

    r = options.resolution
    h, w = rgb.shape[:2]
    scale = r / min(h, w)
    square = square_box(subject.box) * scale
    ox = crop_offset(w * scale, square[0], square[2], r)
    oy = crop_offset(h * scale, square[1], square[3], r)
    box = square - np.array([ox, oy, ox, oy], np.float32)
    if box[2] - box[0] < options.min_face_px:
        raise SkipSample("face_too_small", f"{path}: face box {box[2] - box[0]:.1f} px at "
                         f"resolution {r}, below {options.min_face_px:.0f} px")
    to_frame = np.array([[scale, 0, -ox], [0, scale, -oy]])
    image = frame_image(rgb, to_frame, r)
    mask = warp_affine(subject.mask.astype(np.float32), to_frame, (r, r)) >= 0.5
    reference = preprocess_reference(rgb, subject, size=options.reference_size).crop
    return {
        "image": _encode(image, options.image_format, options.jpeg_quality),
        "face_box": fit_square(box, r),
        "landmarks": (subject.landmarks * scale - np.array([ox, oy])).astype(np.float32),
        "face_mask": _encode(mask.astype(np.uint8) * 255, "png"),
        "reference": _encode(reference, "png"),
        "original_size": np.array([h, w], np.int32),
        "crops_coords_top_left": np.array([oy, ox], np.int32),
    }


def _encode(image: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    import cv2

    if image.ndim == 3:
        image = image[..., ::-1]  # OpenCV writes BGR
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if image_format == "jpeg" else []
    ok, data = cv2.imencode(".jpg" if image_format == "jpeg" else ".png", image, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} image as {image_format}")
    return data.tobytes()


# ---------------------------------------------------------------------------------------------
# Result cache


def cache_key(item: SourceItem) -> str:
    """Hash of the photo's relative path, size and modification time: a changed file is redone."""
    stat = item.path.stat()
    return hashlib.sha256(f"{item.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()


def _cache_file(cache: Path, key: str) -> Path:
    return cache / key[:2] / f"{key}.npz"


def _save_result(file: Path, result: dict[str, Any]) -> None:
    """Write atomically: a reader (or a rerun after a kill) never sees half a file."""
    arrays = {k: (np.frombuffer(v, np.uint8) if isinstance(v, bytes) else np.asarray(v))
              for k, v in result.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    file.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(file, buffer.getvalue())


def _write_atomic(file: Path, data: bytes) -> None:
    """Writes ``data`` to ``file`` through a temporary file renamed into place: ``file`` is whole or absent, and a
    failed write (a full disk) leaves no temporary file either."""
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _skip_of(file: Path) -> dict[str, str] | None:
    """The cached skip reason and message, or None for a good sample (its arrays are not read)."""
    with np.load(file, allow_pickle=False) as data:
        if "reason" not in data:
            return None
        return {"reason": str(data["reason"]), "message": str(data["message"])}


def _load_result(file: Path) -> dict[str, Any]:
    with np.load(file, allow_pickle=False) as data:
        out = {k: data[k].tobytes() for k in _BYTES_FIELDS}
        out.update({k: data[k].astype(np.float32) for k in _ARRAY_FIELDS})
        out.update({k: data[k].astype(np.int32) for k in _INT_FIELDS})
        return out


# ---------------------------------------------------------------------------------------------
# Workers

_worker_state: dict[str, Any] = {}


def _init_worker(options: PrepareOptions, pool: bool = True) -> None:
    from realisid_jax.face.analysis import FaceAnalyzer

    if pool:
        import cv2

        cv2.setNumThreads(1)  # parallelism comes from the worker processes
    # Sizes are judged in the training frame (``min_face_px``), not in source pixels.
    _worker_state["analyzer"] = FaceAnalyzer(policy="all", min_face_px=1.0)
    _worker_state["options"] = options


def _run_task(task: tuple[str, str, str]) -> tuple[str, str, str | None, str]:
    """(name, path, cache file) -> (name, "ok" | "skip" | "error", reason, message)."""
    name, path, file = task
    try:
        result = prepare_sample(path, _worker_state["analyzer"], _worker_state["options"])
    except SkipSample as skip:
        _save_result(Path(file), {"reason": skip.reason, "message": str(skip)})
        return name, "skip", skip.reason, str(skip)
    except Exception as err:  # noqa: BLE001 - one bad photo must not stop a long job
        return name, "error", None, f"{name}: {type(err).__name__}: {err}"
    _save_result(Path(file), result)
    return name, "ok", None, ""


def _analyse(tasks: Sequence[tuple[str, str, str]], options: PrepareOptions,
             workers: int) -> Iterator[tuple[str, str, str | None, str]]:
    if not tasks:
        return
    if workers <= 1:
        _init_worker(options, pool=False)
        yield from map(_run_task, tasks)
        return
    # spawn: fork would copy JAX/TFLite runtime state (threads, locks) into the children.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(options,)) as pool:
        yield from pool.imap_unordered(_run_task, tasks, chunksize=4)


# ---------------------------------------------------------------------------------------------
# The job


def prepare_dataset(src: str | os.PathLike, out: str | os.PathLike, *,
                    options: PrepareOptions = PrepareOptions(), workers: int = 0,
                    encoder: InputEncoder | None = None) -> dict[str, Any]:
    """Build (or resume building) the training dataset of ``src`` in ``out``.

    A run that stops leaves no dataset that reads as finished: the dataset is written into a temporary folder
    renamed into place, then ``skipped.jsonl``, then the summary, which marks a finished run; a failure while
    writing them removes all three (and a previous run's, which they replace). The per-photo results cached so
    far are whole files and are kept for the next run.

    Args:
      src: folder of photos with captions (see the module docstring).
      out: output folder: the dataset goes to ``out/realisid_faces/1.0.0``, the per-photo cache to
        ``out/_work``, the summary to ``out/prepare_summary.json``, one line per skipped photo to
        ``out/skipped.jsonl``.
      options: see ``PrepareOptions``.
      workers: analysis processes (spawn context); 0 or 1 analyses in this process.
      encoder: the frozen encoders (``data.precompute.InputEncoder``): store each example's precomputed
        training inputs and the empty prompt's embeddings (``data.precomputed``).

    Returns:
      The summary (also written as JSON): ``sources`` (photos), ``written``, ``analysed`` (photos
      analysed in this run), ``cached`` (results reused from an earlier run), ``skipped`` (photos:
      reason -> count), ``errors`` (messages of unexpected failures), ``files`` (every file of
      ``src``: ``total`` = ``photos`` + ``captions`` + ``not_photos``; ``photos`` = ``written`` +
      skipped + errors), ``orphan_captions`` (count), ``caption_encodings`` (caption file -> encoding,
      for those not UTF-8), ``options``, ``dataset``, ``seconds``; with ``encoder``, ``precomputed``
      (``dtype``, ``fields``: name -> per-example shape, ``bytes_per_example``, the weights).

    Raises:
      FileNotFoundError: ``src`` missing. ValueError: a bad ``captions.jsonl``, or no usable photo.
      builder.DatasetWriteError: no space left on the device (or a quota) while caching a result or writing the
        dataset.
    """
    out = Path(out)
    try:
        return _prepare_dataset(src, out, options, workers, encoder)
    except Exception as err:
        reason = disk_full(err)
        if reason is None:
            raise
        raise builder.DatasetWriteError(
            f"writing {out}/ failed: {reason}; no part of the dataset was kept; free space and run prepare-data "
            f"again (it reuses the per-photo results in {out / WORK_DIR}/)") from None


def _prepare_dataset(src: str | os.PathLike, out: Path, options: PrepareOptions, workers: int,
                     encoder: InputEncoder | None) -> dict[str, Any]:
    """``prepare_dataset`` with a full disk's error as raised."""
    start = time.monotonic()
    cache = out / WORK_DIR / options.fingerprint()
    scan = scan_sources(src, skip_dirs=(WORK_DIR,))
    items = scan.photos
    for name, encoding in scan.decoded.items():
        log.warning("caption file %s is not UTF-8: read as %s", name, encoding)
    skipped: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
    errors: list[str] = []
    results: dict[str, Path] = {}
    tasks = []
    for item in items:
        if item.caption is None:
            skipped["no_caption"].append({"file": item.name, "message": "no caption"})
            continue
        file = _cache_file(cache, cache_key(item))
        results[item.name] = file
        if not file.is_file():
            tasks.append((item.name, str(item.path), str(file)))
    log.info("%d photos, %d to analyse, %d cached", len(items), len(tasks),
             len(results) - len(tasks))

    for done, (name, status, _, message) in enumerate(_analyse(tasks, options, workers), 1):
        if status == "error":
            errors.append(message)
            log.warning("%s", message)
        if done % 100 == 0:
            log.info("analysed %d / %d", done, len(tasks))

    good = []
    for item in items:
        file = results.get(item.name)
        if file is None or not file.is_file():
            continue
        skip = _skip_of(file)
        if skip is None:
            good.append(item)
        else:
            skipped[skip["reason"]].append({"file": item.name, "message": skip["message"]})
    if not good:
        raise ValueError(f"no usable photo in {src}: skipped {_counts(skipped)}, "
                         f"errors {errors[:3]}")

    def examples():
        for item in good:
            example = _load_result(results[item.name])
            yield item.name, {**example, "caption": item.caption, "source": item.name}

    metadata = {"prepare_options": dataclasses.asdict(options), "skipped": _counts(skipped)}
    stored, shapes = examples, None
    if encoder is not None:
        from realisid_jax.data.precompute import with_precomputed

        shapes = encoder.shapes(options.resolution, options.reference_size)
        spec = builder.features(options.resolution, options.reference_size, options.image_format)
        metadata["precomputed"] = {
            "dtype": encoder.dtype.name, "fields": shapes,
            "bytes_per_example": sum(int(np.prod(s)) for s in shapes.values()) * encoder.dtype.itemsize,
            **encoder.provenance}

        def precomputed_examples():
            return with_precomputed(examples(), encoder, spec)

        stored = precomputed_examples

    def write_dataset() -> Path:
        dataset = builder.write_dataset(
            out, stored, resolution=options.resolution, reference_size=options.reference_size,
            image_format=options.image_format, metadata=metadata, precomputed=shapes,
            precomputed_dtype=encoder.dtype.name if encoder is not None else "float16")
        if encoder is not None:
            from realisid_jax.data.precomputed import write_empty_prompt

            write_empty_prompt(out, encoder.empty_prompt())
        return dataset

    return _write_all_or_nothing(out, write_dataset, lambda dataset: {
        "sources": len(items),
        "written": len(good),
        "analysed": len(tasks),
        "cached": len(results) - len(tasks),
        "skipped": _counts(skipped),
        "errors": errors,
        "files": {"total": len(items) + len(scan.captions) + len(scan.others), "photos": len(items),
                  "captions": len(scan.captions), "not_photos": len(scan.others)},
        "orphan_captions": len(scan.orphans),
        "caption_encodings": scan.decoded,
        "options": dataclasses.asdict(options),
        "dataset": str(dataset),
        "seconds": round(time.monotonic() - start, 2),
        **({"precomputed": metadata["precomputed"]} if encoder is not None else {}),
    }, _skipped_lines(skipped, scan))


def _skipped_lines(skipped: dict[str, list[dict[str, str]]], scan: SourceScan) -> list[dict[str, str]]:
    """The rows of ``skipped.jsonl``: skipped photos by reason, captions naming no photo, other files."""
    rows = [{"reason": reason, **entry} for reason, entries in sorted(skipped.items()) for entry in entries]
    rows += [{"reason": "orphan_caption", **entry} for entry in scan.orphans]
    rows += [{"reason": "not_a_photo", "file": name, "message": "neither a photo nor a caption"}
             for name in scan.others]
    return rows


def _write_all_or_nothing(out: Path, write_dataset: Callable[[], Path],
                          summary_of: Callable[[Path], dict[str, Any]], skipped: list[dict[str, str]]
                          ) -> dict[str, Any]:
    """Writes the dataset (``write_dataset``, returning its folder), ``skipped.jsonl`` and the summary
    (``summary_of(folder)``), the summary last; returns the summary.

    ``prepare-data`` takes a summary for a finished run, ``train`` a ``dataset_info.json`` for a finished dataset:
    a previous run's summary goes before anything is replaced, and a failure removes whatever was written, so
    neither reads as finished.
    """
    files = [out / SUMMARY_FILE, out / SKIPPED_FILE]
    for file in files:
        file.unlink(missing_ok=True)
    try:
        summary = summary_of(write_dataset())
        _write_atomic(out / SKIPPED_FILE, "".join(json.dumps(row) + "\n" for row in skipped).encode())
        _write_atomic(out / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
    except BaseException:
        shutil.rmtree(builder.dataset_dir(out), ignore_errors=True)
        for file in files:
            file.unlink(missing_ok=True)
        raise
    return summary


def _counts(skipped: dict[str, list]) -> dict[str, int]:
    return {reason: len(entries) for reason, entries in sorted(skipped.items()) if entries}
