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
import resource

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from realisid_jax.realisid.components import abstract_components, apply_kernel_config
from realisid_jax.realisid.pipeline import DenoiseInputs, Guidance, _decode, _denoise, _encode_ids
from realisid_jax.models.vae import VAE_SCALE_FACTOR
from realisid_jax.schedulers import get_scheduler
from realisid_jax.sharding import data_sharding, make_mesh, state_shardings, use_mesh
from realisid_jax.training.memory import compiled_figures
from realisid_jax.training.state import replicated, with_shardings

# HBM per chip by ``device_kind`` (Cloud TPU documentation); the compiler reserves a little of it
# (v5e: 15.75 of 16 GiB usable), so "fits" compares against the whole chip and says so.
CHIP_HBM_BYTES = {"TPU v4": 32 * 2**30, "TPU v5 lite": 16 * 2**30, "TPU v5": 95 * 2**30, "TPU v5p": 95 * 2**30,
                  "TPU v6 lite": 32 * 2**30}


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
    """HBM bytes of one device of a topology: its chip's (by ``device_kind``, e.g. ``"TPU v5 lite"``) divided
    among the devices on that chip (libtpu's ``v4`` topologies give each of a chip's two TensorCores its own
    device, 16 of the chip's 32 GiB)."""
    first = devices[0]
    try:
        chip = CHIP_HBM_BYTES[first.device_kind]
    except KeyError:
        raise ValueError(f"unknown TPU chip {first.device_kind!r} (known: {', '.join(CHIP_HBM_BYTES)})") from None
    return chip // sum(1 for d in devices if tuple(d.coords) == tuple(first.coords))


def host_peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclasses.dataclass(frozen=True)
class SamplePlan:
    """Per-chip figures of sampling one image (``compiled_figures`` keys) for the denoising loop and the VAE
    decode, and the chips they were compiled for (weights FSDP-sharded over them)."""

    num_devices: int
    persons: int
    height: int
    width: int
    denoise: dict
    decode: dict

    @property
    def peak_bytes(self) -> int:
        return max(self.denoise["peak_bytes"], self.decode["peak_bytes"])


def sample_plan(config: ml_collections.ConfigDict, devices: list[jax.Device], *, persons: int = 1) -> SamplePlan:
    """Compiles the pipeline's guided denoising loop (one executable for all steps: ``lax.fori_loop`` with
    traced bounds, so its memory is one step's) and the VAE decode for one image of
    ``config.sampling.height x width`` with ``persons`` person slots, weights sharded over ``devices``."""
    mesh = make_mesh((1, len(devices), 1), devices)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    s = config.sampling
    components = abstract_components(config)
    apply_kernel_config(components, config)
    graphdef, state = nnx.split(components)
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
    latents = batched((1, s.height // VAE_SCALE_FACTOR, s.width // VAE_SCALE_FACTOR,
                       config.model.unet["in_channels"]), jnp.float32)
    carry = (latents, abstract(jax.eval_shape(scheduler.init_carry, sched_state, latents)))
    dtype = jnp.dtype(config.dtype)
    context = config.model.unet["cross_attention_dim"]
    embeds = batched((1, 77, context), dtype)
    if config.model.get("text_encoder_2") is None:
        text = (embeds, embeds, None, None)
    else:
        pooled = batched((1, config.model.text_encoder_2["projection_dim"]), dtype)
        text = (embeds, embeds, pooled, pooled)
    clip = config.model.image_encoder["image_size"]
    reference = spec((persons, clip, clip, 3), jnp.float32)
    id_embedding, no_id = (abstract(x) for x in jax.eval_shape(
        lambda st, r: _encode_ids(graphdef, st, r), state, reference))
    side = VAE_SCALE_FACTOR * config.realisid.local_latent_size
    scalar = lambda dtype: spec((), dtype)  # noqa: E731
    with use_mesh(mesh, rules):
        inputs = DenoiseInputs(text, batched((1, 6), jnp.float32), id_embedding, no_id,
                               batched((1, persons, 4), jnp.float32), batched((1, persons), jnp.bool_),
                               batched((1, persons, side, side, 3), jnp.float32))
        guidance = Guidance(scalar(jnp.float32), scalar(jnp.float32), scalar(jnp.int32))
        denoise = _denoise.lower(graphdef, scheduler, state, sched_state, carry, inputs, guidance, scalar(jnp.int32),
                                 scalar(jnp.int32))
        decode = _decode.lower(graphdef, state, latents)
    return SamplePlan(num_devices=len(devices), persons=persons, height=int(s.height), width=int(s.width),
                      denoise=compiled_figures(denoise, devices), decode=compiled_figures(decode, devices))
