"""The jitted training step: frozen encoders, RealisID's branches, the frozen UNet, Eq. 7, AdamW.

Only the branch parameters (``nnx.Param`` of the ``RealisID`` module: both ControlNets and the ID projection)
are differentiated. The frozen models' state and the branches' non-parameter state are a non-donated input;
the train state (parameters, optimiser state, step, RNG key) is donated and comes back updated.

A batch carrying the precomputed inputs (``data.precomputed``: ``train.precomputed_inputs``) skips the frozen
encoders: the latent is sampled from the stored VAE moments, the stored embeddings are used as they are.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from realisid_jax.data.precompute import image_features, text_embeddings
from realisid_jax.data.precomputed import EMPTY_FIELDS, PrecomputedInputsError, batch_fields
from realisid_jax.models.vae import AutoencoderKLConfig, DiagonalGaussianDistribution
from realisid_jax.text.prompt_encoding import no_text_setting
from realisid_jax.schedulers import DDPMScheduler
from realisid_jax.realisid.objective import condition_dropout, face_masks, face_weighted_loss
from realisid_jax.training.state import TrainState

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static (hashable) inputs of the step, from ``config.train``.

    ``empty_ids``: per text encoder, the (77,) token ids of the empty prompt; ``no_text``: what a text-dropped
    row gets, ``config.realisid.no_text`` (``"empty_prompt"`` encodes them, ``"zeros"`` zeros the embeddings).
    ``precomputed_fields``: the fields a precomputed batch carries (``data.precomputed.batch_fields``);
    ``latent_shift`` / ``latent_scale``: the VAE's ``shift_factor`` / ``scaling_factor`` (``config.model.vae``)
    applied to latents sampled from stored moments.
    """

    face_loss_weight: float
    drop_id_prob: float
    drop_text_prob: float
    drop_both_prob: float
    empty_ids: tuple[tuple[int, ...], ...]
    no_text: str
    precomputed_fields: tuple[str, ...] = ()
    latent_shift: float = 0.0
    latent_scale: float = 1.0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, empty_ids) -> StepSettings:
        t = config.train
        vae = AutoencoderKLConfig.from_dict(dict(config.model.vae))
        no_text = no_text_setting(config)
        return cls(float(t.face_loss_weight), float(t.drop_id_prob), float(t.drop_text_prob),
                   float(t.drop_both_prob), tuple(tuple(int(i) for i in ids) for ids in empty_ids), no_text,
                   tuple(batch_fields(config, no_text)), float(vae.shift_factor or 0.0), float(vae.scaling_factor))


def text_conditioning(models, input_ids: list[jax.Array], no_text: jax.Array, settings: StepSettings):
    """Prompt embeddings (B, 77, D) and, for SDXL, the pooled embedding (B, P) (``None`` for SD 1.5); rows with
    ``no_text`` (B,) bool get "no text" as ``settings.no_text`` defines it (the paper's text dropout), the same
    arrays as sampling's ε_none with an empty negative prompt (``RealisIDPipeline.encode_prompt``)."""
    if settings.no_text == "empty_prompt":
        input_ids = [jnp.where(no_text[:, None], jnp.asarray(empty, jnp.int32)[None, :], batch_ids)
                     for batch_ids, empty in zip(input_ids, settings.empty_ids, strict=True)]
    embeds, pooled = text_embeddings(models, input_ids)
    if settings.no_text == "zeros":
        embeds, pooled = _without_text(embeds, pooled, no_text, jnp.zeros_like(embeds[0]),
                                       None if pooled is None else jnp.zeros_like(pooled[0]))
    return embeds, pooled


def _without_text(embeds, pooled, no_text, empty_embeds, empty_pooled):
    """Rows with ``no_text`` (B,) replaced by the "no text" embeddings (broadcast against (B, 77, D) / (B, P))."""
    embeds = jnp.where(no_text[:, None, None], empty_embeds, embeds)
    return embeds, None if pooled is None else jnp.where(no_text[:, None], empty_pooled, pooled)


def uses_precomputed(batch: Batch, models, settings: StepSettings) -> bool:
    """Whether ``batch`` carries the precomputed inputs (all of ``settings.precomputed_fields``) rather than the
    raw ones, which need the frozen encoders ``models`` may lack.

    Raises:
      PrecomputedInputsError: some but not all precomputed fields, or none while ``models`` has no encoders
        (naming the missing fields).
    """
    present = [name for name in settings.precomputed_fields if name in batch]
    missing = [name for name in settings.precomputed_fields if name not in batch]
    if present and missing:
        raise PrecomputedInputsError(f"the batch has precomputed {', '.join(present)} but not {', '.join(missing)}")
    if not present and models.vae is None:
        raise PrecomputedInputsError(f"the step's components hold no VAE / text / image encoder "
                                     f"(train.precomputed_inputs=True), but the batch lacks the precomputed "
                                     f"{', '.join(missing)}")
    return bool(present)


def precomputed_conditioning(batch: Batch, no_text: jax.Array, settings: StepSettings):
    """The stored conditioning of a precomputed batch: ``(posterior, prompt_embeds, pooled, image_features)``,
    text-dropped rows (``no_text`` (B,) bool) replaced by the stored empty prompt's embeddings
    (``"empty_prompt"``) or zeros, as ``text_conditioning`` does for raw batches."""
    posterior = DiagonalGaussianDistribution(mean=batch["latent_mean"], logvar=batch["latent_logvar"])
    embeds, pooled = batch["prompt_embeds"], batch.get("pooled_prompt_embeds")
    if settings.no_text == "empty_prompt":
        empty = [batch.get(EMPTY_FIELDS[name]) for name in ("prompt_embeds", "pooled_prompt_embeds")]
    else:
        empty = [jnp.zeros_like(embeds[0]), None if pooled is None else jnp.zeros_like(pooled[0])]
    embeds, pooled = _without_text(embeds, pooled, no_text, *empty)
    return posterior, embeds, pooled, batch["image_features"]


def compute_loss(params: dict, frozen_state: nnx.State, batch: Batch, key: jax.Array, *, graphdef: nnx.GraphDef,
                 scheduler: DDPMScheduler, settings: StepSettings) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eq. 7 on one batch: returns ``(loss, {"mse", "face_loss"})``.

    ``params``: the branch parameters (pure dict); ``frozen_state`` every other variable of the ``Components``
    container ``graphdef`` describes (merged once, here). ``batch``: ``pixel_values`` (B, R, R, 3) in [-1, 1];
    ``input_ids`` (and ``input_ids_2`` for SDXL) (B, 77) int32; ``face_box`` (B, 4) normalised;
    ``landmark_image`` (B, P, P, 3) in [0, 1] (P = the local branch's pixel size); ``reference`` (B, S, S, 3)
    CLIP-normalised; for SDXL ``time_ids`` (B, 6) float32, each photo's micro-conditioning
    ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` (``training.batches.host_batch``).
    A precomputed batch has ``settings.precomputed_fields`` (``data.precomputed``) instead of ``pixel_values``,
    the token ids and ``reference``; the same ``key`` draws the same latent noise, timesteps and dropout.

    Raises:
      PrecomputedInputsError: (at trace time) a batch with only some precomputed fields, or a raw batch for
        components without the frozen encoders.
    """
    models = nnx.merge(graphdef, {"realisid": params}, frozen_state)
    realisid = models.realisid
    k_vae, k_noise, k_t, k_drop = jax.random.split(key, 4)
    b = batch["face_box"].shape[0]
    no_id, no_text = condition_dropout(k_drop, b, settings.drop_id_prob, settings.drop_text_prob,
                                       settings.drop_both_prob)

    if uses_precomputed(batch, models, settings):
        posterior, prompt_embeds, pooled, features = precomputed_conditioning(batch, no_text, settings)
        latents = (posterior.sample(k_vae) - settings.latent_shift) * settings.latent_scale
    else:
        vae = models.vae
        latents = vae.encode(batch["pixel_values"]).sample(k_vae)
        latents = (latents - vae.shift_factor) * vae.scaling_factor
        ids = [batch["input_ids"]] + ([batch["input_ids_2"]] if models.text_encoder_2 is not None else [])
        prompt_embeds, pooled = text_conditioning(models, ids, no_text, settings)
        features = image_features(models, batch["reference"])
    added = None if pooled is None else {"text_embeds": pooled, "time_ids": batch["time_ids"]}
    features = jnp.where(no_id[:, None, None], jnp.zeros_like(features), features)
    p_id = realisid.encode_id(features)

    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    timesteps = scheduler.sample_timesteps(k_t, b)
    noisy = scheduler.add_noise(latents.astype(jnp.float32), noise, timesteps).astype(latents.dtype)
    boxes = batch["face_box"].astype(jnp.float32)
    down, mid = realisid.residuals(noisy, timesteps, p_id[:, None], boxes[:, None], jnp.ones((b, 1), bool),
                                   batch["landmark_image"][:, None], added)
    pred = models.unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=added,
                       down_block_additional_residuals=down, mid_block_additional_residual=mid)
    target = scheduler.training_target(latents.astype(jnp.float32), noise, timesteps)
    mask = face_masks(boxes, latents.shape[1:3])
    loss, mse, face = face_weighted_loss(pred, target, mask, settings.face_loss_weight)
    return loss, {"mse": mse, "face_loss": face}


def train_step(state: TrainState, frozen_inputs: nnx.State, batch: Batch, *, graphdef: nnx.GraphDef,
               scheduler: DDPMScheduler,
               optimizer: optax.GradientTransformation, settings: StepSettings) -> tuple[TrainState, dict]:
    """One AdamW step on the branch parameters. The step's randomness is ``fold_in(state.rng, state.step)``,
    so a resumed run draws exactly what an uninterrupted one would.

    Returns:
      the new state and float32 scalar metrics ``loss``, ``mse``, ``face_loss``, ``grad_norm``.
    """
    key = jax.random.fold_in(state["rng"], state["step"])
    loss_fn = functools.partial(compute_loss, graphdef=graphdef, scheduler=scheduler, settings=settings)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], frozen_inputs, batch, key)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
    return new_state, {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads)}


def jit_train_step(*, graphdef, scheduler, optimizer, settings, state_shardings, frozen_shardings,
                   batch_shardings) -> Any:
    """``train_step`` under ``jax.jit`` with explicit shardings; the train state (argument 0) is donated.

    Call (or lower) it as ``step(state, frozen_inputs, batch)`` inside ``use_mesh(mesh, rules)`` so that
    activation constraints apply.
    """

    def step(state, frozen_inputs, batch):
        return train_step(state, frozen_inputs, batch, graphdef=graphdef, scheduler=scheduler,
                          optimizer=optimizer, settings=settings)

    replicated = jax.sharding.NamedSharding(jax.tree.leaves(state_shardings)[0].mesh, jax.sharding.PartitionSpec())
    return jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))

