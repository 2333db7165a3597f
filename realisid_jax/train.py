"""The trainer (``realisid train``): RealisID's two ControlNet branches and ID projection on a frozen SDXL/SD 1.5.

One code path for one CPU, one GPU host and a TPU pod slice: a ``(data, fsdp, tensor)`` mesh from
``config.mesh.shape``, logical-axis rules from ``config.mesh.rules``, the state born sharded, the step jitted
with explicit shardings (train state donated, frozen state not), batches assembled from each process's
shard. The parts live in ``realisid_jax.training``:

  state.py       frozen models + branches from the UNet, train state, shardings
  optimizer.py   AdamW with warm-up and global-norm clipping
  objective.py   Eq. 7 and condition dropout
  step.py        the jitted step
  batches.py     host batch -> global device batch (tokens, c_pe images)
  checkpoint.py  orbax manager: train state + per-process iterator position
  loop.py        steps, logging, checkpoints, SIGTERM, NaN guard
  distributed.py multi-host start-up

Sample images every ``config.train.sample_every`` steps are not produced here yet: ``train(hooks=...)`` takes
callables ``hook(step, state)`` for the sampling pipeline to plug into.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
from jax.sharding import Mesh

from realisid_jax.data.input_pipeline import make_train_iterator
from realisid_jax.schedulers import SDXL_SCHEDULER_CONFIG, DDPMScheduler
from realisid_jax.sharding import make_mesh, use_mesh
from realisid_jax.tokenizer import load_tokenizer, offline_clip_tokenizer, tokenize
from realisid_jax.training import loop
from realisid_jax.training.batches import DeviceBatches
from realisid_jax.training.checkpoint import StatefulIterator, TrainCheckpointer
from realisid_jax.training.optimizer import make_optimizer
from realisid_jax.training.state import (
    ModelSetup,
    TrainState,
    abstract_train_state,
    build_models,
    init_train_state,
    train_state_shardings,
)
from realisid_jax.training.step import StepSettings, compile_train_step, jit_train_step
from realisid_jax.training.summary import ProgressLog


def tokenizers(config: ml_collections.ConfigDict, pretrained: Path | None) -> list:
    """One CLIP tokenizer per text encoder: the checkpoint's ``tokenizer/`` (and ``tokenizer_2/``), or the
    offline standard CLIP tokenizer for random-weight runs."""
    count = 1 if config.model.get("text_encoder_2") is None else 2
    if pretrained is None:
        return [offline_clip_tokenizer()] * count
    return [load_tokenizer(pretrained, subfolder="tokenizer" if i == 0 else f"tokenizer_{i + 1}")
            for i in range(count)]


def noise_schedule(pretrained: Path | None) -> DDPMScheduler:
    """The training noise schedule: the checkpoint's ``scheduler/`` config, else SDXL's (scaled_linear,
    1000 steps; SD 1.5 uses the same betas)."""
    if pretrained is not None and (pretrained / "scheduler").is_dir():
        return DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    return DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)


@dataclasses.dataclass
class TrainResult:
    """``state`` after ``step`` completed steps; ``losses`` of the steps run by this call; ``preempted``: stopped
    by SIGTERM (a checkpoint of ``step`` was written); ``setup``: the graph definitions and the frozen models'
    state the steps used."""

    state: TrainState
    step: int
    losses: list[float]
    preempted: bool
    setup: ModelSetup


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
          data_iterator: StatefulIterator | None = None, pretrained: Path | None = None,
          image_encoder: Path | None = None, hooks: Sequence[loop.Hook] = (), mesh: Mesh | None = None,
          compiler_options: dict | None = None) -> TrainResult:
    """Trains until ``config.train.num_steps`` (resuming from the newest checkpoint in ``workdir/checkpoints``).

    Args:
      config: a project config (``configs/*.py`` plus overrides).
      workdir: ``checkpoints/`` and ``tensorboard/`` go here (a ``gs://`` URL on multi-host).
      data_dir: dataset folder of ``realisid prepare-data``; or give ``data_iterator`` (batches of this
        process's share of ``config.train.batch_size``, with ``get_state``/``set_state``).
      pretrained, image_encoder: diffusers pipeline folder and CLIP vision folder of the frozen models
        (both or neither; neither = random weights).
      hooks: called after every step with ``(step, train_state)``.
      mesh: default ``make_mesh(config.mesh.shape)`` over all devices.
      compiler_options: XLA options for compiling the step (see ``compile_train_step``).

    Raises:
      NonFiniteLossError: a NaN/inf loss or gradient norm (the last good checkpoint stays).
      ValueError: neither or both of ``data_dir`` / ``data_iterator``.
    """
    if (data_dir is None) == (data_iterator is None):
        raise ValueError("give exactly one of data_dir and data_iterator")
    mesh = make_mesh(tuple(config.mesh.shape)) if mesh is None else mesh
    rules = tuple(tuple(r) for r in config.mesh.rules)
    workdir = str(workdir)
    # Models are built outside the mesh context: nnx.eval_shape would read their logical axis names as mesh
    # axes there. Explicit out_shardings place everything.
    setup, abstract_params, make_params = build_models(config, mesh, rules, pretrained=pretrained,
                                                       image_encoder=image_encoder)
    optimizer, schedule = make_optimizer(config.train)
    shardings = train_state_shardings(optimizer, abstract_params, setup, mesh)
    if data_iterator is None:
        data_iterator = _input_iterator(config, data_dir)
    checkpointer = TrainCheckpointer(_join(workdir, "checkpoints"), max_to_keep=int(config.train.keep_checkpoints))
    seed = int(config.train.seed)
    try:
        if checkpointer.latest_step() is not None:
            target = abstract_train_state(optimizer, abstract_params, shardings, seed)
            state, start = checkpointer.restore(target, data_iterator)
        else:
            state, start = init_train_state(optimizer, make_params(), shardings, seed), 0
        toks = tokenizers(config, pretrained)
        settings = StepSettings.from_config(config, [tokenize(t, "")[0] for t in toks])
        batches = DeviceBatches(data_iterator, toks, config, mesh, rules)
        step = jit_train_step(graphdefs=setup.graphdefs, scheduler=noise_schedule(pretrained), optimizer=optimizer,
                              settings=settings, state_shardings=shardings, frozen_shardings=setup.frozen_shardings,
                              batch_shardings=batches.shardings)
        meta = {"config": json.loads(config.to_json_best_effort())}
        metrics_file = None if "://" in workdir else Path(workdir) / "metrics.jsonl"
        with use_mesh(mesh, rules), ProgressLog(_join(workdir, "tensorboard"), start_step=start,
                                                num_steps=int(config.train.num_steps),
                                                log_every=int(config.train.log_every),
                                                metrics_file=metrics_file) as log:
            num_steps = int(config.train.num_steps)
            compiled = (compile_train_step(step, state, setup.frozen_inputs, batches.spec, compiler_options)
                        if start < num_steps else None)
            result = loop.run(lambda s, b: compiled(s, setup.frozen_inputs, b), state, batches, start_step=start,
                              num_steps=num_steps, checkpointer=checkpointer,
                              data_iterator=data_iterator, checkpoint_every=int(config.train.checkpoint_every),
                              log=log, learning_rate=schedule, meta=meta, hooks=hooks)
    finally:
        checkpointer.close()
    return TrainResult(result.state, result.step, result.losses, result.preempted, setup)


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if "://" in root else str(Path(root) / name)


def _input_iterator(config: ml_collections.ConfigDict, data_dir: str | os.PathLike) -> StatefulIterator:
    """This process's shard of the prepared dataset, batches of ``batch_size / process_count``."""
    return make_train_iterator(data_dir, batch_size=int(config.train.batch_size), seed=int(config.train.seed),
                               resolution=int(config.train.resolution), shard_index=jax.process_index(),
                               shard_count=jax.process_count())
