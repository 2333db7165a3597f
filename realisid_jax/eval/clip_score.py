"""CLIP-T and CLIP-I (paper's evaluation) with the project's Flax CLIP text and image encoders.

* CLIP-T: cosine similarity of the prompt's ``text_embeds`` and the generated image's ``image_embeds``.
  The image is prepared as ``CLIPImageProcessor`` does: shorter side resized to the encoder's size
  (bicubic), centre crop, CLIP normalisation.
* CLIP-I: cosine similarity of the ``image_embeds`` of the reference face crop and of the matched
  generated face crop: each face's landmark box made square by its longer edge, unmasked, resized to the
  encoder's size.

Raw cosines in [-1, 1] (the paper's CLIP-T .236 / CLIP-I .701 are on this scale, not x100). Text and image
encoders must come from the same CLIP model, as two local folders in transformers format:
``CLIPTextModelWithProjection.from_pretrained("openai/clip-vit-large-patch14").save_pretrained(text_dir)``
and likewise ``CLIPVisionModelWithProjection`` into ``vision_dir`` (transformers splits a ``CLIPModel``
checkpoint that way).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from realisid_jax.eval.identity import jitted_image_embeds, square_face_crop, unit_rows
from realisid_jax.face.analysis import Face
from realisid_jax.face.image import as_rgb8
from realisid_jax.face.preprocess import CLIP_MEAN, CLIP_STD, normalize
from realisid_jax.models.clip_text import CLIPTextModelWithProjection
from realisid_jax.models.clip_vision import CLIPVisionModelWithProjection
from realisid_jax.text.tokenizer import tokenize
from realisid_jax.loading.pretrained import from_pretrained


def clip_image_input(image: np.ndarray, size: int) -> np.ndarray:
    """``CLIPImageProcessor``'s geometry: shorter side to ``size`` (PIL bicubic), centre ``size`` crop;
    (H, W, 3) uint8 -> (size, size, 3) uint8."""
    rgb = Image.fromarray(as_rgb8(image))
    w, h = rgb.size
    scale = size / min(w, h)
    rgb = rgb.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (rgb.size[0] - size) // 2, (rgb.size[1] - size) // 2
    return np.asarray(rgb.crop((left, top, left + size, top + size)))


class ClipScorer:
    """CLIP-T and CLIP-I with one CLIP model.

    Args:
      vision: ``CLIPVisionModelWithProjection``.
      text: ``CLIPTextModelWithProjection`` of the same CLIP model, or ``None`` (then no CLIP-T).
      tokenizer: the ``CLIPTokenizer`` for ``text`` (``realisid_jax.text.tokenizer``); needed with ``text``.
      label: names the model in outputs.
      mean, std: the image preprocessor's normalisation.

    Raises:
      ValueError: ``text`` without ``tokenizer``, or the two towers' projection widths differ.
    """

    def __init__(self, vision: CLIPVisionModelWithProjection, text: CLIPTextModelWithProjection | None = None,
                 tokenizer=None, *, label: str = "clip", mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD):
        if text is not None and tokenizer is None:
            raise ValueError("a CLIP text model needs its tokenizer")
        if text is not None and text.config.projection_dim != vision.config.projection_dim:
            raise ValueError(f"text projection_dim {text.config.projection_dim} != vision projection_dim "
                             f"{vision.config.projection_dim}: the towers are not from one CLIP model")
        self.label = label
        self.size = vision.config.image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.vision_model = vision
        self.encode_pixels = jitted_image_embeds(vision)
        self._text = _jitted_text_embeds(text) if text is not None else None
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, vision_folder: str | os.PathLike, text_folder: str | os.PathLike | None = None,
                        tokenizer=None, **kwargs) -> ClipScorer:
        """Loads transformers-format ``CLIPVisionModelWithProjection`` / ``CLIPTextModelWithProjection``
        folders (see the module docstring)."""
        vision = from_pretrained(CLIPVisionModelWithProjection, vision_folder)
        text = from_pretrained(CLIPTextModelWithProjection, text_folder) if text_folder is not None else None
        return cls(vision, text, tokenizer, label=kwargs.pop("label", f"clip:{Path(vision_folder).name}"), **kwargs)

    @property
    def has_text(self) -> bool:
        return self._text is not None

    def image_embeds(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Whole images (any size) -> (N, D) unit rows."""
        return self.encode_pixels(np.stack([normalize(clip_image_input(im, self.size), self.mean, self.std)
                                     for im in images]))

    def face_embeds(self, image: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
        """Square unmasked face crops of ``image`` -> (len(faces), D) unit rows."""
        if not faces:
            return np.zeros((0, 0), np.float32)
        return self.encode_pixels(np.stack([normalize(square_face_crop(image, f, self.size), self.mean, self.std)
                                     for f in faces]))

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts -> (N, D) unit rows. Raises ValueError without a text model."""
        if self._text is None:
            raise ValueError("this ClipScorer has no text model: CLIP-T needs one")
        return self._text(tokenize(self.tokenizer, list(prompts)))

    def clip_t(self, prompt: str, image_embed: np.ndarray) -> float:
        """CLIP-T of one generated image from its (D,) ``image_embeds`` row (shared with the aesthetic score)."""
        return float(self.text_embeds([prompt])[0] @ image_embed)


def _jitted_text_embeds(model: CLIPTextModelWithProjection):
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids).text_embeds.astype(jnp.float32))
    return lambda ids: unit_rows(np.asarray(forward(state, jnp.asarray(ids))))
