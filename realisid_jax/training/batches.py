"""Host batches -> global device batches: tokenise captions, rasterise c_pe, place each process's shard.

Each process reads its own ``global_batch / process_count`` examples; ``jax.make_array_from_process_local_data``
assembles the global arrays, sharded over the mesh's batch axes (``activation_batch`` rule). With
``train.precomputed_inputs`` the stored encoder outputs (``data.precomputed``) replace the pixels, token ids and
reference crops, in the computation dtype ``config.dtype``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from transformers import CLIPTokenizer

from realisid_jax.data.precomputed import batch_fields, is_sdxl
from realisid_jax.face.draw import draw_landmark_image
from realisid_jax.models.vae import VAE_SCALE_FACTOR
from realisid_jax.sharding import Rules, data_sharding
from realisid_jax.text.prompt_encoding import no_text_setting
from realisid_jax.text.tokenizer import CLIP_MAX_LENGTH, tokenize


def landmark_pixels(config: ml_collections.ConfigDict) -> int:
    """Side of the c_pe image: the local branch's input in pixels (8 x ``realisid.local_latent_size``)."""
    return VAE_SCALE_FACTOR * int(config.realisid.local_latent_size)


def batch_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Global ``(shape, dtype)`` of every device batch field for ``config`` (SDXL: ``input_ids_2`` and the
    micro-conditioning ``time_ids``; ``train.precomputed_inputs``: the stored fields of
    ``data.precomputed.batch_fields`` in ``config.dtype`` instead of ``pixel_values``, token ids, ``reference``)."""
    b, r = int(config.train.batch_size), int(config.train.resolution)
    ref = int(config.model.image_encoder.image_size)
    px = landmark_pixels(config)
    shapes = {
        "face_box": ((b, 4), np.float32),
        "landmark_image": ((b, px, px, 3), np.float32),
    }
    if config.train.precomputed_inputs:
        dtype = jnp.dtype(config.dtype)
        shapes.update({name: ((b, *shape), dtype) for name, shape in
                       batch_fields(config, no_text_setting(config)).items()})
    else:
        shapes.update({"pixel_values": ((b, r, r, 3), np.float32), "input_ids": ((b, CLIP_MAX_LENGTH), np.int32),
                       "reference": ((b, ref, ref, 3), np.float32)})
        if is_sdxl(config):
            shapes["input_ids_2"] = ((b, CLIP_MAX_LENGTH), np.int32)
    if is_sdxl(config):
        shapes["time_ids"] = ((b, 6), np.float32)
    return shapes


def batch_shardings(config: ml_collections.ConfigDict, mesh: Mesh, rules: Rules) -> dict[str, NamedSharding]:
    """Leading (batch) axis of every field over the ``activation_batch`` mesh axes."""
    return {k: data_sharding(mesh, shape, rules) for k, (shape, _) in batch_shapes(config).items()}


def batch_spec(config: ml_collections.ConfigDict, mesh: Mesh, rules: Rules) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shape, dtype and sharding of every device batch field (the step's abstract batch)."""
    shardings = batch_shardings(config, mesh, rules)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
            for k, (shape, dtype) in batch_shapes(config).items()}


def host_batch(example_batch: dict[str, Any], tokenizers: Sequence[CLIPTokenizer], landmark_px: int, *,
               resolution: int | None = None, precomputed: Sequence[str] = (),
               landmark_layout: str = "face_mesh") -> dict:
    """One process's batch as numpy arrays of the step's fields.

    Args:
      example_batch: the input pipeline's batch (``realisid_jax.data.input_pipeline``): ``pixel_values``
        (b, R, R, 3) in [-1, 1], ``input_text`` b captions, ``face_box`` (b, 4) normalised, ``landmarks``
        (b, N, 2) in the square face crop's unit frame (N = 468 face-mesh points; 6 for the ``"square"`` layout), ``reference`` (b, S, S, 3) CLIP-normalised,
        ``original_size`` and ``crops_coords_top_left`` (b, 2) pixels; or, precomputed, the ``precomputed``
        fields instead of ``pixel_values`` and ``reference``.
      tokenizers: one per text encoder (SDXL: two); none for precomputed batches (captions are not read).
      landmark_px: c_pe side in pixels.
      resolution: R, the image side (default the side of ``pixel_values``; needed for precomputed batches).
      precomputed: the precomputed fields to pass on, as stored.
      landmark_layout: how the landmarks are drawn as c_pe (``face.draw.LANDMARK_LAYOUTS``).

    ``time_ids`` (b, 6) float32 is SDXL's micro-conditioning, diffusers' ``_get_add_time_ids`` order:
    ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``, the target being the R x R image.
    """
    out = {
        "face_box": np.asarray(example_batch["face_box"], np.float32),
        "landmark_image": np.stack([draw_landmark_image(np.asarray(points), landmark_px, layout=landmark_layout)
                                    for points in example_batch["landmarks"]]).astype(np.float32) / 255.0,
        **{name: np.asarray(example_batch[name]) for name in precomputed},
    }
    if not precomputed:
        out["pixel_values"] = np.asarray(example_batch["pixel_values"], np.float32)
        out["reference"] = np.asarray(example_batch["reference"], np.float32)
    b, r = len(out["face_box"]), resolution or out["pixel_values"].shape[1]
    out["time_ids"] = np.concatenate([np.asarray(example_batch["original_size"], np.float32).reshape(b, 2),
                                      np.asarray(example_batch["crops_coords_top_left"], np.float32).reshape(b, 2),
                                      np.full((b, 2), r, np.float32)], axis=1)
    captions = [c.decode() if isinstance(c, bytes) else str(c) for c in example_batch["input_text"]]
    for i, tokenizer in enumerate(tokenizers):
        out["input_ids" if i == 0 else f"input_ids_{i + 1}"] = tokenize(tokenizer, captions)
    return out


class DeviceBatches(Iterator[dict[str, jax.Array]]):
    """Wraps the input iterator (no look-ahead, so its saved position matches the steps run).

    Raises (on ``next``):
      ValueError: a process's batch does not match its share of the global batch.
    """

    def __init__(self, iterator: Iterator[dict[str, Any]], tokenizers: Sequence[CLIPTokenizer],
                 config: ml_collections.ConfigDict, mesh: Mesh, rules: Rules):
        self._iterator = iterator
        self._px = landmark_pixels(config)
        self._layout = str(config.realisid.get("landmark_layout", "face_mesh"))
        self._resolution = int(config.train.resolution)
        self._shapes = batch_shapes(config)
        self._shardings = batch_shardings(config, mesh, rules)
        precomputed = bool(config.train.precomputed_inputs)
        self._tokenizers = () if precomputed else tuple(tokenizers)
        self._precomputed = tuple(batch_fields(config, no_text_setting(config))) if precomputed else ()

    def __next__(self) -> dict[str, jax.Array]:
        local = host_batch(next(self._iterator), self._tokenizers, self._px, resolution=self._resolution,
                           precomputed=self._precomputed, landmark_layout=self._layout)
        return {name: jax.make_array_from_process_local_data(self._shardings[name], local[name].astype(dtype),
                                                             shape)
                for name, (shape, dtype) in self._shapes.items()}
