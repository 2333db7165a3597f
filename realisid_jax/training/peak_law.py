"""An *estimated* per-chip peak of a training step too large to compile on this host, from its parts.

The TPU compiler's per-chip peak of the training step is ``arguments + temporaries`` (its outputs are the donated
state, written in place). The arguments are exact without compiling: the device's shards of the train state and
the frozen weights, and of the batch. The temporaries are modelled from three parts of the step, each also exact
without compiling, as

    temporaries ≈ a · residuals + b · gradients + c · largest block + d

- ``residuals``: what the forward pass saves for the backward pass on one device (``jax.vjp``'s residuals of
  the loss, traced; with every block rematerialised these are the blocks' inputs, and the bf16 copies of the
  branches' weights, sharded as the weights are);
- ``gradients``: the device's shards of the branches' float32 gradients;
- ``largest block``: the float32 parameters of the largest trainable block, whole (a resnet, or a transformer
  with its whole stack of layers: the unit whose weights are gathered and whose gradients are formed before
  they are reduce-scattered).

``a, b, c, d`` are fitted by least squares on TPU compiles that fit this host (``python -m bench.train_peak``:
SDXL's widths cut in depth and resolution) and checked against compiles left out of the fit; docs/training.md
has the table and the check. maxtext plans its runs with the compiler's exact figures (``train_compile.py``);
this law is for the steps whose compile needs more host memory than there is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from realisid_jax.data.precomputed import is_sdxl
from realisid_jax.models.modeling_utils import init_rngs
from realisid_jax.sharding import make_mesh, use_mesh
from realisid_jax.text.tokenizer import CLIP_MAX_LENGTH
from realisid_jax.training.batches import batch_spec
from realisid_jax.training.memory import lower_train_step
from realisid_jax.training.state import split_components, training_components
from realisid_jax.training.step import StepSettings, compute_loss
from realisid_jax.training.trainer import noise_schedule


@dataclasses.dataclass(frozen=True)
class StepParts:
    """Per-device bytes of a training step's parts (module docstring), none of them compiled.

    Attributes:
      state_bytes: the device's shards of the train state and the frozen weights (exact).
      batch_bytes: its shard of the batch (exact).
      residual_bytes: saved for the backward pass on the device.
      gradient_bytes: its shards of the branches' float32 gradients.
      block_bytes: the largest trainable block's float32 parameters, whole.
    """

    state_bytes: int
    batch_bytes: int
    residual_bytes: float
    gradient_bytes: int
    block_bytes: int

    def features(self) -> tuple[float, float, float, float]:
        """The law's regressors: (residuals, gradients, largest block, 1)."""
        return float(self.residual_bytes), float(self.gradient_bytes), float(self.block_bytes), 1.0


@dataclasses.dataclass(frozen=True)
class PeakLaw:
    """``temporaries ≈ a·residuals + b·gradients + c·largest block + d`` (``coefficients``, d in bytes);
    ``check_error``: the largest relative error of the peak on the compiles left out of the fit."""

    coefficients: tuple[float, float, float, float]
    check_error: float

    def temp_bytes(self, parts: StepParts) -> float:
        return float(np.dot(self.coefficients, parts.features()))

    def peak_bytes(self, parts: StepParts) -> float:
        """The estimated per-device peak: the exact arguments plus the modelled temporaries."""
        return parts.state_bytes + parts.batch_bytes + self.temp_bytes(parts)


def fit_law(parts: Sequence[StepParts], temp_bytes: Sequence[float]) -> tuple[float, float, float, float]:
    """Least-squares ``(a, b, c, d)`` of the compiled ``temp_bytes`` of ``parts`` (at least four compiles).

    Raises:
      ValueError: fewer than four compiles.
    """
    if len(parts) < 4:
        raise ValueError(f"fitting the peak law needs at least 4 compiles, got {len(parts)}")
    features = np.array([p.features() for p in parts])
    scale = np.abs(features).max(axis=0)  # bytes next to the constant 1: solve on columns of one size
    solution, *_ = np.linalg.lstsq(features / scale, np.asarray(temp_bytes, float), rcond=None)
    return tuple(float(x) for x in solution / scale)


# Fitted and checked by `python -m bench.train_peak` (docs/training.md, "An estimate of the full SDXL step's peak
# per chip"), at a batch of 1 per device: at 2 the compiler's temporaries grow far more than the residuals.
PEAK_LAW = PeakLaw(coefficients=(0.5139, 2.8397, -0.2882, 584843578), check_error=0.0513)


def step_parts(config: ml_collections.ConfigDict, num_devices: int, *, per_device_batch: int = 1,
               resolution: int | None = None, devices: Sequence[jax.Device] | None = None) -> StepParts:
    """The ``StepParts`` of ``config``'s training step with FSDP over ``num_devices`` of ``devices`` (as
    ``memory.lower_train_step``, which it lowers without compiling; the residuals are traced twice more on one
    device). Seconds for the tiny configs, about a minute for SDXL.

    Raises:
      ValueError: fewer than ``num_devices`` devices are available.
    """
    step = lower_train_step(config, num_devices, per_device_batch=per_device_batch, resolution=resolution,
                            devices=devices)
    return StepParts(state_bytes=step.state_bytes, batch_bytes=step.batch_bytes,
                     residual_bytes=residual_bytes_per_device(config, num_devices, per_device_batch, resolution),
                     gradient_bytes=step.gradient_bytes, block_bytes=largest_block_bytes(config))


def residual_bytes_per_device(config: ml_collections.ConfigDict, num_devices: int, per_device_batch: int = 1,
                              resolution: int | None = None, *, tiled: bool = True) -> float:
    """``saved_residual_bytes`` on each of ``num_devices`` devices: the part that grows with the batch at the
    per-device batch, the part that does not (the branches' bf16 copies of their weights) sharded as the
    weights are."""
    one, two = (saved_residual_bytes(config, b, resolution, tiled=tiled)
                for b in (per_device_batch, 2 * per_device_batch))
    fixed = max(2 * one - two, 0)
    return one - fixed + fixed / num_devices


def saved_residual_bytes(config: ml_collections.ConfigDict, batch: int, resolution: int | None = None, *,
                         tiled: bool = True) -> int:
    """Bytes the training loss saves for its backward pass (``jax.vjp`` residuals computed in the step, not its
    inputs) for ``batch`` examples of ``resolution`` px on one device, in the TPU's tiled layout
    (``tpu_tiled_bytes``; ``tiled=False``: their data alone); traced, not compiled."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.batch_size, config.train.resolution = batch, int(resolution or config.train.resolution)
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    rules = tuple(tuple(r) for r in config.mesh.rules)
    graphdef, params, frozen = nnx.eval_shape(
        lambda: split_components(training_components(config, init_rngs(0)), config))
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_spec(config, mesh, rules).items()}
    settings = StepSettings.from_config(config, [(0,) * CLIP_MAX_LENGTH] * (2 if is_sdxl(config) else 1))
    loss = functools.partial(compute_loss, graphdef=graphdef, scheduler=noise_schedule(None), settings=settings)

    def pullback(p, fixed, b, key):
        return jax.vjp(lambda p: loss(p, fixed, b, key)[0], p)[1]

    with use_mesh(mesh, rules):
        jaxpr = jax.make_jaxpr(pullback)(params["realisid"].to_pure_dict(), frozen, shapes,
                                         jax.ShapeDtypeStruct((2,), jnp.uint32)).jaxpr
    inputs = set(map(id, jaxpr.invars))
    computed = [v for v in jaxpr.outvars if hasattr(v, "aval") and id(v) not in inputs
                and type(v).__name__ != "Literal"]
    size = tpu_tiled_bytes if tiled else lambda shape, dtype: math.prod(shape) * np.dtype(dtype).itemsize
    return sum(size(v.aval.shape, v.aval.dtype) for v in computed)


def tpu_tiled_bytes(shape: Sequence[int], dtype) -> int:
    """Bytes of an array in the TPU's default tiled layout: the last dimension padded to the 128 lanes, the one
    before it to the 8 sublanes of 32-bit words (16 rows of bf16). A map of 16 channels takes 8 times its data:
    the ControlNet condition encoders' first maps (docs/training.md)."""
    itemsize = np.dtype(dtype).itemsize
    dims = [1, 1, *shape][-max(len(shape), 2):]
    rows = 8 * max(4 // itemsize, 1)
    return math.prod(dims[:-2]) * -(-dims[-2] // rows) * rows * -(-dims[-1] // 128) * 128 * itemsize


_BLOCK_LISTS = ("attentions", "resnets", "downsamplers", "upsamplers")


def largest_block_bytes(config: ml_collections.ConfigDict) -> int:
    """Float32 bytes of the largest trainable block: parameters grouped by their path up to the index in a
    block list (``down_blocks.2.attentions.0``, ``mid_block.resnets.1``), else up to the first index
    (``controlnet_down_blocks.3``), else by module."""
    _, params, _ = nnx.eval_shape(lambda: split_components(training_components(config, init_rngs(0)), config))
    sizes: dict[tuple, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params["realisid"].to_pure_dict())[0]:
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        key = tuple(keys[:_block_depth(keys)])
        sizes[key] = sizes.get(key, 0) + math.prod(leaf.shape) * 4
    return max(sizes.values())


def _block_depth(keys: list) -> int:
    listed = next((i for i, k in enumerate(keys) if k in _BLOCK_LISTS), None)
    if listed is not None and listed + 1 < len(keys):
        return listed + 2
    indexed = next((i for i, k in enumerate(keys) if isinstance(k, int) or re.fullmatch(r"\d+", str(k))), None)
    return indexed + 1 if indexed is not None else min(2, len(keys))
