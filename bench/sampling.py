"""Guided sampling (paper Eq. 8: two predictions per step before the ID starts, three after): the pipeline's
jitted denoising phases (``pipeline.denoise``) and a
PyTorch loop doing the same work (DDIM, same timesteps, same guidance, same branch batch)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import torch

from flax import nnx

from bench.models import Models, torch_residuals
from realisid_jax.realisid import pipeline
from realisid_jax.realisid.components import Components
from realisid_jax.schedulers import get_scheduler

TEXT_SCALE, ID_SCALE, ID_START_FRACTION = 7.5, 5.0, 0.2


@dataclasses.dataclass
class SamplingInputs:
    """Host inputs of one guided sampling call: ``num_images`` images, K persons, ``steps`` DDIM steps."""

    latents: np.ndarray        # (n, h, w, 4)
    text: tuple                # (prompt (n, 77, D), negative (n, 77, D), pooled | None, negative pooled | None)
    time_ids: np.ndarray       # (n, 6)
    id_embedding: np.ndarray   # (K, Q, D)
    no_id: np.ndarray          # (K, Q, D)
    boxes: np.ndarray          # (n, K, 4)
    valid: np.ndarray          # (n, K)
    landmark_images: np.ndarray  # (n, K, 8S, 8S, 3)
    steps: int


def make_sampling_inputs(config, step_inputs: dict, steps: int, seed: int = 0) -> SamplingInputs:
    """From ``bench.models.make_inputs`` (its batch is the number of images)."""
    rng = np.random.default_rng(seed + 1)
    n = step_inputs["sample"].shape[0]
    context = step_inputs["context"]
    added = step_inputs["added"]
    pooled = None if added is None else added["text_embeds"]
    negative_pooled = None if added is None else rng.standard_normal(pooled.shape, np.float32)
    size = int(config.sampling.height)
    return SamplingInputs(
        latents=step_inputs["sample"],
        text=(context, rng.standard_normal(context.shape, np.float32), pooled, negative_pooled),
        time_ids=np.tile(np.array([[size, size, 0, 0, size, size]], np.float32), (n, 1)),
        id_embedding=step_inputs["p_id"][0], no_id=rng.standard_normal(step_inputs["p_id"][0].shape, np.float32),
        boxes=step_inputs["boxes"], valid=step_inputs["valid"], landmark_images=step_inputs["landmark_images"],
        steps=steps)


def jax_sampler(models: Models, inputs: SamplingInputs):
    """A no-argument callable running ``pipeline._denoise`` to the final latents (blocks), and the callable's
    jitted function (for ``_cache_size``)."""
    scheduler = get_scheduler("ddim", None)
    sched_state = scheduler.set_timesteps(inputs.steps)
    start = int(np.floor(ID_START_FRACTION * inputs.steps))
    # ``_denoise`` reads the UNet and the branches of a ``Components`` container; nothing else runs in the loop.
    components = Components(unet=nnx.merge(models.unet_def, models.unet_state), vae=None, text_encoder=None,
                            text_encoder_2=None, image_encoder=None,
                            realisid=nnx.merge(models.realisid_def, models.realisid_state))
    graphdef, model_state = nnx.split(components)
    args = jax.tree.map(jnp.asarray, (inputs.latents, inputs.text, inputs.time_ids, inputs.id_embedding,
                                      inputs.no_id, inputs.boxes, inputs.valid, inputs.landmark_images))

    def run(latents=None, text=None, boxes=None):
        a = list(args)
        for i, value in ((0, latents), (1, text), (5, boxes)):
            if value is not None:
                a[i] = jax.tree.map(jnp.asarray, value)
        carry = (a[0], scheduler.init_carry(sched_state, a[0]))
        guidance = pipeline.Guidance(jnp.float32(TEXT_SCALE), jnp.float32(ID_SCALE))
        out = pipeline.denoise(graphdef, scheduler, model_state, sched_state, carry, pipeline.DenoiseInputs(*a[1:]),
                               guidance, start)
        return out[0].block_until_ready()

    return run, pipeline._denoise


def _torch_text(inputs: SamplingInputs, t) -> dict:
    """The UNet's text conditions of the 2N batch (ε_none, ε_t) and the 3N batch (ε_none, ε_t, ε_t&i), keyed by
    2 and 3: (context (kN, 77, D), added conditions {text_embeds (kN, P), time_ids (kN, 6)} | None), made once
    with ``t`` (numpy to a tensor on the sampler's device)."""
    prompt, negative, pooled, negative_pooled = (t(x) for x in inputs.text)
    text = {}
    for k in (2, 3):
        added = None
        if pooled is not None:
            added = {"text_embeds": torch.cat([negative_pooled] + [pooled] * (k - 1)),
                     "time_ids": t(inputs.time_ids).repeat(k, 1)}
        text[k] = torch.cat([negative] + [prompt] * (k - 1)), added
    return text


def torch_sampler(models: Models, inputs: SamplingInputs, device: str = "cpu", dtype=torch.float32):
    """The same loop in PyTorch: branches and UNet on the 2N batch (ε_none, ε_t) of the steps before the ID starts
    and the 3N batch of the others, DDIM (eta 0) update. A no-argument callable returning the final (N, 4, h, w)
    float32 latents on ``device`` (where the models must already be); the networks run under ``dtype`` autocast
    (none for float32, ``bench.run``'s parity setting)."""
    state = get_scheduler("ddim", None).set_timesteps(inputs.steps)
    timesteps = np.asarray(state.timesteps)
    a_t, a_prev = np.asarray(state.alpha_prod_t), np.asarray(state.alpha_prod_t_prev)
    start = int(np.floor(ID_START_FRACTION * inputs.steps))
    t = lambda x: None if x is None else torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
    latents = t(inputs.latents).permute(0, 3, 1, 2).contiguous()
    n = latents.shape[0]
    text = _torch_text(inputs, t)
    id_embedding, no_id = (t(x).expand(n, *x.shape) for x in (inputs.id_embedding, inputs.no_id))
    boxes, valid, marks = t(inputs.boxes), t(inputs.valid), t(inputs.landmark_images)

    def guided_eps(x, i, step_t):  # Eq. 8's guided ε (N, 4, h, w) of step i
        k = 3 if i >= start else 2
        context, added = text[k]
        # As the JAX loop: on SD 1.5 (no added conditions) ε_none and ε_t share one branch pass.
        ids = [no_id] * (1 if added is None else 2) + [id_embedding] * (k - 2)
        m = len(ids)
        down, mid = torch_residuals(models, torch.cat([x] * m), step_t, torch.cat(ids), torch.cat([boxes] * m),
                                    torch.cat([valid] * m), torch.cat([marks] * m), added)
        # In the compute dtype, as JAX's: torch_residuals' float32 person average would otherwise carry float32
        # into every skip connection of the UNet.
        down, mid = [r.to(dtype) for r in down], mid.to(dtype)
        if m < k:
            down, mid = [torch.cat([r[:n], r]) for r in down], torch.cat([mid[:n], mid])
        e = models.torch_unet(torch.cat([x] * k), step_t, context, added_cond_kwargs=added,
                              down_block_additional_residuals=down, mid_block_additional_residual=mid,
                              return_dict=False)[0]
        e_none, e_text = e[:n], e[n:2 * n]
        eps = e_none + TEXT_SCALE * (e_text - e_none)
        return eps + ID_SCALE * (e[2 * n:] - e_text) if k == 3 else eps

    @torch.inference_mode()
    def run():
        # The default device: torch_residuals makes its constants with factory functions.
        with torch.device(device), torch.autocast(torch.device(device).type, dtype, enabled=dtype != torch.float32):
            x = latents
            for i, step_t in enumerate(timesteps):
                eps = guided_eps(x, i, int(step_t))
                x0 = (x - (1 - a_t[i]) ** 0.5 * eps) / a_t[i] ** 0.5
                x = a_prev[i] ** 0.5 * x0 + (1 - a_prev[i]) ** 0.5 * eps
            return x

    return run
