"""The glyph world's base text-to-image model: the SDXL-architecture UNet of ``config.model.unet`` trained from
scratch on world scenes (random identities, no identity conditioning), and a DDIM sampler to check it.

Training is SDXL's (diffusers ``train_text_to_image_sdxl.py``) but for the noise schedule: SDXL's scaled-linear
betas (0.00085..0.012, 1000 steps) rescaled to zero terminal SNR, with v-prediction and trailing timesteps
(:data:`SCHEDULER_CONFIG`; Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"). A
world scene is mostly its flat background, and SDXL's own schedule leaves enough of that colour in the last
timestep's noisy latent (its mean over 32x32 cells) that an epsilon-predicting UNet reads the background from the
noise instead of from the caption, then samples a random background from pure noise. Latents are
``vae posterior sample * scaling_factor``, the caption encoded by
both text towers (``encode_prompt_sdxl``: context and pooled embeddings), micro-conditioning time ids
``(256, 256, 0, 0, 256, 256)``, captions dropped to the empty prompt (``config.realisid.no_text``'s
``"empty_prompt"``) so that classifier-free guidance works. The text towers stay random and frozen; the UNet
learns to read them. The VAE posteriors and caption embeddings of a fixed pool of scenes are computed once, so a
step is the UNet's forward and backward pass alone.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from transformers import CLIPTokenizer

from realisid_jax.glyphs import world
from realisid_jax.glyphs.autoencoder import render_scenes, to_model_range
from realisid_jax.glyphs.fitting import fit, init_state
from realisid_jax.models.layers import set_conv_impl
from realisid_jax.models.registry import dtypes, frozen_configs
from realisid_jax.models.unet_2d_condition import UNet2DConditionModel
from realisid_jax.models.vae import AutoencoderKL
from realisid_jax.schedulers import get_scheduler
from realisid_jax.schedulers.common import SDXL_SCHEDULER_CONFIG
from realisid_jax.schedulers.ddpm import DDPMScheduler
from realisid_jax.text.prompt_encoding import TextEncoder, encode_prompt_sdxl

SCENE_SIZE = 256
# The base model's noise schedule (module docstring), written to its pipeline folder's scheduler/ so that
# `realisid train` and `realisid sample` use it as they use any base's.
SCHEDULER_CONFIG = {**SDXL_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                    "timestep_spacing": "trailing"}


def build_unet(config: ml_collections.ConfigDict, seed: int = 0) -> UNet2DConditionModel:
    """A randomly initialised UNet of ``config.model.unet`` with the config's dtypes and kernels."""
    cls, cfg = frozen_configs(config)["unet"]
    unet = cls(cfg, rngs=nnx.Rngs(seed), **dtypes(config))
    set_conv_impl(unet, config.conv_impl)
    return unet


def random_text_encoders(config: ml_collections.ConfigDict, seed: int = 0) -> tuple[TextEncoder, TextEncoder]:
    """The two random CLIP text towers of ``config.model`` (``text_encoder``, ``text_encoder_2``), frozen as built."""
    rngs = nnx.Rngs(seed)
    return tuple(cls(cfg, rngs=rngs, **dtypes(config))
                 for name, (cls, cfg) in frozen_configs(config).items() if name.startswith("text_encoder"))


def time_ids(count: int, height: int = SCENE_SIZE, width: int = SCENE_SIZE) -> jax.Array:
    """SDXL micro-conditioning of a whole, uncropped image: (count, 6) float32 ``(height, width, 0, 0, height,
    width)`` (original size, crop top-left, target size)."""
    return jnp.tile(jnp.array([[height, width, 0, 0, height, width]], jnp.float32), (count, 1))


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell: 2 ** (number of VAE levels - 1) (8 for SDXL's and the glyph world's)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ------------------------------------------------------------------------------------------------ the scene pool
@dataclasses.dataclass(frozen=True)
class ScenePool:
    """Precomputed training inputs of ``len(caption_index)`` scenes.

    Attributes:
      latent_mean, latent_std: float32 (N, 32, 32, 4), the VAE posterior of each scene (unscaled).
      caption_index: int32 (N,), row of each scene's caption in ``prompt_embeds``.
      prompt_embeds: float32 (C + 1, 77, D) of the distinct captions, the empty prompt last (row ``C``).
      pooled_embeds: float32 (C + 1, P).
      captions: the C distinct captions, then ``""``.
    """

    latent_mean: np.ndarray
    latent_std: np.ndarray
    caption_index: np.ndarray
    prompt_embeds: np.ndarray
    pooled_embeds: np.ndarray
    captions: tuple[str, ...]

    def arrays(self) -> dict[str, jax.Array]:
        """The arrays the train step reads, on the device."""
        names = ("latent_mean", "latent_std", "caption_index", "prompt_embeds", "pooled_embeds")
        return {name: jnp.asarray(getattr(self, name)) for name in names}


@functools.partial(jax.jit, static_argnums=0)
def _posterior(graphdef, state, images):
    posterior = nnx.merge(graphdef, state).encode(images)
    return posterior.mean, posterior.std


def rendered_batches(seed: int, count: int, batch_size: int = 16) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Scenes ``world.scene(seed, i)``, i < count (1 and 2 persons alternating, random identities), as batches of
    (float32 (B, 256, 256, 3) in [-1, 1], captions)."""
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        images = render_scenes(seed, n, start=start)
        captions = [world.scene(seed, i, num_persons=1 + i % 2).caption for i in range(start, start + n)]
        yield np.asarray(to_model_range(images)), captions


def dataset_batches(data: str | os.PathLike, count: int, batch_size: int = 16) -> Iterator[tuple[np.ndarray, list[str]]]:
    """``count`` examples of a prepared dataset (``glyphs.dataset``; the project's input pipeline, one seeded
    pass) as batches of (``pixel_values`` float32 (B, R, R, 3) in [-1, 1], captions).

    Raises:
      ValueError: the dataset holds fewer than ``count`` examples.
    """
    from realisid_jax.data.input_pipeline import make_train_iterator

    batches = make_train_iterator(data, batch_size=1, seed=0, shard_index=0, shard_count=1, num_epochs=1,
                                  read_threads=2)
    images, captions = [], []
    for batch in batches:
        images.append(batch["pixel_values"][0])
        captions += batch["input_text"]
        if len(images) == batch_size or len(captions) == count:
            yield np.stack(images), captions[-len(images):]
            images = []
        if len(captions) == count:
            return
    raise ValueError(f"{data} holds {len(captions)} examples, fewer than the {count} the pool needs")


def prepare_pool(vae: AutoencoderKL, text_encoders: Sequence[TextEncoder], tokenizers: Sequence[CLIPTokenizer],
                 batches: Iterable[tuple[np.ndarray, list[str]]]) -> ScenePool:
    """The VAE posteriors and caption embeddings (plus the empty prompt's) of the scenes of ``batches``
    (``dataset_batches`` or ``rendered_batches``)."""
    graphdef, state = nnx.split(vae)
    means, stds, captions = [], [], []
    for images, names in batches:
        mean, std = _posterior(graphdef, state, jnp.asarray(images))
        means.append(np.asarray(mean))
        stds.append(np.asarray(std))
        captions += list(names)
    distinct = tuple(sorted(set(captions))) + ("",)
    text = encode_prompt_sdxl(list(distinct), tokenizers, text_encoders, do_classifier_free_guidance=False)
    index = np.array([distinct.index(c) for c in captions], np.int32)
    return ScenePool(np.concatenate(means), np.concatenate(stds), index, np.asarray(text.prompt_embeds),
                     np.asarray(text.pooled_prompt_embeds), distinct)


# ------------------------------------------------------------------------------------------------ training
def noise_schedule() -> DDPMScheduler:
    """The base model's training noise schedule (:data:`SCHEDULER_CONFIG`): zero terminal SNR, v-prediction."""
    return DDPMScheduler.from_config(SCHEDULER_CONFIG)


def diffusion_loss(unet: UNet2DConditionModel, pool: dict[str, jax.Array], key: jax.Array, *, batch_size: int,
                   scaling_factor: float, caption_dropout: float,
                   schedule: DDPMScheduler) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The prediction-target MSE (``schedule.prediction_type``) on a random batch of the pool
    (``ScenePool.arrays``).

    Draws scenes (256 px, hence the time ids), a posterior sample of each (times ``scaling_factor``), timesteps
    uniform in [0, 1000), noise, and replaces each caption by the empty prompt with probability
    ``caption_dropout``.

    Returns:
      ``(loss, {})``: scalar float32 loss.
    """
    k_index, k_latent, k_drop, k_time, k_noise = jax.random.split(key, 5)
    index = jax.random.randint(k_index, (batch_size,), 0, pool["caption_index"].shape[0])
    mean, std = pool["latent_mean"][index], pool["latent_std"][index]
    latents = (mean + std * jax.random.normal(k_latent, mean.shape)) * scaling_factor
    empty = pool["prompt_embeds"].shape[0] - 1
    caption = jnp.where(jax.random.bernoulli(k_drop, caption_dropout, (batch_size,)), empty,
                        pool["caption_index"][index])
    timesteps = schedule.sample_timesteps(k_time, batch_size)
    noise = jax.random.normal(k_noise, latents.shape)
    added = {"text_embeds": pool["pooled_embeds"][caption], "time_ids": time_ids(batch_size)}
    prediction = unet(schedule.add_noise(latents, noise, timesteps), timesteps, pool["prompt_embeds"][caption],
                      added_cond_kwargs=added)
    target = schedule.training_target(latents, noise, timesteps)
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target)), {}


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, **loss_kw):
    """The jitted step ``(state, pool) -> (state, metrics)`` over ``{"step", "params", "opt_state", "rng"}``; the
    batch is drawn inside from ``fold_in(rng, step)``, so a resumed run continues exactly. ``loss_kw``: the
    keywords of :func:`diffusion_loss` but ``key``."""

    def loss_fn(params, pool, key):
        return diffusion_loss(nnx.merge(graphdef, params), pool, key, **loss_kw)

    @jax.jit
    def step(state, pool):
        key = jax.random.fold_in(state["rng"], state["step"])
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], pool, key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "opt_state": opt_state, "rng": state["rng"]}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

    return step


def train_unet(config: ml_collections.ConfigDict, vae: AutoencoderKL, text_encoders: Sequence[TextEncoder],
               tokenizers: Sequence[CLIPTokenizer], *, seed: int, num_steps: int, batch_size: int,
               workdir: str | Path, learning_rate: float = 5e-4, warmup_steps: int = 100, pool_size: int = 512,
               caption_dropout: float = 0.1, checkpoint_every: int = 250, data: str | os.PathLike | None = None,
               progress: bool = True) -> tuple[UNet2DConditionModel, dict]:
    """Trains the UNet of ``config.model.unet`` from scratch as a text-to-image model of world scenes (module
    docstring), with AdamW (linear warm-up, then constant, so that a run continued to more steps equals a longer
    run) and gradient clipping at norm 1.

    Resumes from ``workdir/checkpoints`` (a finished run returns at once); checkpoints every
    ``checkpoint_every`` steps and at the end. The scene pool is stored in ``workdir/pool.npz`` and reused.

    Args:
      vae: the trained VAE; its ``config.scaling_factor`` scales the latents.
      text_encoders, tokenizers: SDXL's two of each (frozen).
      seed: of the scene pool, the initial weights and every random draw of the steps.
      data: a prepared world dataset (``glyphs.dataset``, read through the project's input pipeline): the pool is
        its first ``pool_size`` examples; None renders the pool's scenes directly.
      pool_size: scenes whose latents and captions are precomputed; about 0.3 s a scene on 2 shared CPU cores
        (rendering + encoding at 256 px; 512 scenes took 2.5 min).

    Returns:
      ``(unet, metrics)``: metrics has ``losses`` (per step run by this call), ``start_step``, ``seconds``.

    Raises:
      loop.NonFiniteLossError: the loss diverged.
    """
    pool = _cached_pool(Path(workdir) / "pool.npz", vae, text_encoders, tokenizers, seed=seed, count=pool_size,
                        data=data)
    unet = build_unet(config, seed)
    graphdef, params = nnx.split(unet)
    schedule = optax.linear_schedule(learning_rate / warmup_steps, learning_rate, warmup_steps)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-2))
    step_fn = make_train_step(graphdef, optimizer, batch_size=batch_size, scaling_factor=vae.scaling_factor,
                              caption_dropout=caption_dropout, schedule=noise_schedule())
    meta = dict(seed=seed, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=warmup_steps,
                pool_size=pool_size, caption_dropout=caption_dropout, scaling_factor=vae.scaling_factor)
    arrays = pool.arrays()
    state, metrics = fit(step_fn, init_state(params, optimizer, seed), lambda step: arrays, num_steps=num_steps,
                         workdir=workdir, checkpoint_every=checkpoint_every, learning_rate=schedule, meta=meta,
                         progress=progress)
    return nnx.merge(graphdef, state["params"]), metrics


def _cached_pool(path: Path, vae, text_encoders, tokenizers, *, seed: int, count: int,
                 data: str | os.PathLike | None) -> ScenePool:
    """``prepare_pool``'s result, read from ``path`` when it was written for the same seed and count; scenes from
    the dataset ``data`` when given, else rendered."""
    if path.is_file():
        with np.load(path) as stored:
            if int(stored["seed"]) == seed and len(stored["caption_index"]) == count:
                fields = {f.name: stored[f.name] for f in dataclasses.fields(ScenePool) if f.name != "captions"}
                return ScenePool(**fields, captions=tuple(str(c) for c in stored["captions"]))
    batches = dataset_batches(data, count) if data is not None else rendered_batches(seed, count)
    pool = prepare_pool(vae, text_encoders, tokenizers, batches)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, seed=seed, **{k: np.asarray(v) for k, v in dataclasses.asdict(pool).items()})
    return pool


# ------------------------------------------------------------------------------------------------ sampling
@functools.partial(jax.jit, static_argnames=("graphdefs", "scheduler"))
def _sample(graphdefs, states, scheduler, sched_state, latents, context, pooled, guidance_scale):
    """DDIM with classifier-free guidance (unconditional rows first in ``context`` / ``pooled``), then decoding
    to uint8 as diffusers' ``VaeImageProcessor.postprocess``."""
    unet, vae = (nnx.merge(g, s) for g, s in zip(graphdefs, states))
    n = latents.shape[0]
    factor = vae_scale_factor(vae)
    added = {"text_embeds": pooled, "time_ids": time_ids(2 * n, factor * latents.shape[1], factor * latents.shape[2])}

    def body(i, carry):
        x, scheduler_carry = carry
        x_in = scheduler.scale_model_input(sched_state, x, i)
        eps = unet(jnp.concatenate([x_in, x_in]), sched_state.timesteps[i], context, added_cond_kwargs=added)
        e_none, e_text = jnp.split(eps, 2)
        return scheduler.step(sched_state, e_none + guidance_scale * (e_text - e_none), i, x, scheduler_carry)

    carry = (latents * sched_state.init_noise_sigma, scheduler.init_carry(sched_state, latents))
    latents, _ = jax.lax.fori_loop(0, sched_state.num_inference_steps, body, carry)
    image = vae.decode(latents / vae.scaling_factor + vae.shift_factor)
    return jnp.round(jnp.clip(image / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)


def generate(config: ml_collections.ConfigDict, unet: UNet2DConditionModel, vae: AutoencoderKL,
             text_encoders: Sequence[TextEncoder], tokenizers: Sequence[CLIPTokenizer], captions: Sequence[str], *,
             seed: int, num_inference_steps: int = 20, guidance_scale: float = 5.0) -> np.ndarray:
    """Samples one image per caption: DDIM (:data:`SCHEDULER_CONFIG`), classifier-free guidance against the empty
    prompt (what training's caption dropout used), one jitted loop.

    Args:
      captions: N prompts, e.g. ``"a glyph on a teal background"``.
      seed: of the initial latent noise (N, h, w, 4), h x w = ``config.sampling`` height x width / 8 (the VAE's
        factor).

    Returns:
      uint8 (N, height, width, 3).
    """
    text = encode_prompt_sdxl(list(captions), tokenizers, text_encoders, negative_prompt="")
    context = jnp.concatenate([text.negative_prompt_embeds, text.prompt_embeds])
    pooled = jnp.concatenate([text.negative_pooled_prompt_embeds, text.pooled_prompt_embeds])
    scheduler = get_scheduler("ddim", SCHEDULER_CONFIG)
    factor = vae_scale_factor(vae)
    shape = (len(captions), config.sampling.height // factor, config.sampling.width // factor, unet.config.in_channels)
    latents = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    graphdefs, states = zip(*(nnx.split(m) for m in (unet, vae)))
    images = _sample(graphdefs, states, scheduler, scheduler.set_timesteps(num_inference_steps), latents, context,
                     pooled, jnp.float32(guidance_scale))
    return np.asarray(images)


# ------------------------------------------------------------------------------------------------ checking
def border_backgrounds(images: np.ndarray, *, border: int = 8) -> list[str]:
    """The background name of each image: the ``world.BACKGROUNDS`` colour nearest (RGB distance) to the
    per-channel median of the ``border`` px frame (the median ignores a glyph that touches the edge).

    Args:
      images: uint8 (N, H, W, 3).
    """
    frame = np.ones(images.shape[1:3], bool)
    frame[border:-border, border:-border] = False
    medians = np.median(images[:, frame].astype(np.float32), axis=1)  # (N, 3)
    names = list(world.BACKGROUNDS)
    palette = np.array([world.BACKGROUNDS[n] for n in names], np.float32)
    nearest = np.argmin(np.linalg.norm(medians[:, None] - palette[None], axis=-1), axis=1)
    return [names[i] for i in nearest]


def background_accuracy(images: np.ndarray, names: Sequence[str], *, border: int = 8) -> float:
    """Fraction of images whose border colour (:func:`border_backgrounds`) is the named background.

    Raises:
      ValueError: ``names`` does not have one entry per image.
    """
    if len(names) != len(images):
        raise ValueError(f"{len(names)} background names for {len(images)} images")
    return float(np.mean([a == b for a, b in zip(border_backgrounds(images, border=border), names)]))
