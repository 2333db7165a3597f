"""grain input pipeline over the prepared ``realisid_faces`` dataset: numpy training batches.

Order of operations (all deterministic given ``seed``)::

    tfds.data_source -> this host's shard (records shard_index, shard_index + shard_count, ...)
      -> global shuffle of the shard, re-shuffled each epoch (grain folds the epoch into the seed)
      -> repeat -> decode one example (threads) -> batch -> [worker processes]

Sharding happens before shuffling, so each host always reads the same disjoint part of the
dataset; shards differ in size by at most one record, and with endless repetition every host still
yields a batch each step.

The iterator's position is ``it.get_state()``, a small JSON-serialisable dict, restored with
``it.set_state(state)`` on a fresh iterator built with the same arguments: the batches that follow
equal those of the uninterrupted run. Store it next to the model in the trainer's checkpoint.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from realisid_jax.data import builder
from realisid_jax.data.precomputed import check_dataset, stored_shapes
from realisid_jax.face.preprocess import CLIP_MEAN, CLIP_STD, normalize, to_box_frame

Batch = dict[str, Any]


class DecodeExample(grain.transforms.Map):
    """A stored example (see ``builder``) -> one training sample.

    Output:
      pixel_values: (R, R, 3) float32 in [-1, 1] (``resolution``; resized with OpenCV, area filter
        when shrinking, when it differs from the stored resolution).
      input_text: str, the caption.
      face_box: (4,) float32 ``(x0, y0, x1, y1)`` normalised to [0, 1] by the image side.
      landmarks: (N, 2) float32 (N stored keypoints: 468 for faces) in the square face-box frame: (0, 0) top-left, (1, 1)
        bottom-right corner of ``face_box``.
      reference: (S, S, 3) float32 ``(rgb / 255 - mean) / std``, the masked CLIP reference crop.
      original_size: (2,) float32 ``(h, w)`` of the source photo, pixels; crops_coords_top_left: (2,) float32
        ``(top, left)`` of the crop, pixels at ``R`` (SDXL micro-conditioning). A dataset prepared without them
        gives ``(R, R)`` and ``(0, 0)``: the image taken as it is.

    With ``precomputed`` (the stored fields to pass on, ``data.precomputed``; ``resolution`` is then the stored
    one) the image and the reference are neither decoded nor given: ``pixel_values`` and ``reference`` are
    replaced by those fields as stored, plus ``empty_prompt`` (batch field -> array, the same for every example).
    """

    def __init__(self, resolution: int | None = None, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, *, precomputed: Sequence[str] = (),
                 empty_prompt: dict[str, np.ndarray] | None = None):
        self.resolution = resolution
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.precomputed = tuple(precomputed)
        self.empty_prompt = dict(empty_prompt or {})

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        if self.precomputed:
            return {**self._conditions(example, self.resolution, self.resolution),
                    **{name: example[name] for name in self.precomputed}, **self.empty_prompt}
        image = example["image"]
        stored = image.shape[0]
        if self.resolution is not None and self.resolution != stored:
            import cv2

            interpolation = cv2.INTER_AREA if self.resolution < stored else cv2.INTER_LINEAR
            image = cv2.resize(image, (self.resolution, self.resolution),
                               interpolation=interpolation)
        return {"pixel_values": image.astype(np.float32) / 127.5 - 1.0,
                "reference": normalize(example["reference"], self.mean, self.std),
                **self._conditions(example, stored, image.shape[0])}

    @staticmethod
    def _conditions(example: dict[str, Any], stored: int, r: int) -> dict[str, Any]:
        """Caption, face geometry and micro-conditioning of an example stored at ``stored`` px, read at ``r``."""
        box = example["face_box"].astype(np.float32)
        caption = example["caption"]
        size = example.get("original_size", np.array([r, r]))
        crop = example.get("crops_coords_top_left", np.zeros(2)) * (r / stored)
        return {
            "input_text": caption.decode("utf-8") if isinstance(caption, bytes) else caption,
            "face_box": box / np.float32(stored),
            "landmarks": to_box_frame(example["landmarks"], box),
            "original_size": np.asarray(size, np.float32),
            "crops_coords_top_left": np.asarray(crop, np.float32),
        }


def collate(samples: Sequence[dict[str, Any]]) -> Batch:
    """Stack samples along a new leading axis; ``input_text`` stays a list of str."""
    return {key: [s[key] for s in samples] if key == "input_text"
            else np.stack([s[key] for s in samples]) for key in samples[0]}


def make_train_dataset(data_dir: str | os.PathLike, *, batch_size: int, seed: int,
                       resolution: int | None = None, shard_index: int | None = None,
                       shard_count: int | None = None, worker_count: int = 0,
                       num_epochs: int | None = None, read_threads: int = 8,
                       reference_mean: Sequence[float] = CLIP_MEAN,
                       reference_std: Sequence[float] = CLIP_STD,
                       precomputed: Mapping[str, tuple[int, ...]] | None = None,
                       empty_prompt: bool = False) -> grain.IterDataset:
    """The training stream of this host as a grain ``IterDataset`` of batches.

    Args:
      data_dir: the ``--out`` folder of ``realisid prepare-data`` (holds ``realisid_faces/``).
      batch_size: global batch size, over all hosts; each host yields ``batch_size //
        shard_count`` samples per batch.
      seed: shuffling seed (an epoch's order depends on seed and epoch number only).
      resolution: side of ``pixel_values``; None keeps the stored resolution.
      shard_index, shard_count: this host's shard; default ``jax.process_index()`` /
        ``jax.process_count()``.
      worker_count: grain worker processes decoding batches (0: in this process, with threads).
      num_epochs: passes over the shard; None repeats forever.
      read_threads: threads decoding examples in each process.
      reference_mean, reference_std: the image encoder's normalisation (0-1 pixel scale).
      precomputed: read the precomputed inputs instead of the image and reference: name -> per-example shape
        the step needs (``data.precomputed.example_shapes``), checked against the dataset's.
      empty_prompt: with ``precomputed``, give each example the stored empty prompt's embeddings too
        (``realisid.no_text = "empty_prompt"``).

    Returns:
      An ``IterDataset`` whose elements are dicts (``L`` = local batch): ``pixel_values`` (L, R, R,
      3) float32 in [-1, 1]; ``input_text`` list of L str; ``face_box`` (L, 4) float32 in [0, 1];
      ``landmarks`` (L, N, 2) float32 in the face-box frame; ``reference`` (L, S, S, 3) float32
      CLIP-normalised; ``original_size`` and ``crops_coords_top_left`` (L, 2) float32 (``DecodeExample``).
      With ``precomputed``: those fields instead of ``pixel_values`` and ``reference``, as stored (float16 or
      float32), and ``empty_prompt_embeds`` / ``empty_pooled_prompt_embeds`` with ``empty_prompt``.
      The last incomplete batch of a finite stream is dropped. A dataset prepared without the photos' sizes
      and crop offsets is read with a one-line note on stderr.

    Raises:
      ValueError: ``batch_size`` not divisible by ``shard_count``, bad shard index, or a shard
        smaller than one local batch.
      PrecomputedInputsError (a ValueError): ``precomputed`` asked for, and the dataset lacks some of them (or
        their ``empty_prompt.npz``), or stores them with other shapes (another resolution or other encoders).
      tfds.core.DatasetNotFoundError: no prepared dataset in ``data_dir``.
    """
    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    if batch_size % shard_count:
        raise ValueError(f"global batch_size {batch_size} not divisible by {shard_count} shards")
    local_batch = batch_size // shard_count
    skip = ("face_mask", "image", "reference") if precomputed is not None else ("face_mask",)
    source = builder.open_split(data_dir, skip_decoding=skip)
    features = source.dataset_info.features
    decode = DecodeExample(resolution, reference_mean, reference_std)
    if precomputed is not None:
        empty = check_dataset(data_dir, precomputed, empty_prompt=empty_prompt, features=features)
        decode = DecodeExample(features["image"].shape[0], precomputed=tuple(precomputed), empty_prompt=empty)
    elif stored_shapes(features):
        print(f"note: {data_dir} holds precomputed inputs; --config.train.precomputed_inputs=True trains from them "
              f"without loading the VAE, text and image encoders", file=sys.stderr, flush=True)
    if "original_size" not in source.dataset_info.features:
        print(f"note: {data_dir} was prepared without the photos' sizes and crop offsets (re-run prepare-data "
              f"for them): SDXL time ids are (R, R, 0, 0, R, R)", file=sys.stderr, flush=True)
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(ds) < local_batch:
        raise ValueError(f"shard {shard_index} of {data_dir} has {len(ds)} examples, fewer than "
                         f"the local batch of {local_batch}")
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
    ds = ds.map(decode)
    # Decoded elements, not batches, are buffered: a few batches' worth bounds the memory.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=max(read_threads,
                                                                       2 * local_batch)))
    it = it.batch(local_batch, drop_remainder=True, batch_fn=collate)
    if worker_count > 0:
        _ensure_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


def _ensure_flags_parsed() -> None:
    """grain's worker processes read absl flags (with defaults) and fail on unparsed flags when the
    program was not started by ``absl.app``, as ``realisid`` is not."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_iterator(data_dir: str | os.PathLike, **kwargs: Any) -> grain.DatasetIterator:
    """``iter(make_train_dataset(data_dir, **kwargs))``: yields batch dicts; has ``get_state()``
    (a JSON-serialisable dict) and ``set_state(state)``. Same arguments as ``make_train_dataset``.
    With ``worker_count > 0`` call ``close()`` when done, to stop the worker processes."""
    return iter(make_train_dataset(data_dir, **kwargs))
