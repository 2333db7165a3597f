"""The trainer (``realisid train``): RealisID's two ControlNet branches and ID projection on a frozen SDXL/SD 1.5.

One code path for one CPU, one GPU host and a TPU pod slice: a ``(data, fsdp, tensor)`` mesh from
``config.mesh.shape``, logical-axis rules from ``config.mesh.rules``, the state born sharded, the step jitted
with explicit shardings (train state donated, frozen state not), batches assembled from each process's
shard. :class:`Trainer` builds the models and compiles the step once; ``fit`` runs (or resumes) a run in a
work directory, as often as wanted (a notebook, a sweep over data, the tests). The parts live in
``realisid_jax.training``:

  state.py       frozen models + branches from the UNet, train state, shardings
  optimizer.py   AdamW with warm-up and global-norm clipping
  objective.py   Eq. 7 and condition dropout
  step.py        the jitted step
  batches.py     host batch -> global device batch (tokens, c_pe images)
  checkpoint.py  orbax manager: train state + per-process iterator position
  loop.py        steps, logging, checkpoints, SIGTERM, NaN guard
  samples.py     sample images every ``config.train.sample_every`` steps
  distributed.py multi-host start-up

With ``config.train.precomputed_inputs`` the step reads the encoder outputs ``prepare-data --precompute`` stored
(``data.precomputed``): the VAE, the text encoders and the image encoder are neither loaded nor compiled, no
tokenizer is read, and training samples are refused (they need those models: ``realisid export`` a checkpoint and
``realisid sample`` it instead).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from realisid_jax.data.input_pipeline import make_train_iterator
from realisid_jax.data.precomputed import PrecomputedInputsError, check_dataset, example_shapes
from realisid_jax.realisid.components import base_scheduler_config, base_tokenizers
from realisid_jax.schedulers import SDXL_SCHEDULER_CONFIG, DDPMScheduler
from realisid_jax.sharding import make_mesh, use_mesh
from realisid_jax.text.prompt_encoding import no_text_setting
from realisid_jax.text.tokenizer import offline_clip_tokenizer, tokenize
from realisid_jax.training import loop
from realisid_jax.training.batches import DeviceBatches, batch_spec
from realisid_jax.training.checkpoint import StatefulIterator, TrainCheckpointer
from realisid_jax.training.optimizer import make_optimizer
from realisid_jax.training.samples import SampleWriter
from realisid_jax.training.state import (
    TrainState,
    abstract_train_state,
    build_models,
    init_train_state,
    train_state_shardings,
)
from realisid_jax.training.step import StepSettings, jit_train_step
from realisid_jax.training.summary import ProgressLog, truncate_metrics
from realisid_jax.training.workdir_lock import WorkdirLock


def tokenizers(config: ml_collections.ConfigDict, pretrained: Path | None) -> list:
    """One CLIP tokenizer per text encoder: the base's (``realisid.components.base_tokenizers``: a folder's
    ``tokenizer/`` and ``tokenizer_2/``, a cache's recorded ones, the standard ones for a single file), or the
    offline standard CLIP tokenizer for random-weight runs; none with ``train.precomputed_inputs``."""
    if config.train.precomputed_inputs:
        return []
    if pretrained is None:
        return [offline_clip_tokenizer()] * (1 if config.model.get("text_encoder_2") is None else 2)
    return list(base_tokenizers(pretrained, config))


def noise_schedule(pretrained: Path | None) -> DDPMScheduler:
    """The training noise schedule: the base's scheduler config (a folder's ``scheduler/``, a cache's recorded
    one), else SDXL's (scaled_linear, 1000 steps; SD 1.5 uses the same betas)."""
    config = base_scheduler_config(pretrained) if pretrained is not None else None
    return DDPMScheduler.from_config(config or SDXL_SCHEDULER_CONFIG)


@dataclasses.dataclass
class TrainResult:
    """``state`` after ``step`` completed steps; ``losses`` of the steps run by this call; ``preempted``: stopped
    by SIGTERM (a checkpoint of ``step`` was written)."""

    state: TrainState
    step: int
    losses: list[float]
    preempted: bool


class Trainer:
    """The models, shardings and jitted step of one config on one mesh; the step is compiled on first use.

    Args:
      config: a project config (``configs/*.py`` plus overrides). ``fit`` reads ``config.train``'s
        ``num_steps``, ``checkpoint_every``, ``keep_checkpoints``, ``log_every`` and ``sample_every`` at each
        call; everything else is fixed here.
      pretrained, image_encoder: the frozen models' base (a diffusers folder, a Stability single file or a
        ``realisid convert`` cache) and CLIP vision folder (both or neither; neither = random weights). With
        ``train.precomputed_inputs`` only the base's UNet is loaded and ``image_encoder`` is not read.
      variant: weights variant of a folder base (``"fp16"``).
      loras: ``(file, scale)`` LoRAs merged into the frozen UNet / text encoders before the branches are copied
        from the UNet (``loading.lora``).
      mesh: default ``make_mesh(config.mesh.shape)`` over all devices.
      compiler_options: XLA options for compiling the step (see ``compile_train_step``).

    Attributes:
      setup: the graph definitions and the frozen models' state the steps use.

    Raises:
      ValueError: only one of ``pretrained`` / ``image_encoder``.
      PrecomputedInputsError: ``train.precomputed_inputs`` with ``train.sample_every`` > 0 (before any model
        is built).
      FileNotFoundError, CheckpointMismatchError: unusable pretrained folders. LoraError: a LoRA that does not
        fit.
    """

    def __init__(self, config: ml_collections.ConfigDict, *, pretrained: Path | None = None,
                 image_encoder: Path | None = None, variant: str | None = None,
                 loras: Sequence[tuple[str | Path, float]] = (), mesh: Mesh | None = None,
                 compiler_options: dict | None = None):
        _check_samples(config)
        self.config = config
        self.mesh = make_mesh(tuple(config.mesh.shape)) if mesh is None else mesh
        self.rules = tuple(tuple(r) for r in config.mesh.rules)
        # Models are built outside the mesh context: nnx.eval_shape would read their logical axis names as mesh
        # axes there. Explicit out_shardings place everything.
        self.setup, self._abstract_params, self._make_params = build_models(
            config, self.mesh, self.rules, pretrained=pretrained, image_encoder=image_encoder, variant=variant,
            loras=loras)
        self.optimizer, self.schedule = make_optimizer(config.train)
        self.shardings = train_state_shardings(self.optimizer, self._abstract_params, self.setup, self.mesh)
        self.tokenizers = tokenizers(config, pretrained)
        self._batch_spec = batch_spec(config, self.mesh, self.rules)
        settings = StepSettings.from_config(config, [tokenize(t, "")[0] for t in self.tokenizers])
        self._step = jit_train_step(graphdef=self.setup.graphdef, scheduler=noise_schedule(pretrained),
                                    optimizer=self.optimizer, settings=settings, state_shardings=self.shardings,
                                    frozen_shardings=self.setup.frozen_shardings,
                                    batch_shardings={k: s.sharding for k, s in self._batch_spec.items()})
        self._compiler_options = compiler_options
        self._compiled = None

    def initial_state(self) -> TrainState:
        """Step 0: both ControlNets copied from the frozen UNet, fresh optimiser state, ``PRNGKey(seed)``."""
        return init_train_state(self.optimizer, self._make_params(), self.shardings, int(self.config.train.seed))

    def abstract_state(self) -> TrainState:
        """The train state's shapes, dtypes and shardings (a checkpoint's restore target)."""
        return abstract_train_state(self.optimizer, self._abstract_params, self.shardings,
                                    int(self.config.train.seed))

    def step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        """One step (``state`` is donated); compiles on the first call."""
        if self._compiled is None:
            with use_mesh(self.mesh, self.rules):
                lowered = self._step.lower(self.abstract_state(), self.setup.frozen_inputs, self._batch_spec)
            self._compiled = lowered.compile(compiler_options=self._compiler_options)
        return self._compiled(state, self.setup.frozen_inputs, batch)

    def fit(self, workdir: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
            data_iterator: StatefulIterator | None = None, hooks: Sequence[loop.Hook] = (),
            resume_step: int | None = None) -> TrainResult:
        """Trains until ``config.train.num_steps``, resuming from the newest checkpoint in ``workdir/checkpoints``
        that restores (a newer one that does not is skipped with a warning), or from ``resume_step``.
        ``workdir`` is locked for the call (``workdir_lock``); ``metrics.jsonl`` keeps one row per step (rows
        after the restored step are dropped).

        Args:
          workdir: ``checkpoints/``, ``tensorboard/``, ``metrics.jsonl`` and ``samples/`` go here (a ``gs://``
            URL on multi-host).
          data_dir: dataset folder of ``realisid prepare-data``; or give ``data_iterator`` (batches of this
            process's share of ``config.train.batch_size``, with ``get_state``/``set_state``).
          hooks: called after every step with ``(step, train_state)``.

        Raises:
          NonFiniteLossError: a NaN/inf loss or gradient norm (the last good checkpoint stays).
          ValueError: neither or both of ``data_dir`` / ``data_iterator``.
          PrecomputedInputsError: ``train.precomputed_inputs`` and ``data_dir`` lacks them or stores them for
            another resolution / other encoders (naming the fields), or ``train.sample_every`` > 0 with them.
          WorkdirLockedError: another run holds ``workdir``. CheckpointError: no checkpoint restores (or not
            ``resume_step``).
        """
        if (data_dir is None) == (data_iterator is None):
            raise ValueError("give exactly one of data_dir and data_iterator")
        with WorkdirLock(workdir, enabled=jax.process_index() == 0):
            return self._fit(str(workdir), data_dir, data_iterator, hooks, resume_step)

    def _fit(self, workdir: str, data_dir, data_iterator, hooks, resume_step) -> TrainResult:
        train = self.config.train
        if data_iterator is None:
            data_iterator = _input_iterator(self.config, data_dir)
        hooks = (*hooks, *self._sample_hooks(workdir))
        with TrainCheckpointer(_join(workdir, "checkpoints"), max_to_keep=int(train.keep_checkpoints)) as ckpt:
            state, start = restore_or_start(ckpt, workdir, self.abstract_state, self.initial_state, data_iterator,
                                            resume_step)
            batches = DeviceBatches(data_iterator, self.tokenizers, self.config, self.mesh, self.rules)
            meta = {"config": json.loads(self.config.to_json_best_effort())}
            metrics_file = None if "://" in workdir else Path(workdir) / "metrics.jsonl"
            if metrics_file is not None and jax.process_index() == 0:
                truncate_metrics(metrics_file, start)
            with use_mesh(self.mesh, self.rules), ProgressLog(
                    _join(workdir, "tensorboard"), start_step=start, num_steps=int(train.num_steps),
                    log_every=int(train.log_every), metrics_file=metrics_file) as log:
                result = loop.run(self.step, state, batches, start_step=start, num_steps=int(train.num_steps),
                                  checkpointer=ckpt, data_iterator=data_iterator,
                                  checkpoint_every=int(train.checkpoint_every), log=log,
                                  learning_rate=self.schedule, meta=meta, hooks=hooks)
        return TrainResult(result.state, result.step, result.losses, result.preempted)

    def _sample_hooks(self, workdir: str) -> tuple[loop.Hook, ...]:
        _check_samples(self.config)
        every = int(self.config.train.sample_every)
        if every <= 0 or "://" in workdir:
            return ()
        return (SampleWriter(self.setup, self.tokenizers, self.config, self.mesh, Path(workdir) / "samples", every),)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
          data_iterator: StatefulIterator | None = None, pretrained: Path | None = None,
          image_encoder: Path | None = None, variant: str | None = None,
          loras: Sequence[tuple[str | Path, float]] = (), hooks: Sequence[loop.Hook] = (), mesh: Mesh | None = None,
          compiler_options: dict | None = None, resume_step: int | None = None) -> TrainResult:
    """``Trainer(config, ...).fit(workdir, ...)``: one run (see both for the arguments and errors). The work
    directory is locked and a dataset's precomputed inputs checked before the models are built, so a second run
    on it, or a dataset without them, stops at once."""
    with WorkdirLock(workdir, enabled=jax.process_index() == 0):
        if data_dir is not None and config.train.precomputed_inputs:
            check_dataset(data_dir, example_shapes(config), empty_prompt=_empty_prompt(config))
        trainer = Trainer(config, pretrained=pretrained, image_encoder=image_encoder, variant=variant, loras=loras,
                          mesh=mesh, compiler_options=compiler_options)
        return trainer.fit(workdir, data_dir=data_dir, data_iterator=data_iterator, hooks=hooks,
                           resume_step=resume_step)


def restore_or_start(ckpt: TrainCheckpointer, workdir: str, abstract_state: Callable[[], Any],
                     initial_state: Callable[[], Any], iterator: StatefulIterator | None,
                     resume_step: int | None) -> tuple[Any, int]:
    """The state a run continues from and its step: checkpoint ``resume_step``, else the newest one of ``ckpt``
    that restores (``TrainCheckpointer.restore``), else ``initial_state()`` at step 0 when there is none.

    Process 0 says which on stdout in one line, ``resuming from step N (WORKDIR/checkpoints/N), data position
    restored`` or ``starting a new run in WORKDIR``, naming the newer checkpoints passed over (corrupt ones, each
    with its warning on stderr, or those newer than ``resume_step``): a user must be able to tell a resumed run
    from one that starts again.

    Raises:
      FileNotFoundError, CheckpointError: from ``TrainCheckpointer.restore``.
    """
    if not ckpt.all_steps() and resume_step is None:
        _say(f"starting a new run in {workdir}")
        return initial_state(), 0
    state, start = ckpt.restore(abstract_state(), iterator, resume_step)
    line = f"resuming from step {start} ({_join(_join(workdir, 'checkpoints'), str(start))})"
    if iterator is not None:
        line += ", data position restored"
    newer = [str(s) for s in ckpt.all_steps() if s > start]
    if newer and resume_step is None:
        line += f"; newer step{'s' * (len(newer) > 1)} {', '.join(newer)} did not restore (warnings above)"
    elif newer:
        line += f"; picked by --resume-step (newer: {', '.join(newer)})"
    _say(line)
    return state, start


def _say(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)


def _check_samples(config: ml_collections.ConfigDict) -> None:
    """Training samples need the VAE decoder and the encoders, which precomputed inputs leave unloaded."""
    if config.train.precomputed_inputs and int(config.train.sample_every) > 0:
        raise PrecomputedInputsError(
            "train.precomputed_inputs=True loads no VAE, text or image encoder, which training samples need: set "
            "--config.train.sample_every=0 (`realisid export` a checkpoint and `realisid sample` it instead)")


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if "://" in root else str(Path(root) / name)


def _input_iterator(config: ml_collections.ConfigDict, data_dir: str | os.PathLike) -> StatefulIterator:
    """This process's shard of the prepared dataset, batches of ``batch_size / process_count``; its precomputed
    inputs with ``train.precomputed_inputs``."""
    precomputed = bool(config.train.precomputed_inputs)
    return make_train_iterator(data_dir, batch_size=int(config.train.batch_size), seed=int(config.train.seed),
                               resolution=int(config.train.resolution), shard_index=jax.process_index(),
                               shard_count=jax.process_count(),
                               precomputed=example_shapes(config) if precomputed else None,
                               empty_prompt=precomputed and _empty_prompt(config))


def _empty_prompt(config: ml_collections.ConfigDict) -> bool:
    """Whether text dropout needs the stored empty prompt's embeddings (``realisid.no_text``)."""
    return no_text_setting(config) == "empty_prompt"
