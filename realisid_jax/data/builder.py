"""The prepared training set as a TFDS dataset in ``array_record`` format.

Layout: ``DIR/realisid_faces/1.0.0/`` (TFDS's ``data_dir/name/version``), one split ``train``,
readable without TensorFlow by ``tfds.data_source("realisid_faces", data_dir=DIR)`` (random access,
what grain reads). The builder class is not registered with TFDS: readers go through the files'
own ``dataset_info.json``/``features.json``, so they need neither this module nor its arguments.

One example (all geometry in the training frame: the image resized by its shorter side and cropped
to ``resolution`` x ``resolution``; pixel (i, j) covers ``[j, j+1) x [i, i+1)``):
  image:      (R, R, 3) uint8 RGB, stored as JPEG or PNG bytes.
  caption:    text.
  face_box:   (4,) float32 ``(x0, y0, x1, y1)`` pixels: the subject's face box made square by its
              longer edge (paper Sec. "ID embedding"), inside ``[0, R]``.
  landmarks:  (N, 2) float32 ``(x, y)`` pixels: N = 468 MediaPipe Face Mesh points in Face Mesh order for
              faces; another keypoint set for another world (the glyph world's 6 square keypoints), N in the spec.
  face_mask:  (R, R, 1) uint8, 255 on the face (face-parsing mask), stored as PNG.
  reference:  (S, S, 3) uint8 RGB, the masked square reference crop for the CLIP image encoder,
              not yet normalised, stored as PNG.
  source:     text, the image's path relative to the source folder.
  original_size:          (2,) int32 ``(height, width)`` of the source photo, pixels.
  crops_coords_top_left:  (2,) int32 ``(top, left)`` of the crop in the photo resized by its shorter side to
              ``R``, pixels. With ``original_size`` and ``(R, R)`` these are SDXL's micro-conditioning (the
              UNet's ``time_ids``, diffusers' names); datasets written before them lack both fields.

With ``prepare-data --precompute`` also the frozen encoders' outputs ``latent_mean``, ``latent_logvar``,
``prompt_embeds``, ``pooled_prompt_embeds`` (SDXL) and ``image_features``, float16 or float32 tensors
(``data.precomputed``).

A shard that does not read (cut short, damaged, missing) stops its reader with ``DatasetReadError``, one line
naming the file, and the example in it when the damage is found while reading: ``open_split`` checks each shard's
index and record count against ``dataset_info.json`` when it opens the split, and names the file of any example
that fails to read or decode later.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from realisid_jax.errors import first_line

DATASET_NAME = "realisid_faces"
DATASET_VERSION = "1.0.0"
NUM_LANDMARKS = 468
IMAGE_FORMATS = ("jpeg", "png")

Example = dict[str, Any]


class DatasetReadError(ValueError):
    """A shard file of a prepared dataset that does not read: the message is one line naming the file (and the
    example in it, where known) and how to fix it; ``realisid`` prints it as one ``error:`` line, exit 2."""


class DatasetWriteError(RuntimeError):
    """Writing a prepared dataset failed for lack of space (a full disk, a quota): the message is one line naming
    the folder and the reason; ``realisid prepare-data`` prints it as one ``error:`` line, exit 1 (the run failed,
    not its input)."""


#: How a full disk or a quota reads in OSError numbers and in the messages of array_record's writer (a
#: ``RuntimeError``: ``write() failed: No space left on device; writing FILE; at byte N``).
def _shard_error(path: Path, problem: str) -> DatasetReadError:
    return DatasetReadError(f"{path} {problem}; prepare the dataset again with `realisid prepare-data "
                            f"--overwrite`")


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error)[:200]}"


def check_shards(data_dir: str | os.PathLike, split: str, shard_lengths: Sequence[int]) -> list[Path]:
    """The split's ``array_record`` files, each checked to open and to hold its ``shard_lengths`` examples (the
    counts in ``dataset_info.json``): a file cut short loses its index, which is at its end.

    Raises:
      DatasetReadError: a file missing, unreadable, or with another number of examples, named.
    """
    from array_record.python.array_record_module import ArrayRecordReader

    folder = dataset_dir(data_dir)
    files = sorted(folder.glob(f"{DATASET_NAME}-{split}.array_record-*"))
    if len(files) != len(shard_lengths):
        raise DatasetReadError(f"{folder} holds {len(files)} array_record file(s) of split {split!r}, its "
                               f"dataset_info.json lists {len(shard_lengths)}; prepare the dataset again with "
                               f"`realisid prepare-data --overwrite`")
    for path, expected in zip(files, shard_lengths):
        try:
            reader = ArrayRecordReader(str(path))
            try:
                found = reader.num_records()
            finally:
                reader.close()
        except (RuntimeError, OSError, ValueError) as err:
            raise _shard_error(path, f"does not read, cut short or damaged ({_first_line(err)})") from None
        if found != expected:
            raise _shard_error(path, f"holds {found} examples where dataset_info.json lists {expected} (cut short?)")
    return files


class NamedSource:
    """A random-access data source whose read errors name the shard file and the example in it.

    Args:
      source: ``tfds.data_source`` of a split (examples numbered shard after shard).
      files, shard_lengths: the split's shard files and their example counts, in order.
    """

    def __init__(self, source, files: Sequence[Path], shard_lengths: Sequence[int]):
        self._source = source
        self._files = list(files)
        self._starts = np.cumsum([0, *shard_lengths])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        try:
            return self._source[index]
        except (RuntimeError, OSError, ValueError) as err:
            raise self._error(int(index), err) from None

    def __getitems__(self, indices):
        try:
            return self._source.__getitems__(indices)
        except (RuntimeError, OSError, ValueError):
            return [self[i] for i in indices]  # the one that fails names itself

    def __getattr__(self, name: str):  # dataset_info and the rest of the tfds source
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._source, name)

    def _error(self, index: int, error: BaseException) -> DatasetReadError:
        k = min(max(int(np.searchsorted(self._starts, index, side="right")) - 1, 0), len(self._files) - 1)
        within = index - int(self._starts[k])
        split = f" (example {index} of the split)" if len(self._files) > 1 else ""
        return _shard_error(self._files[k], f"example {within}{split} does not read ({_first_line(error)})")


def features(resolution: int, reference_size: int, image_format: str = "jpeg", *,
             precomputed: Mapping[str, tuple[int, ...]] | None = None,
             precomputed_dtype: str = "float16", num_landmarks: int = NUM_LANDMARKS) -> tfds.features.FeaturesDict:
    """The feature spec of one example (see the module docstring); ``precomputed``: name -> shape of the
    precomputed tensors stored as ``precomputed_dtype``; ``num_landmarks``: keypoints per subject.

    Image features are given already-encoded bytes by the writer, so building needs no TensorFlow.

    Raises:
      ValueError: ``image_format`` is not "jpeg" or "png".
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    tensors = {name: tfds.features.Tensor(shape=tuple(shape), dtype=np.dtype(precomputed_dtype))
               for name, shape in (precomputed or {}).items()}
    return tfds.features.FeaturesDict({**tensors,
        "image": tfds.features.Image(shape=(resolution, resolution, 3),
                                     encoding_format=image_format),
        "caption": tfds.features.Text(),
        "face_box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        "landmarks": tfds.features.Tensor(shape=(num_landmarks, 2), dtype=np.float32),
        "face_mask": tfds.features.Image(shape=(resolution, resolution, 1), encoding_format="png"),
        "reference": tfds.features.Image(shape=(reference_size, reference_size, 3),
                                         encoding_format="png"),
        "source": tfds.features.Text(),
        "original_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
        "crops_coords_top_left": tfds.features.Tensor(shape=(2,), dtype=np.int32),
    })


class RealisidFaces(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the examples yielded by ``examples()`` as split ``train``.

    Args:
      examples: called once at write time; yields ``(key, example)`` with unique string keys.
        Examples are written in the order given (TFDS shuffling disabled) so that a rebuild from
        the same inputs gives the same files.
      resolution, reference_size, image_format, precomputed, precomputed_dtype, num_landmarks: see ``features``.
      metadata: JSON-serialisable values stored in ``dataset_info.json`` (``info.metadata``).
      **kwargs: ``data_dir`` and the other ``tfds.core.DatasetBuilder`` arguments.
    """

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Single-person image-caption pairs with face geometry."}
    # TFDS looks beside the builder's source file for checksum/metadata files (there are none) and
    # that lookup imports ``importlib_resources``, which TFDS does not declare on Python >= 3.9.
    code_path = None

    def __init__(self, *, examples: Callable[[], Iterable[tuple[str, Example]]], resolution: int,
                 reference_size: int, image_format: str = "jpeg",
                 metadata: Mapping[str, Any] | None = None,
                 precomputed: Mapping[str, tuple[int, ...]] | None = None, precomputed_dtype: str = "float16",
                 num_landmarks: int = NUM_LANDMARKS, **kwargs: Any):
        self._examples = examples
        self._features = features(resolution, reference_size, image_format, precomputed=precomputed,
                                  precomputed_dtype=precomputed_dtype, num_landmarks=num_landmarks)
        self._metadata = dict(metadata or {})
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=self._features,
            description="RealisID training pairs: photo, caption and the subject's face geometry.",
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(self._metadata),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the examples are already prepared
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield from self._examples()


def dataset_dir(data_dir: str | os.PathLike) -> Path:
    """The folder TFDS writes the dataset to under ``data_dir``."""
    return Path(data_dir) / DATASET_NAME / DATASET_VERSION


def write_dataset(data_dir: str | os.PathLike,
                  examples: Callable[[], Iterable[tuple[str, Example]]], *, resolution: int,
                  reference_size: int, image_format: str = "jpeg",
                  metadata: Mapping[str, Any] | None = None,
                  precomputed: Mapping[str, tuple[int, ...]] | None = None,
                  precomputed_dtype: str = "float16", num_landmarks: int = NUM_LANDMARKS) -> Path:
    """(Re)write the dataset under ``data_dir``, replacing any previous version; returns its folder.
    ``precomputed``, ``precomputed_dtype``: the precomputed tensors' shapes and storage; ``num_landmarks``:
    keypoints per subject (``features``).

    Raises:
      ValueError: an example does not match the feature spec, or ``examples`` yields nothing
        (TFDS cannot write an empty split).
    """
    shutil.rmtree(dataset_dir(data_dir), ignore_errors=True)
    builder = RealisidFaces(examples=examples, resolution=resolution,
                            reference_size=reference_size, image_format=image_format,
                            metadata=metadata, precomputed=precomputed, precomputed_dtype=precomputed_dtype,
                            num_landmarks=num_landmarks, data_dir=os.fspath(data_dir), file_format="array_record")
    # Nothing is downloaded, but TFDS makes a download folder: keep it out of ``data_dir``.
    with tempfile.TemporaryDirectory(prefix="tfds-downloads-") as downloads:
        builder.download_and_prepare(
            download_dir=downloads,
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return dataset_dir(data_dir)


def open_split(data_dir: str | os.PathLike, split: str = "train", *,
               skip_decoding: Iterable[str] = ()):
    """The split as a random-access ``tfds`` data source of decoded numpy examples.

    ``skip_decoding`` names features returned as their stored bytes (e.g. ``("face_mask",)`` when
    a reader does not need them). Images decode to uint8 arrays, texts to ``bytes``. The source is a
    ``NamedSource``: an example that does not read raises ``DatasetReadError`` naming its file and index.

    Raises:
      tfds.core.DatasetNotFoundError (a ``FileNotFoundError``-like error): no dataset there.
      DatasetReadError: a shard file missing, cut short or damaged (``check_shards``).
    """
    decoders = {name: tfds.decode.SkipDecoding() for name in skip_decoding} or None
    source = tfds.data_source(DATASET_NAME, split=split, data_dir=os.fspath(data_dir),
                              decoders=decoders, download=False)
    lengths = [int(n) for n in source.dataset_info.splits[split].shard_lengths]
    return NamedSource(source, check_shards(data_dir, split, lengths), lengths)
