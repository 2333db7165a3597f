"""ASP, the aesthetic score (the paper's first metric), with LAION's "improved aesthetic predictor".

The paper reports ASP without naming its predictor; LAION's is the usual one, and the one used here.
Source: github.com/christophschuhmann/improved-aesthetic-predictor (``simple_inference.py``, class ``MLP``)::

    nn.Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64),
                  Dropout(0.1), Linear(64, 16), Linear(16, 1))

with no activation between the layers (its ReLUs are commented out), trained with an MSE loss on human
ratings of 1 to 10. Its input is the L2-normalised CLIP ViT-L/14 image embedding of the *whole* image:
OpenAI CLIP's ``encode_image``, which is transformers' ``CLIPVisionModelWithProjection`` ``image_embeds``
after ``CLIPImageProcessor``'s preprocessing (``clip_score.ClipScorer.image_embeds``).

Weights: its ``sac+logos+ava1-l14-linearMSE.pth``, a state dict ``layers.{0,2,4,6,7}.{weight,bias}`` read
with ``torch.load(weights_only=True)`` (the ``torch`` extra), or the same keys in a ``.safetensors`` file::

    python -c "import torch, safetensors.torch as st; st.save_file(torch.load(
        'sac+logos+ava1-l14-linearMSE.pth', weights_only=True), 'aesthetic.safetensors')"

Scores are comparable with the paper's ASP column (6.11 for RealisID, small faces) only with these weights
on embeddings of OpenAI's ViT-L/14 (``openai/clip-vit-large-patch14``).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realisid_jax.eval.identity import unit_rows
from realisid_jax.models.layers import linear
from realisid_jax.models.modeling_utils import abstract_module
from realisid_jax.loading.files import read_state_dict
from realisid_jax.loading.torch_state import load_torch_state

CLIP_L14_DIM = 768
HIDDEN = (1024, 128, 64, 16)
DROPOUT = (0.2, 0.2, 0.1)  # after the first three Linear layers, as in the torch Sequential


class AestheticPredictor(nnx.Module):
    """LAION's aesthetic MLP (module docstring); ``layers`` indices match the torch ``nn.Sequential``'s, so the
    state-dict keys are ``layers.0.weight`` ... ``layers.7.bias``.

    Args:
      input_size: embedding width (768 for CLIP ViT-L/14; any width for tiny test models).
      rngs: initialisation randomness.
    """

    def __init__(self, input_size: int = CLIP_L14_DIM, *, rngs: nnx.Rngs):
        widths = (input_size, *HIDDEN)
        layers = []
        for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
            # Replicated logical axes: a 4 MB model evaluated on the host never needs sharding.
            layers.append(linear(n_in, n_out, (None, None), rngs=rngs))
            if i < len(DROPOUT):
                layers.append(nnx.Dropout(DROPOUT[i], deterministic=True))
        layers.append(linear(HIDDEN[-1], 1, (None, None), rngs=rngs))
        self.layers = nnx.List(layers)

    @property
    def input_size(self) -> int:
        return self.layers[0].in_features

    def __call__(self, embeds: jax.Array) -> jax.Array:
        """(N, input_size) float32 L2-normalised image embeddings -> (N, 1) float32 scores (about 1..10 with
        the LAION weights). Dropout is inactive (inference)."""
        x = embeds
        for layer in self.layers:
            x = layer(x)
        return x

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> AestheticPredictor:
        """Loads a ``.pth``/``.pt`` state dict (``torch.load(weights_only=True)``) or a ``.safetensors`` file
        with the same keys; the input width is taken from ``layers.0.weight``.

        Raises:
          FileNotFoundError: no such file.
          ValueError: the file cannot be parsed.
          CheckpointMismatchError: missing, unexpected or wrong-shape keys, all listed.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"aesthetic predictor weights {path} not found (expected LAION's "
                                    "sac+logos+ava1-l14-linearMSE.pth or a .safetensors with its keys)")
        state_dict = read_state_dict(path)
        first = state_dict.get("layers.0.weight")
        input_size = first.shape[1] if first is not None and first.ndim == 2 else CLIP_L14_DIM
        graphdef, abstract = nnx.split(abstract_module(lambda rngs: cls(input_size, rngs=rngs)))
        return nnx.merge(graphdef, load_torch_state(abstract, state_dict, source=str(path)))


class AestheticScorer:
    """ASP of CLIP image embeddings with an ``AestheticPredictor``, compiled once.

    Args:
      model: the predictor.
      label: names the weights in every output (default ``"laion-aesthetic"``).
    """

    def __init__(self, model: AestheticPredictor, *, label: str = "laion-aesthetic"):
        self.label = label
        self.input_size = model.input_size
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)[:, 0])
        self._score = lambda x: np.asarray(forward(state, jnp.asarray(x)), np.float32)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> AestheticScorer:
        """``AestheticPredictor.from_file`` labelled ``"laion-aesthetic:<file name>"`` (same errors)."""
        return cls(AestheticPredictor.from_file(path), label=f"laion-aesthetic:{Path(path).name}")

    def score(self, image_embeds: np.ndarray) -> np.ndarray:
        """(N, D) CLIP ``image_embeds`` (any norm; L2-normalised here, as LAION's inference does) -> (N,)
        float32 aesthetic scores.

        Raises:
          ValueError: D is not the predictor's input width (embeddings of another CLIP model).
        """
        image_embeds = np.asarray(image_embeds, np.float32)
        if image_embeds.ndim != 2 or image_embeds.shape[1] != self.input_size:
            raise ValueError(f"{self.label} takes (N, {self.input_size}) CLIP image embeddings, got shape "
                             f"{image_embeds.shape}: use the CLIP model it was trained on (ViT-L/14: 768)")
        return self._score(unit_rows(image_embeds))
