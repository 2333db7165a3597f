"""Memory plan of a training run: XLA's per-device figures for the compiled step, without running it.

The step is lowered and compiled on abstract inputs (``ShapeDtypeStruct`` with shardings): no parameter is
materialised. On simulated CPU devices (``jax.config.update("jax_num_cpu_devices", N)`` before any JAX use)
the figures are XLA:CPU's buffer assignment, an estimate of the order of magnitude; on the devices of a TPU
topology (``training.aot.topology_devices``) they are the TPU compiler's own figures for that chip
(parameters and optimiser state are exact either way).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx

from realisid_jax.models.modeling_utils import count_params, fast_compile_options, init_rngs
from realisid_jax.data.precomputed import is_sdxl
from realisid_jax.sharding import make_mesh, state_shardings, use_mesh
from realisid_jax.text.tokenizer import CLIP_MAX_LENGTH
from realisid_jax.training.trainer import noise_schedule
from realisid_jax.training.batches import batch_spec
from realisid_jax.training.optimizer import make_optimizer
from realisid_jax.training.roofline import Chip, Roofline, device_chip, program_roofline
from realisid_jax.training.state import (
    ModelSetup,
    abstract_train_state,
    split_components,
    train_state_shardings,
    training_components,
    with_shardings,
)
from realisid_jax.training.step import StepSettings, jit_train_step


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of the compiled training step (``compiled.memory_analysis()``).

    Attributes:
      num_devices, per_device_batch, resolution: what was compiled (mesh ``(1, num_devices, 1)``, FSDP).
      trainable_params, frozen_params: parameter counts (whole model, not per device).
      state_bytes: one device's shards of the train state and the frozen weights, summed from their shardings
        (exact; the rest of ``argument_bytes`` is the batch).
      argument_bytes: inputs resident on a device (its shards of the train state, frozen weights, batch).
      output_bytes: outputs (the new train state, aliased with the donated input, and metrics).
      alias_bytes: outputs written in place of donated inputs (counted in both figures above).
      temp_bytes: XLA temporaries (activations kept for the backward pass, gradients, workspace).
      peak_bytes: ``argument + output - alias + temp``, the step's resident total.
      flops: the compiler's floating-point operations per step and device (``cost_analysis``; NaN if absent).
      optimal_seconds: the TPU compiler's roofline estimate of one step (``cost_analysis``; NaN on CPU).
      compile_seconds: wall time of lowering and compiling here.
      roofline: on TPU, the step's ``roofline.Roofline`` (the compiler's cost completed for the ops it does not
        cost); None on CPU.
    """

    num_devices: int
    per_device_batch: int
    resolution: int
    trainable_params: int
    frozen_params: int
    state_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    peak_bytes: int
    flops: float = math.nan
    optimal_seconds: float = math.nan
    compile_seconds: float = 0.0
    roofline: Roofline | None = None


def shard_bytes(tree) -> int:
    """Bytes one device holds of a pytree of ``ShapeDtypeStruct`` with shardings (the first device's shards)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compile_options(devices: Sequence[jax.Device]) -> dict:
    """Compiler options of a plan: on CPU no LLVM optimisation (buffer assignment precedes code generation, so
    the figures do not change); none on TPU (the figures must be the production compiler's)."""
    return fast_compile_options() if devices[0].platform == "cpu" else {}


def compiled_figures(lowered, devices: Sequence[jax.Device]) -> dict:
    """``argument/output/alias/temp/peak_bytes``, ``flops``, ``optimal_seconds`` and ``compile_seconds`` of a
    lowered program compiled for ``devices``' platform; on TPU also its ``roofline`` (``roofline.Roofline``)."""
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options=compile_options(devices))
    chip = device_chip(devices) if devices[0].platform == "tpu" else None
    return executable_figures(compiled, time.perf_counter() - start, chip)


def executable_figures(compiled, compile_seconds: float, chip: Chip | None = None) -> dict:
    """``compiled_figures`` of an executable (``jax.stages.Compiled``) that took ``compile_seconds``; the
    ``roofline`` for ``chip`` if given."""
    stats = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    argument, output = int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes)
    alias, temp = int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes)
    figures = dict(argument_bytes=argument, output_bytes=output, alias_bytes=alias, temp_bytes=temp,
                   peak_bytes=argument + output - alias + temp, flops=float(cost.get("flops", math.nan)),
                   optimal_seconds=float(cost.get("optimal_seconds", math.nan)), compile_seconds=compile_seconds)
    return figures if chip is None else {**figures, "roofline": program_roofline(compiled, chip)}


@dataclasses.dataclass(frozen=True)
class LoweredStep:
    """The training step of a plan, lowered (traced, not compiled).

    Attributes:
      lowered: the ``jax.stages.Lowered`` program (``step(state, frozen_inputs, batch)``).
      devices: the devices it was lowered for (the mesh's).
      batch: its abstract batch (field -> ``ShapeDtypeStruct`` with sharding).
      trainable_params, frozen_params, state_bytes: as ``MemoryPlan``.
      batch_bytes: one device's shard of the batch.
      gradient_bytes: one device's shards of the branch parameters (their gradients' size).
    """

    lowered: Any
    devices: tuple[jax.Device, ...]
    batch: dict[str, jax.ShapeDtypeStruct]
    trainable_params: int
    frozen_params: int
    state_bytes: int
    batch_bytes: int
    gradient_bytes: int


def train_step_memory(config: ml_collections.ConfigDict, num_devices: int, *, per_device_batch: int = 1,
                      resolution: int | None = None, devices: Sequence[jax.Device] | None = None) -> MemoryPlan:
    """Compiles ``config``'s training step with FSDP over ``num_devices`` devices and returns its memory plan.

    Args: see ``lower_train_step``.

    Raises:
      ValueError: fewer than ``num_devices`` devices are available.
    """
    start = time.perf_counter()
    step = lower_train_step(config, num_devices, per_device_batch=per_device_batch, resolution=resolution,
                            devices=devices)
    figures = compiled_figures(step.lowered, step.devices)
    figures["compile_seconds"] = time.perf_counter() - start
    return MemoryPlan(num_devices=num_devices, per_device_batch=per_device_batch,
                      resolution=int(resolution or config.train.resolution), trainable_params=step.trainable_params,
                      frozen_params=step.frozen_params, state_bytes=step.state_bytes, **figures)


def lower_train_step(config: ml_collections.ConfigDict, num_devices: int, *, per_device_batch: int = 1,
                     resolution: int | None = None, devices: Sequence[jax.Device] | None = None) -> LoweredStep:
    """Lowers ``config``'s training step with FSDP over ``num_devices`` devices on abstract inputs (nothing is
    materialised; seconds, where compiling takes minutes).

    Args:
      config: a project config (e.g. ``configs/sdxl.py``); its dtypes, ``train.remat`` and
        ``train.precomputed_inputs`` apply (the latter: the step from stored encoder outputs, without the VAE,
        text and image encoders in its frozen state or graph, and their outputs in its batch).
      num_devices: devices of the ``(1, num_devices, 1)`` mesh; the first ones of ``devices``.
      per_device_batch: examples per device (global batch ``num_devices * per_device_batch``).
      resolution: image side in pixels (default ``config.train.resolution``).
      devices: where to compile for (default ``jax.devices()``); e.g. a TPU topology's devices.

    Raises:
      ValueError: fewer than ``num_devices`` devices are available.
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < num_devices:
        raise ValueError(f"{num_devices} devices requested, {len(devices)} available (on CPU set "
                         f"jax_num_cpu_devices before any JAX use)")
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.batch_size = num_devices * per_device_batch
    config.train.resolution = int(resolution or config.train.resolution)
    mesh = make_mesh((1, num_devices, 1), devices[:num_devices])
    rules = tuple(tuple(r) for r in config.mesh.rules)
    # Built outside the mesh context (nnx.eval_shape would read logical axis names as mesh axes there).
    graphdef, abstract_params, frozen_inputs = nnx.eval_shape(
        lambda: split_components(training_components(config, init_rngs(0)), config))
    params = abstract_params["realisid"]
    frozen_sh = state_shardings(frozen_inputs, mesh, rules)
    setup = ModelSetup(graphdef=graphdef, frozen_inputs=frozen_inputs, frozen_shardings=frozen_sh,
                       param_shardings=state_shardings(params, mesh, rules).to_pure_dict())
    optimizer, _ = make_optimizer(config.train)
    shardings = train_state_shardings(optimizer, params.to_pure_dict(), setup, mesh)
    state = abstract_train_state(optimizer, params.to_pure_dict(), shardings, 0)
    num_encoders = 2 if is_sdxl(config) else 1
    batch = batch_spec(config, mesh, rules)
    # Token values do not change the program's memory; the real step uses the empty prompt's ids.
    settings = StepSettings.from_config(config, [(0,) * CLIP_MAX_LENGTH] * num_encoders)
    step = jit_train_step(graphdef=graphdef, scheduler=noise_schedule(None), optimizer=optimizer,
                          settings=settings, state_shardings=shardings, frozen_shardings=frozen_sh,
                          batch_shardings={k: v.sharding for k, v in batch.items()})
    with use_mesh(mesh, rules):
        lowered = step.lower(state, with_shardings(frozen_inputs, frozen_sh), batch)
    return LoweredStep(lowered=lowered, devices=tuple(devices[:num_devices]), batch=batch,
                       trainable_params=count_params(params), frozen_params=count_params(frozen_inputs),
                       state_bytes=shard_bytes((state, with_shardings(frozen_inputs, frozen_sh))),
                       batch_bytes=shard_bytes(batch), gradient_bytes=shard_bytes(state["params"]))
