"""Sample images during training: every ``config.train.sample_every`` steps, one image of
``config.train.sample_prompt`` with the face of ``config.train.sample_reference`` in the middle of the image,
from the branches being trained (the sampling pipeline, on the training mesh, sharing the frozen models).

Not with ``train.precomputed_inputs``: the step then holds no VAE, text or image encoder, which sampling needs;
the trainer refuses ``sample_every`` > 0 with them (``trainer._check_samples``) rather than load them here."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx
from PIL import Image

from realisid_jax.realisid.components import abstract_branches
from realisid_jax.realisid.conditions import default_person
from realisid_jax.realisid.pipeline import RealisIDPipeline



class SampleWriter:
    """Training hook ``(step, state)``: at every ``every``-th step writes ``folder/step_<step>.png``.

    The pipeline is built on the first call (its compilation happens then, once per run) over the trainer's
    split ``Components`` (no merge; the branch parameters are swapped in at each call) and every process runs it
    (the sampling step is a collective on multi-host); process 0 writes the file.

    Args:
      setup: the trainer's ``ModelSetup`` (graphdef and frozen state).
      tokenizers, config, mesh: the trainer's.
    """

    def __init__(self, setup, tokenizers, config, mesh, folder: Path, every: int):
        self._setup, self._tokenizers, self._config, self._mesh = setup, tuple(tokenizers), config, mesh
        self._folder, self._every = Path(folder), int(every)
        # The branch parameters' variables (logical axis names included), filled from each train state. Built
        # here, outside the mesh context: nnx.eval_shape would read the axis names as mesh axes inside one. A
        # copy: variables created inside eval_shape's trace cannot be assigned outside it.
        self._param_state = jax.tree.map(lambda x: x, nnx.split(abstract_branches(config), nnx.Param, ...)[1])
        self._pipeline = None

    def __call__(self, step: int, state: dict) -> None:
        if step % self._every:
            return
        if self._pipeline is None:
            self._pipeline = self._build(state["params"])
        else:
            self._pipeline.set_branch_params(state["params"])
        s = self._config.sampling
        person = default_person(s.height, s.width, self._config.train.sample_reference or None)
        image = np.asarray(self._pipeline(self._config.train.sample_prompt, [person], seed=s.seed,
                                          progress=False).images[0])
        if jax.process_index() == 0:
            self._folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(self._folder / f"step_{step:08d}.png")

    def _build(self, params: dict) -> RealisIDPipeline:
        # The step's state with the branch parameters of ``params``: a copy, the train state is donated.
        self._param_state.replace_by_pure_dict(jax.tree.map(lambda x: x, params))
        state = nnx.merge_state(self._setup.frozen_inputs, nnx.State({"realisid": self._param_state}))
        return RealisIDPipeline.from_split(self._setup.graphdef, state, self._tokenizers, self._config,
                                           mesh=self._mesh)
