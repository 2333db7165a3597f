"""Face-recognition embedders for the identity-similarity metric (paper: FaceNet cosine similarity).

An embedder maps faces found by ``FaceAnalyzer`` to unit vectors; identity similarity is the cosine of a
generated face's vector and its reference's. Two implementations:

* ``FaceNetEmbedder``: FaceNet (InceptionResnetV1, the paper's metric) from weights the user supplies; none
  ship with the project and none can be fetched here. Expected format: an exported PyTorch program that
  takes (N, 3, 160, 160) float32 RGB, ``(pixel - 127.5) / 128``, and returns (N, 512) embeddings: a
  ``torch.export`` archive (``.pt2``) or a TorchScript file (``.pt``, older torch). E.g. facenet-pytorch's
  VGGFace2 model::

      import torch
      from facenet_pytorch import InceptionResnetV1
      net = InceptionResnetV1(pretrained="vggface2").eval()
      torch.export.save(torch.export.export(net, (torch.zeros(2, 3, 160, 160),),
                                            dynamic_shapes=({0: torch.export.Dim("n", min=1)},)), "facenet.pt2")

  Needs ``torch`` (the project's ``torch`` extra). Crop: the face's landmark box made square by its longer
  edge, no background masking, resized to 160 px.
* ``CLIPFaceEmbedder``: the FALLBACK when no FaceNet weights are given: the project's Flax CLIP image
  encoder on the masked square reference crop (the p_id input, ``face.preprocess_reference``), the
  ``image_embeds`` vector. It is not a face-recognition model: its numbers are not comparable with the
  paper's FaceNet column, and every output carries its ``label`` (``"clip-vision-fallback:..."``) so that
  they are never mistaken for FaceNet scores.

Any object with a ``label`` string and an ``embed(image, faces)`` method (the ``FaceEmbedder`` protocol)
plugs in, e.g. ArcFace.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realisid_jax.face.analysis import Face
from realisid_jax.face.image import as_rgb8
from realisid_jax.face.preprocess import CLIP_MEAN, CLIP_STD, crop_box, preprocess_reference, square_box
from realisid_jax.models.clip_vision import CLIPVisionModelWithProjection
from realisid_jax.loading.pretrained import from_pretrained

FACENET_SIZE = 160
CLIP_FALLBACK_PREFIX = "clip-vision-fallback"
_BATCH = 8  # faces per compiled CLIP call: one program for any face count


@runtime_checkable
class FaceEmbedder(Protocol):
    """Maps faces to identity vectors.

    Attributes:
      label: names the model in every output row and summary (e.g. ``"facenet:vggface2.pt"``).
    """

    label: str

    def embed(self, image: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
        """(H, W, 3) uint8 RGB image and faces found in it -> (len(faces), D) float32, unit L2 norm rows."""
        ...


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); an all-zero row stays zero."""
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, D), (M, D) -> (N, M) float64 cosine similarities (rows need not be normalised)."""
    return unit_rows(a).astype(np.float64) @ unit_rows(b).astype(np.float64).T


def square_face_crop(image: np.ndarray, face: Face, size: int) -> np.ndarray:
    """The face's landmark box made square by its longer edge, resampled to (size, size, 3) uint8; no
    masking; zero outside the image."""
    return crop_box(as_rgb8(image), square_box(face.box), size)


class FaceNetEmbedder:
    """FaceNet from a user-supplied exported model (format in the module docstring).

    Args:
      path: a ``torch.export`` ``.pt2`` archive, or a TorchScript file (any other suffix).
      device: torch device string.

    Raises:
      FileNotFoundError: no such file. ImportError: torch is not installed (``pip install .[torch]``).
    """

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FaceNet weights {path} not found (expected a torch.export .pt2 or a "
                                    "TorchScript file: see realisid_jax.eval.identity)")
        import torch  # the optional torch extra; only this embedder needs it

        self._torch = torch
        self._device = device
        if path.suffix == ".pt2":
            self._model = torch.export.load(str(path)).module().to(device)
        else:
            self._model = torch.jit.load(str(path), map_location=device).eval()
        self.label = f"facenet:{path.name}"

    def embed(self, image: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
        if not faces:
            return np.zeros((0, 0), np.float32)
        crops = np.stack([square_face_crop(image, f, FACENET_SIZE) for f in faces]).astype(np.float32)
        x = self._torch.from_numpy(((crops - 127.5) / 128.0).transpose(0, 3, 1, 2).copy()).to(self._device)
        with self._torch.no_grad():
            out = self._model(x)
        return unit_rows(out.detach().cpu().numpy().reshape(len(faces), -1))


class CLIPFaceEmbedder:
    """The fallback identity embedder: Flax CLIP ``image_embeds`` of the masked square face crop.

    Args:
      model: a ``CLIPVisionModelWithProjection`` (its ``config.image_size`` sets the crop size).
      label: output label; default ``"clip-vision-fallback:<source>"``.
      source: names the weights in the default label (e.g. their folder).
      mean, std: the encoder's preprocessor normalisation (OpenAI CLIP's by default).
      encode: an already compiled ``jitted_image_embeds(model)`` to share (``ClipScorer.encode_pixels``).
    """

    def __init__(self, model: CLIPVisionModelWithProjection, *, label: str | None = None,
                 source: str = "weights", mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 encode=None):
        self.label = label or f"{CLIP_FALLBACK_PREFIX}:{source}"
        self.size = model.config.image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.encode = encode or jitted_image_embeds(model)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **kwargs) -> CLIPFaceEmbedder:
        """Loads a transformers ``CLIPVisionModelWithProjection`` folder (``config.json`` + weights)."""
        return cls(from_pretrained(CLIPVisionModelWithProjection, folder), source=Path(folder).name, **kwargs)

    def embed(self, image: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
        if not faces:
            return np.zeros((0, 0), np.float32)
        pixels = np.stack([preprocess_reference(image, f, size=self.size, mean=self.mean, std=self.std).pixels
                           for f in faces])
        return self.encode(pixels)


def jitted_image_embeds(model: CLIPVisionModelWithProjection):
    """A host function (N, S, S, 3) float32 normalised pixels -> (N, projection_dim) float32 unit rows,
    running ``model`` as one compiled program on fixed batches of 8 (padded), so any N compiles once."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x).image_embeds.astype(jnp.float32))

    def encode(pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels, np.float32)
        out = []
        for start in range(0, len(pixels), _BATCH):
            chunk = pixels[start:start + _BATCH]
            padded = np.concatenate([chunk, np.zeros((_BATCH - len(chunk), *chunk.shape[1:]), np.float32)])
            out.append(np.asarray(forward(state, padded))[:len(chunk)])
        return unit_rows(np.concatenate(out))

    return encode


def is_fallback(label: str) -> bool:
    """Whether an embedder label names the CLIP fallback (not a face-recognition model)."""
    return label.startswith(CLIP_FALLBACK_PREFIX)

