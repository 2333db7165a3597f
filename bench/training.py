"""The trainer's jitted step (``realisid_jax.training.step``) on synthetic batches, one device."""

from __future__ import annotations

import jax
import numpy as np

from realisid_jax.sharding import make_mesh, use_mesh
from realisid_jax.text.tokenizer import CLIP_MAX_LENGTH
from realisid_jax.training.trainer import noise_schedule
from realisid_jax.training.batches import batch_shapes
from realisid_jax.training.optimizer import make_optimizer
from realisid_jax.training.state import build_models, init_train_state, replicated, train_state_shardings
from realisid_jax.training.step import StepSettings, jit_train_step


def trainer(config, seed: int = 0):
    """``(run, batch_size, compiled)``: ``run()`` does one training step on a fixed random batch and blocks;
    ``compiled`` is the step's ``jax.stages.Compiled`` (memory and cost analyses)."""
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    rules = tuple(tuple(r) for r in config.mesh.rules)
    n_text = 1 if config.model.get("text_encoder_2") is None else 2
    # As realisid_jax.training.trainer: models and state built outside the mesh context, the step traced inside it.
    setup, abstract_params, make_params = build_models(config, mesh, rules)
    optimizer, _ = make_optimizer(config.train)
    shardings = train_state_shardings(optimizer, abstract_params, setup, mesh)
    state = init_train_state(optimizer, make_params(), shardings, seed)
    settings = StepSettings.from_config(config, [[49406, 49407] + [49407] * (CLIP_MAX_LENGTH - 2)] * n_text)
    rng = np.random.default_rng(seed)
    batch = {}
    for name, (shape, dtype) in batch_shapes(config).items():
        if np.issubdtype(dtype, np.integer):
            batch[name] = rng.integers(0, 49408, shape).astype(dtype)
        elif name == "time_ids":  # SDXL micro-conditioning of an uncropped square photo
            r = int(config.train.resolution)
            batch[name] = np.broadcast_to(np.array([r, r, 0, 0, r, r], dtype), shape).copy()
        elif name == "face_box":
            batch[name] = np.broadcast_to(np.array([0.3, 0.2, 0.7, 0.6], dtype), shape).copy()
        else:
            batch[name] = rng.uniform(-1, 1, shape).astype(dtype)
    batch = jax.device_put(batch, replicated(mesh))
    step = jit_train_step(graphdef=setup.graphdef, scheduler=noise_schedule(None), optimizer=optimizer,
                          settings=settings, state_shardings=shardings, frozen_shardings=setup.frozen_shardings,
                          batch_shardings=jax.tree.map(lambda _: replicated(mesh), batch))
    with use_mesh(mesh, rules):
        compiled = step.lower(state, setup.frozen_inputs, batch).compile()
    holder = {"state": state}

    def run():
        with use_mesh(mesh, rules):
            holder["state"], metrics = compiled(holder["state"], setup.frozen_inputs, batch)
            jax.block_until_ready(metrics)
        return metrics

    return run, batch["face_box"].shape[0], compiled
