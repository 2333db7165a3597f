"""The frozen encoders over prepared examples (``prepare-data --precompute``): what the training step would compute
from each example's pixels, caption and reference crop, computed once and stored (format: ``data.precomputed``).

The functions below are also the raw training step's own (``training.step``), so both paths encode alike. The
encoders see exactly the step's inputs: images decoded by the dataset's own decoder and ``DecodeExample``,
captions tokenised by the base's tokenizers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from realisid_jax.data.input_pipeline import DecodeExample
from realisid_jax.data.precomputed import ENCODERS, STORAGE_DTYPES
from realisid_jax.models.registry import FROZEN
from realisid_jax.realisid.components import Components, apply_kernel_config, base_tokenizers, load_base
from realisid_jax.sharding import DEFAULT_RULES, Rules, data_sharding, make_mesh
from realisid_jax.text.prompt_encoding import sd15_text_embeddings, sdxl_text_embeddings
from realisid_jax.text.tokenizer import tokenize


def text_embeddings(models: Components, input_ids: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array | None]:
    """The UNet's text conditioning of token ids (one (B, 77) int32 array per text encoder): prompt embeddings
    (B, 77, D) and, for SDXL, the pooled embedding (B, P) (``None`` for SD 1.5); ``text.prompt_encoding``."""
    if models.text_encoder_2 is None:
        return sd15_text_embeddings(models.text_encoder, input_ids[0]), None
    return sdxl_text_embeddings([models.text_encoder, models.text_encoder_2], input_ids)


def image_features(models: Components, reference: jax.Array) -> jax.Array:
    """The ID projection's input: the CLIP image encoder's penultimate hidden states (B, T, H) of CLIP-normalised
    references (B, S, S, 3) (IP-Adapter-plus's choice)."""
    return models.image_encoder(reference).hidden_states[-2]


def encode_examples(models: Components, pixel_values: jax.Array, input_ids: Sequence[jax.Array],
                    reference: jax.Array) -> dict[str, jax.Array]:
    """Every precomputed field of a batch (pure, jittable): ``latent_mean`` / ``latent_logvar`` (B, R/8, R/8, 4)
    of ``pixel_values`` (B, R, R, 3) in [-1, 1] (``AutoencoderKL.encode``), ``prompt_embeds`` and (SDXL)
    ``pooled_prompt_embeds`` (``text_embeddings``), ``image_features`` (``image_features``); the models'
    computation dtype."""
    posterior = models.vae.encode(pixel_values)
    embeds, pooled = text_embeddings(models, input_ids)
    out = {"latent_mean": posterior.mean, "latent_logvar": posterior.logvar, "prompt_embeds": embeds,
           "image_features": image_features(models, reference)}
    if pooled is not None:
        out["pooled_prompt_embeds"] = pooled
    return out


class InputEncoder:
    """The frozen encoders, jitted over fixed-size batches: decoded examples -> precomputed fields.

    Args:
      models: ``Components`` holding the VAE, the text encoder(s) and the image encoder (the UNet and the
        branches are not used and may be ``None``).
      tokenizers: one per text encoder (the base's: ``realisid.components.base_tokenizers``).
      dtype: storage dtype, one of ``STORAGE_DTYPES``.
      batch_size: examples per call of the encoders; a shorter last batch is padded (one compiled program).
      mesh, rules: the batch is split over the mesh's batch axes; ``None``: the default device.

    Attributes:
      provenance: JSON-able description of the weights, stored in the dataset's metadata.

    Raises:
      ValueError: an unknown ``dtype`` or ``batch_size`` < 1.
    """

    def __init__(self, models: Components, tokenizers: Sequence, *, dtype: str = "float16", batch_size: int = 8,
                 mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, provenance: dict | None = None):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"precomputed dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dtype, self.batch_size = np.dtype(dtype), int(batch_size)
        self.tokenizers = tuple(tokenizers)
        self.provenance = dict(provenance or {})
        self._mesh, self._rules = mesh, rules
        graphdef, self._state = nnx.split(models)
        self._encode = jax.jit(lambda state, pixels, ids, ref: encode_examples(nnx.merge(graphdef, state), pixels,
                                                                                ids, ref))
        self._text = jax.jit(lambda state, ids: text_embeddings(nnx.merge(graphdef, state), ids))

    def shapes(self, resolution: int, reference_size: int) -> dict[str, tuple[int, ...]]:
        """Per-example shape of every field for ``resolution`` px images and ``reference_size`` px references
        (traced, nothing computed)."""
        b = self.batch_size
        ids = [jax.ShapeDtypeStruct((b, t.model_max_length), np.int32) for t in self.tokenizers]
        out = jax.eval_shape(self._encode, self._state,
                             jax.ShapeDtypeStruct((b, resolution, resolution, 3), np.float32), ids,
                             jax.ShapeDtypeStruct((b, reference_size, reference_size, 3), np.float32))
        return {name: tuple(x.shape[1:]) for name, x in out.items()}

    def __call__(self, samples: Sequence[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        """Fields of each sample (``DecodeExample`` outputs: ``pixel_values``, ``input_text``, ``reference``),
        numpy arrays of the storage dtype.

        Raises:
          ValueError: more samples than ``batch_size``, or a field not finite in the storage dtype (float16
            overflows above 65504: use float32).
        """
        n = len(samples)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"{n} samples for a batch of {self.batch_size}")
        padded = list(samples) + [samples[-1]] * (self.batch_size - n)
        captions = [s["input_text"] for s in padded]
        ids = [tokenize(t, captions) for t in self.tokenizers]
        out = self._encode(self._state, self._place(np.stack([s["pixel_values"] for s in padded])),
                           [self._place(i) for i in ids],
                           self._place(np.stack([s["reference"] for s in padded])))
        host = {name: self._store(name, x)[:n] for name, x in out.items()}
        return [{name: x[i] for name, x in host.items()} for i in range(n)]

    def empty_prompt(self) -> dict[str, np.ndarray]:
        """The empty caption ``""``'s ``prompt_embeds`` (77, D) and (SDXL) ``pooled_prompt_embeds`` (P,)."""
        embeds, pooled = self._text(self._state, [tokenize(t, "") for t in self.tokenizers])
        out = {"prompt_embeds": self._store("prompt_embeds", embeds)[0]}
        if pooled is not None:
            out["pooled_prompt_embeds"] = self._store("pooled_prompt_embeds", pooled)[0]
        return out

    def _place(self, x: np.ndarray) -> jax.Array:
        return x if self._mesh is None else jax.device_put(x, data_sharding(self._mesh, x.shape, self._rules))

    def _store(self, name: str, x: jax.Array) -> np.ndarray:
        stored = np.asarray(jax.device_get(x)).astype(self.dtype)
        if not np.isfinite(stored).all():
            raise ValueError(f"precomputed {name} is not finite in {self.dtype} (largest |value| "
                             f"{np.nanmax(np.abs(np.asarray(x, np.float32))):g}); store float32 instead")
        return stored


def load_input_encoder(config: ml_collections.ConfigDict, base: str | Path, *, image_encoder: str | Path | None = None,
                       variant: str | None = None, dtype: str = "float16", batch_size: int = 8) -> InputEncoder:
    """The frozen encoders of ``config`` from ``base`` (any base ``realisid.components.load_base`` accepts; the
    UNet is not loaded) and ``image_encoder`` (default the base's own), on the config's mesh, with the base's
    tokenizers.

    Raises:
      FileNotFoundError, ValueError, CheckpointMismatchError: as ``load_base``.
    """
    mesh = make_mesh(tuple(config.mesh.shape))
    rules = tuple(tuple(r) for r in config.mesh.rules)
    models = load_base(base, config, image_encoder=image_encoder, variant=variant, mesh=mesh, rules=rules,
                       only=ENCODERS)
    components = Components(**{name: models.get(name) for name in FROZEN}, realisid=None)
    apply_kernel_config(components, config)
    provenance = {"base": str(base), "image_encoder": None if image_encoder is None else str(image_encoder),
                  "variant": variant}
    return InputEncoder(components, base_tokenizers(base, config), dtype=dtype, batch_size=batch_size, mesh=mesh,
                        rules=rules, provenance=provenance)


def with_precomputed(examples: Iterable[tuple[str, dict[str, Any]]], encoder: InputEncoder,
                     features) -> Iterator[tuple[str, dict[str, Any]]]:
    """``examples`` (key, example as written: encoded ``image`` / ``reference`` bytes, ``caption``, ...) with the
    precomputed fields added, encoded ``encoder.batch_size`` at a time. ``features``: the dataset's
    ``FeaturesDict``, whose image decoders give the pixels the training input pipeline reads."""
    decode = DecodeExample()
    iterator = iter(examples)
    while chunk := list(itertools.islice(iterator, encoder.batch_size)):
        decoded = [decode.map({**example, "image": features["image"].decode_example_np(example["image"]),
                               "reference": features["reference"].decode_example_np(example["reference"])})
                   for _, example in chunk]
        for (key, example), fields in zip(chunk, encoder(decoded), strict=True):
            yield key, {**example, **fields}
