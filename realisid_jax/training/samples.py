"""Sample images during training: every ``config.train.sample_every`` steps, one image of
``config.train.sample_prompt`` with the face of ``config.train.sample_reference`` in the middle of the image,
from the branches being trained (the sampling pipeline, on the training mesh, sharing the frozen models)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx
from PIL import Image

if TYPE_CHECKING:
    from realisid_jax.train import Trainer


def sample_person(config, height: int, width: int):
    """The ``Person`` of the samples: ``config.train.sample_reference`` (a photo path; empty: scikit-image's
    astronaut) with a square box of a quarter of the shorter side, centred horizontally, at 2/5 of the height."""
    from realisid_jax.conditioning import Person

    reference = config.train.sample_reference
    if not reference:
        from skimage import data

        reference = data.astronaut()
    side = min(height, width) / 4
    cx, cy = width / 2, 0.4 * height
    return Person(reference, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))


class SampleWriter:
    """Training hook ``(step, state)``: at every ``every``-th step writes ``folder/step_<step>.png``.

    The pipeline is built on the first call (its compilation happens then, once per run) and every process
    runs it (the sampling step is a collective on multi-host); process 0 writes the file. Construct it outside
    the mesh context: the branches' parameter tree is traced here (``nnx.eval_shape`` reads logical axis names
    as mesh axes inside one).
    """

    def __init__(self, trainer: Trainer, folder: Path, every: int):
        from realisid_jax.models.factory import dtypes
        from realisid_jax.models.realisid import RealisID, RealisIDConfig

        self._trainer, self._folder, self._every = trainer, Path(folder), int(every)
        abstract = RealisID.abstract(RealisIDConfig.from_config(trainer.config), **dtypes(trainer.config))
        # A copy: variables created inside eval_shape's trace cannot be assigned outside it.
        self._param_state = jax.tree.map(lambda x: x, nnx.split(abstract, nnx.Param, ...)[1])
        self._pipeline = None

    def __call__(self, step: int, state: dict) -> None:
        if step % self._every:
            return
        if self._pipeline is None:
            self._pipeline = self._build(state["params"])
        else:
            self._pipeline.set_branch_params(state["params"])
        s = self._trainer.config.sampling
        person = sample_person(self._trainer.config, s.height, s.width)
        image = np.asarray(self._pipeline(self._trainer.config.train.sample_prompt, [person], seed=s.seed,
                                    progress=False).images[0])
        if jax.process_index() == 0:
            self._folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(self._folder / f"step_{step:08d}.png")

    def _build(self, params: dict):
        from realisid_jax.pipeline import RealisIDPipeline

        trainer = self._trainer
        frozen_graphdef, branch_graphdef = trainer.setup.graphdefs
        frozen = nnx.merge(frozen_graphdef, trainer.setup.frozen_inputs[0])
        self._param_state.replace_by_pure_dict(params)
        realisid = nnx.merge(branch_graphdef, self._param_state, trainer.setup.frozen_inputs[1])
        models = {name: getattr(frozen, name) for name in ("unet", "vae", "text_encoder", "text_encoder_2",
                                                             "image_encoder")}
        return RealisIDPipeline({**models, "realisid": realisid}, trainer.tokenizers, trainer.config,
                                mesh=trainer.mesh)
