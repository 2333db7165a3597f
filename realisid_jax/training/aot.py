"""Plans for Cloud TPU slices, compiled ahead of time on this host by the TPU compiler itself.

``libtpu`` (the ``tpu`` extra: ``pip install 'jax[tpu]'``) compiles for a TPU topology without any TPU
attached: ``jax.experimental.topologies.get_topology_desc`` gives the devices of e.g. a v5e-8 (``"v5e:2x4"``),
a mesh over them makes ``jax.jit(...).lower(<ShapeDtypeStructs with shardings>).compile()`` the real TPU
program, and ``compiled.memory_analysis()`` / ``cost_analysis()`` are the compiler's per-chip figures (as
maxtext's ``train_compile.py`` plans runs). Only one process may load libtpu at a time unless
``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` is set (pytest-xdist workers).
"""

from __future__ import annotations

import dataclasses
import os
import re
import resource

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from realisid_jax.realisid.components import abstract_components, apply_kernel_config
from realisid_jax.realisid.pipeline import (DenoiseInputs, Guidance, _decode, _denoise, _encode_ids,
                                            cast_branches, id_start_step)
from realisid_jax.models.vae import VAE_SCALE_FACTOR
from realisid_jax.schedulers import get_scheduler
from realisid_jax.sharding import data_sharding, make_mesh, state_shardings, use_mesh
from realisid_jax.training.memory import compiled_figures
from realisid_jax.training.roofline import device_chip
from realisid_jax.training.state import replicated, with_shardings

def topology_devices(name: str) -> list[jax.Device]:
    """The devices of TPU topology ``name`` (``"v5e:2x4"``, ``"v4:2x2x1"``, ``"v5p:2x2x1"``, ``"v6e:2x2"``), for
    compiling only. One chip: the first device of the smallest topology (``"v5e:1x1"`` does not exist).

    Raises:
      ValueError: libtpu is not installed, or does not know ``name``.
    """
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask: this host is no TPU VM
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as error:  # libtpu's errors are RuntimeError / XlaRuntimeError with its own text
        raise ValueError(f"cannot compile for TPU topology {name!r} (needs the tpu extra: "
                         f"pip install 'realisid-jax[tpu]'): {str(error).splitlines()[0]}") from error


def device_hbm_bytes(devices: list[jax.Device]) -> int:
    """HBM bytes of one device of a topology (``roofline.device_chip``; the compiler reserves a little of it, v5e:
    15.75 of 16 GiB usable, so "fits" compares against the whole chip and says so)."""
    return device_chip(devices).hbm_bytes


def host_peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclasses.dataclass(frozen=True)
class SamplePlan:
    """Per-chip figures of sampling ``batch`` images (``compiled_figures`` keys, with ``roofline`` on TPU) for
    each program: ``denoise`` (a step with the ID: three predictions), ``denoise_before_id`` (a step before it:
    two; absent when the ID starts at the first step) and ``decode``
    (the VAE), weights FSDP-sharded over ``num_devices`` chips; ``steps`` steps, ``id_start`` of them without
    the ID (``pipeline.id_start_step``)."""

    num_devices: int
    persons: int
    batch: int
    height: int
    width: int
    steps: int
    id_start: int
    programs: dict

    @property
    def peak_bytes(self) -> int:
        return max(p["peak_bytes"] for p in self.programs.values())

    def per_image(self, figure) -> float:
        """``figure(program figures)`` (per chip and step, or per decode) summed over one sampling run and the
        chips, per image: the steps before the ID on ``denoise_before_id`` (``denoise`` if not planned)."""
        p = self.programs
        early = p.get("denoise_before_id", p["denoise"])
        run = (self.id_start * figure(early) + (self.steps - self.id_start) * figure(p["denoise"])
               + figure(p["decode"]))
        return run * self.num_devices / self.batch


def sample_plan(config: ml_collections.ConfigDict, devices: list[jax.Device], *, persons: int = 1,
                batch: int = 1, step_only: bool = False) -> SamplePlan:
    """Compiles the pipeline's denoising phases (each one executable for all its steps: ``lax.fori_loop`` with
    traced bounds, so its memory is one step's) and the VAE decode for ``batch`` images of
    ``config.sampling.height x width`` with ``persons`` person slots, weights sharded over ``devices``.
    ``step_only``: the step with the ID alone (the program whose activations grow with the batch; its plan has
    no per-image figures)."""
    s = config.sampling
    steps = int(s.num_inference_steps)
    id_start = id_start_step(s.id_start_fraction, steps)
    phases = ("denoise",) if id_start == 0 else ("denoise_before_id", "denoise")
    lowered = lower_sampling(config, devices, persons=persons, batch=batch)
    # The step with the ID first: its activations grow fastest with the batch, so a batch too large is refused
    # after one compile.
    names = ("denoise",) if step_only else ("denoise", *phases[:-1], "decode")
    compiled = {name: compiled_figures(lowered[name], devices) for name in names}
    programs = {name: compiled[name] for name in (*phases, "decode") if name in compiled}
    return SamplePlan(num_devices=len(devices), persons=persons, batch=batch, height=int(s.height),
                      width=int(s.width), steps=steps, id_start=id_start, programs=programs)


def lower_sampling(config: ml_collections.ConfigDict, devices: list[jax.Device], *, persons: int = 1,
                   batch: int = 1) -> dict:
    """The sampling programs of ``sample_plan``, lowered (not compiled): ``denoise`` (with the ID),
    ``denoise_before_id`` and ``decode``, each a ``jax.stages.Lowered``."""
    mesh = make_mesh((1, len(devices), 1), devices)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    s = config.sampling
    components = abstract_components(config)
    apply_kernel_config(components, config)
    graphdef, state = nnx.split(components)
    state = cast_branches(state, s.get("param_dtype") or config.dtype)
    state = with_shardings(state, state_shardings(state, mesh, rules))
    rep = replicated(mesh)

    def spec(shape, dtype, sharding=rep):
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)

    def batched(shape, dtype):
        return spec(shape, dtype, data_sharding(mesh, shape, rules))

    def abstract(tree):
        return jax.tree.map(lambda x: spec(np.shape(x), jnp.result_type(x)), tree)

    scheduler = get_scheduler(s.scheduler, None)
    sched_state = abstract(scheduler.set_timesteps(int(s.num_inference_steps)))
    latents = batched((batch, s.height // VAE_SCALE_FACTOR, s.width // VAE_SCALE_FACTOR,
                       config.model.unet["in_channels"]), jnp.float32)
    carry = (latents, abstract(jax.eval_shape(scheduler.init_carry, sched_state, latents)))
    dtype = jnp.dtype(config.dtype)
    context = config.model.unet["cross_attention_dim"]
    embeds = batched((batch, 77, context), dtype)
    if config.model.get("text_encoder_2") is None:
        text = (embeds, embeds, None, None)
    else:
        pooled = batched((batch, config.model.text_encoder_2["projection_dim"]), dtype)
        text = (embeds, embeds, pooled, pooled)
    clip = config.model.image_encoder["image_size"]
    reference = spec((persons, clip, clip, 3), jnp.float32)
    id_embedding, no_id = (abstract(x) for x in jax.eval_shape(
        lambda st, r: _encode_ids(graphdef, st, r), state, reference))
    side = VAE_SCALE_FACTOR * config.realisid.local_latent_size
    scalar = lambda dtype: spec((), dtype)  # noqa: E731
    with use_mesh(mesh, rules):
        inputs = DenoiseInputs(text, batched((batch, 6), jnp.float32), id_embedding, no_id,
                               batched((batch, persons, 4), jnp.float32), batched((batch, persons), jnp.bool_),
                               batched((batch, persons, side, side, 3), jnp.float32))
        guidance = Guidance(scalar(jnp.float32), scalar(jnp.float32))
        lowered = {name: _denoise.lower(graphdef, scheduler, state, sched_state, carry, inputs, guidance,
                                        scalar(jnp.int32), scalar(jnp.int32), with_id=with_id)
                   for name, with_id in (("denoise_before_id", False), ("denoise", True))}
        lowered["decode"] = _decode.lower(graphdef, state, latents)
    return lowered


def _refused_temporaries(message: str) -> float | None:
    """The bytes of "HLO temporaries (18.47G) exceeds available HBM" in the TPU compiler's refusal, if stated."""
    found = re.search(r"temporaries \(([\d.]+)([KMG])\)", message)
    return None if found is None else float(found[1]) * 1024 ** ("KMG".index(found[2]) + 1)


def max_batch(config: ml_collections.ConfigDict, devices: list[jax.Device], *, persons: int = 1,
              on_plan=None) -> tuple[int, SamplePlan | None]:
    """The largest batch of images that samples on ``devices`` (TPU; every program of ``sample_plan``), found by
    compiling. The search compiles the step with the ID alone (``step_only``: the decode goes one image at a
    time, and the step before the ID runs fewer predictions): batches 1 and 2, then where the line through batch
    1 and the largest fitting batch meets the chip's HBM; once a batch is refused, where the chord between the
    two meets it (the refused peak from the compiler's "HLO temporaries (18.47G) exceeds available HBM" and the
    arguments of the last fitting batch; halfway if the message has no figure), until the batch that fits has a refused
    batch one image above it; then every program at that batch (one image fewer while one of them does not fit).
    ``on_plan(batch, plan or None)`` sees each compile (None: refused). Returns (batch, its plan); (0, None) if
    one image does not fit."""
    hbm = device_hbm_bytes(devices)
    peaks: dict[int, float | None] = {}  # the step's peak per batch; None: refused with no figure
    arguments = [0]  # the step's argument bytes at the last batch that compiled

    def plan_of(batch: int, step_only: bool) -> SamplePlan | None:
        refused = None
        try:
            plan = sample_plan(config, devices, persons=persons, batch=batch, step_only=step_only)
        except Exception as error:  # noqa: BLE001 - libtpu's XlaRuntimeError; anything else is re-raised
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            plan, refused = None, _refused_temporaries(str(error))
        if step_only:
            if plan is not None:
                arguments[0] = plan.programs["denoise"]["argument_bytes"]
            peaks[batch] = plan.peak_bytes if plan else None if refused is None else refused + arguments[0]
        plan = plan if plan is not None and plan.peak_bytes <= hbm else None
        if on_plan:
            on_plan(batch, plan)
        return plan

    if plan_of(1, step_only=True) is None:
        return 0, None
    lo, hi = 1, None  # lo fits, hi was refused
    while hi is None or hi - lo > 1:
        if hi is None:
            slope = (peaks[lo] - peaks[1]) / (lo - 1) if lo > 1 else None
            guess = 2 if slope is None else lo + max(1, int((hbm - peaks[lo]) // max(slope, 1)))
        elif peaks[hi] is None:
            guess = (lo + hi) // 2
        else:
            guess = lo + int((hbm - peaks[lo]) * (hi - lo) // (peaks[hi] - peaks[lo]))
        guess = min(max(guess, lo + 1), hi - 1) if hi is not None else guess
        if plan_of(guess, step_only=True) is not None:
            lo = guess
        else:
            hi = guess
    while lo > 0:
        plan = plan_of(lo, step_only=False)
        if plan is not None:
            return lo, plan
        lo -= 1
    return 0, None
