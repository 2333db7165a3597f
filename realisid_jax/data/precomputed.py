"""Precomputed training inputs (``prepare-data --precompute``, ``config.train.precomputed_inputs``): the frozen
encoders' outputs stored with each example, so that training neither loads nor runs the VAE encoder, the text
encoders and the image encoder (maxdiffusion's ``cache_latents_text_encoder_outputs``).

Per example (fields of the ``realisid_faces`` dataset beside the raw ones, which stay; float16 or float32 as
stored, ``metadata["precomputed"]["dtype"]``):

  latent_mean, latent_logvar: (R/8, R/8, C) the VAE encoder's posterior moments of the training image
      (``AutoencoderKL.encode(x)``: mean, log-variance clipped to [-30, 20]), before sampling and before
      ``(z - shift_factor) * scaling_factor``; C = ``vae.latent_channels`` (4).
  prompt_embeds: (77, D) the caption's text conditioning as the step uses it (SDXL: both encoders' penultimate
      hidden states concatenated, D = 768 + 1280; SD 1.5: the last hidden state, D = 768).
  pooled_prompt_embeds: (P,) SDXL only: the projection encoder's ``text_embeds`` (P = 1280).
  image_features: (T, H) the CLIP image encoder's penultimate hidden states of the reference crop (ViT-H/14 at
      224 px: T = 257 tokens, H = 1280), the ID projection's input.

Once per dataset, ``DATA/realisid_faces/1.0.0/empty_prompt.npz`` holds the empty caption ``""``'s
``prompt_embeds`` (77, D) and (SDXL) ``pooled_prompt_embeds`` (P,), same dtype: text dropout's "no text" with
``config.realisid.no_text = "empty_prompt"`` ("zeros" needs nothing). The training input pipeline gives every
example a reference to them as ``empty_prompt_embeds`` / ``empty_pooled_prompt_embeds``.

This module is the format (names, shapes, checks; numpy only); ``data.precompute`` runs the encoders.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import ml_collections
import numpy as np

from realisid_jax.config import ConfigError
from realisid_jax.data import builder

STORAGE_DTYPES = ("float16", "float32")
EMPTY_PROMPT_FILE = "empty_prompt.npz"
# The frozen models whose outputs are stored, and which a step from precomputed inputs does without.
ENCODERS = ("vae", "text_encoder", "text_encoder_2", "image_encoder")
EXAMPLE_FIELDS = ("latent_mean", "latent_logvar", "prompt_embeds", "pooled_prompt_embeds", "image_features")
TEXT_LENGTH = 77  # CLIP's context (``text.tokenizer.CLIP_MAX_LENGTH``)
# Stored per example -> what the empty prompt's copy is called in a training batch.
EMPTY_FIELDS = {"prompt_embeds": "empty_prompt_embeds", "pooled_prompt_embeds": "empty_pooled_prompt_embeds"}


class PrecomputedInputsError(ConfigError):
    """A dataset without the precomputed inputs the config asks for, or with ones that do not fit it
    (``train.precomputed_inputs``); also a step batch missing some of them. One line, naming what is missing."""


def is_sdxl(config: ml_collections.ConfigDict) -> bool:
    return config.model.get("text_encoder_2") is not None


def vae_scale(config: ml_collections.ConfigDict) -> int:
    """Pixels per latent cell: 2 ** (number of VAE down blocks - 1) (8 for SD)."""
    return 2 ** (len(config.model.vae["block_out_channels"]) - 1)


def example_shapes(config: ml_collections.ConfigDict, resolution: int | None = None) -> dict[str, tuple[int, ...]]:
    """Shape of every precomputed field of one example for ``config`` at ``resolution`` (default
    ``config.train.resolution``); see the module docstring."""
    r = int(resolution or config.train.resolution) // vae_scale(config)
    m = config.model
    text = [m.text_encoder] + ([m.text_encoder_2] if is_sdxl(config) else [])
    vision = m.image_encoder
    tokens = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2 + 1  # patches + class token
    shapes = {
        "latent_mean": (r, r, int(m.vae["latent_channels"])),
        "latent_logvar": (r, r, int(m.vae["latent_channels"])),
        "prompt_embeds": (TEXT_LENGTH, sum(int(t["hidden_size"]) for t in text)),
        "image_features": (tokens, int(vision["hidden_size"])),
    }
    if is_sdxl(config):
        shapes["pooled_prompt_embeds"] = (int(m.text_encoder_2["projection_dim"]),)
    return shapes


def batch_fields(config: ml_collections.ConfigDict, no_text: str) -> dict[str, tuple[int, ...]]:
    """Per-example shape of every precomputed field of a training batch: ``example_shapes`` plus, with
    ``no_text == "empty_prompt"``, the empty prompt's copies (``EMPTY_FIELDS``)."""
    shapes = example_shapes(config)
    if no_text == "empty_prompt":
        shapes.update({EMPTY_FIELDS[name]: shapes[name] for name in EMPTY_FIELDS if name in shapes})
    return shapes


def check_fields(stored: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                 where: str) -> None:
    """``stored`` (field -> shape of the dataset's features) holds every ``expected`` field with its shape.

    Raises:
      PrecomputedInputsError: naming the missing fields, or the first field whose shape differs (for the
        latents: the resolution it was prepared at).
    """
    missing = [name for name in expected if name not in stored]
    if missing:
        raise PrecomputedInputsError(
            f"{where} has no precomputed {', '.join(missing)} (train.precomputed_inputs=True): prepare it with "
            f"`realisid prepare-data --precompute --config CONFIG --base BASE ...`, or set "
            f"--config.train.precomputed_inputs=False")
    for name, shape in expected.items():
        if tuple(stored[name]) != tuple(shape):
            hint = (" (prepared for another train.resolution than the config's)"
                    if name.startswith("latent_") else " (prepared with other encoders than the config's)")
            raise PrecomputedInputsError(f"{where}: precomputed {name} is {tuple(stored[name])}, the config needs "
                                         f"{tuple(shape)}{hint}")


def stored_shapes(features) -> dict[str, tuple[int, ...]]:
    """Field -> per-example shape of the precomputed fields among a dataset's ``features`` (its
    ``dataset_info.features``; empty for a raw dataset)."""
    return {name: tuple(features[name].shape) for name in EXAMPLE_FIELDS if name in features}


def check_dataset(data_dir: str | os.PathLike, expected: Mapping[str, tuple[int, ...]], *, empty_prompt: bool,
                  features=None) -> dict[str, np.ndarray] | None:
    """Checks that a prepared dataset holds the ``expected`` precomputed fields (``example_shapes``) and, with
    ``empty_prompt``, the empty prompt's embeddings; returns those as batch fields (``read_empty_prompt``), else
    ``None``. ``features``: the dataset's ``dataset_info.features`` if already open.

    Raises:
      PrecomputedInputsError: as ``check_fields`` and ``read_empty_prompt``.
    """
    features = builder.open_split(data_dir).dataset_info.features if features is None else features
    check_fields(stored_shapes(features), expected, str(data_dir))
    return read_empty_prompt(data_dir, expected) if empty_prompt else None


def write_empty_prompt(data_dir: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Stores the empty prompt's embeddings in the dataset folder (after ``builder.write_dataset``)."""
    path = builder.dataset_dir(data_dir) / EMPTY_PROMPT_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def read_empty_prompt(data_dir: str | os.PathLike, expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The empty prompt's stored embeddings, as the batch fields ``EMPTY_FIELDS`` name them.

    Args:
      expected: the per-example shapes (``example_shapes``) they must have.

    Raises:
      PrecomputedInputsError: no ``empty_prompt.npz`` in the dataset folder, or one missing a field or of
        another shape.
    """
    path = builder.dataset_dir(data_dir) / EMPTY_PROMPT_FILE
    if not path.is_file():
        raise PrecomputedInputsError(f"{data_dir} has no {path.name} (the empty prompt's embeddings, for "
                                     f"realisid.no_text=empty_prompt): re-run prepare-data --precompute")
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    wanted = {name: shape for name, shape in expected.items() if name in EMPTY_FIELDS}
    check_fields({name: a.shape for name, a in arrays.items()}, wanted, str(path))
    return {EMPTY_FIELDS[name]: arrays[name] for name in wanted}
