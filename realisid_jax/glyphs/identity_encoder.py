"""The glyph world's image encoder: the project's ``CLIPVisionModelWithProjection`` trained so that its penultimate
hidden layer (what RealisID's ID projection reads) carries a glyph's identity across font styles.

Training is classification over the 24 identities of references in the training styles, prepared as the project
prepares a reference face (``face.preprocess``): the ink mask zeroes the background, then CLIP's mean/std
normalise. Two linear heads share the encoder: one on the token mean of ``hidden_states[-2]`` (the features
RealisID uses) and one on ``image_embeds`` (so the last layer and the projection are trained too, and the saved
encoder is a whole CLIP vision model). The references are a fixed pool rendered once (rendering costs CPU);
each step draws a batch from it and shifts each crop by a few pixels on the device.

``linear_probe_accuracy`` is the issue's measure: a multinomial logistic regression on the penultimate features,
fitted on fresh training-style references and scored on held-out-style ones.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.optimize
from flax import nnx

from realisid_jax.face.preprocess import CLIP_MEAN, CLIP_STD
from realisid_jax.glyphs import world
from realisid_jax.glyphs.fitting import checkpointed_loop
from realisid_jax.models import registry
from realisid_jax.models.clip_vision import CLIPVisionModelWithProjection, CLIPVisionOutput

NUM_CLASSES = len(world.IDENTITIES)
MAX_SHIFT = 2  # px of random translation at 32 px


def masked_reference(reference: world.Reference) -> np.ndarray:
    """The reference crop the encoder sees, as ``face.preprocess.preprocess_reference`` makes it from the
    ``plain_background`` analysis: (S, S, 3) uint8, ``world.Reference.crop``."""
    return reference.crop


def render_references(seed: int, per_identity: int, *, styles: Sequence[str] = world.TRAIN_STYLES,
                      size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``per_identity`` masked references of every identity (``world.reference(seed, i, identity)``).

    Returns:
      ``(crops, labels)``: (N, size, size, 3) uint8 masked crops and (N,) int32 indices into ``world.IDENTITIES``,
      N = 24 * per_identity, identities interleaved.
    """
    crops, labels = [], []
    for i in range(per_identity):
        for label, identity in enumerate(world.IDENTITIES):
            crops.append(masked_reference(world.reference(seed, i, identity, size=size, styles=tuple(styles))))
            labels.append(label)
    return np.stack(crops), np.asarray(labels, np.int32)


def penultimate_features(output: CLIPVisionOutput) -> jax.Array:
    """(B, hidden_size): the token mean of ``hidden_states[-2]``, the layer RealisID's ID projection reads."""
    return output.hidden_states[-2].mean(axis=1)


class IdentityClassifier(nnx.Module):
    """The encoder with its two training heads: ``(B, S, S, 3)`` CLIP-normalised pixels -> two (B, 24) logits,
    from the penultimate features (layer-normed) and from ``image_embeds``."""

    def __init__(self, encoder: CLIPVisionModelWithProjection, *, rngs: nnx.Rngs):
        hidden, projection = encoder.config.hidden_size, encoder.config.projection_dim
        self.encoder = encoder
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, NUM_CLASSES, rngs=rngs)
        self.embed_head = nnx.Linear(projection, NUM_CLASSES, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        output = self.encoder(pixels)
        return self.head(self.norm(penultimate_features(output))), self.embed_head(output.image_embeds)


def build_encoder(config: ml_collections.ConfigDict, seed: int = 0) -> CLIPVisionModelWithProjection:
    """A random ``CLIPVisionModelWithProjection`` of ``config.model.image_encoder`` with the config's dtypes."""
    cls, cfg = registry.frozen_configs(config)["image_encoder"]
    return cls(cfg, rngs=nnx.Rngs(seed), **registry.dtypes(config))


def _to_pixels(crops: jax.Array) -> jax.Array:
    """uint8 crops -> CLIP-normalised float32, as ``face.preprocess.normalize`` (traceable)."""
    return (crops.astype(jnp.float32) / 255.0 - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def _augment(key: jax.Array, crops: jax.Array) -> jax.Array:
    """A random shift of up to ``MAX_SHIFT`` px per crop (B, S, S, 3) uint8 -> float32 0..255, the uncovered
    border continuing the crop's edge (its plain background)."""
    s = crops.shape[1]
    padded = jnp.pad(crops.astype(jnp.float32), ((0, 0), (MAX_SHIFT,) * 2, (MAX_SHIFT,) * 2, (0, 0)), mode="edge")
    offsets = jax.random.randint(key, (crops.shape[0], 2), 0, 2 * MAX_SHIFT + 1)
    return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (s, s, 3)))(padded, offsets)


def _make_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation):
    def loss_fn(params, crops, labels, key):
        model = nnx.merge(graphdef, params)
        logits, embed_logits = model(_to_pixels(_augment(key, crops)))
        loss = (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(embed_logits, labels).mean())
        return loss, (logits.argmax(-1) == labels).mean()

    @jax.jit
    def step(state, crops, labels, key):
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], crops, labels, key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
               "step": state["step"] + 1}
        return new, {"loss": loss, "accuracy": accuracy}

    return step


@dataclasses.dataclass
class TrainOptions:
    """Training settings other than the model sizes (which come from ``config.model.image_encoder``)."""

    pool_per_identity: int = 160
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    checkpoint_every: int = 200


def train_identity_encoder(config: ml_collections.ConfigDict, *, seed: int = 0, num_steps: int = 1200,
                           batch_size: int = 64, workdir: str | Path | None = None,
                           options: TrainOptions = TrainOptions(), progress: bool = True
                           ) -> tuple[CLIPVisionModelWithProjection, dict]:
    """Trains the image encoder of ``config`` on training-style references.

    Args:
      config: a project config (``configs/sdxl.py:glyphs``); ``config.model.image_encoder`` sizes the model.
      seed: parameters, the reference pool (``world.reference(seed, ...)``) and the batches.
      num_steps: optimiser steps (AdamW, warm-up then cosine decay, gradient clipping at 1).
      batch_size: references per step, drawn from the pool.
      workdir: checkpoints go to ``workdir/checkpoints`` every ``options.checkpoint_every`` steps and at the end;
        a run finds the newest one and resumes from it (a finished run returns at once). ``None``: none.
      options: pool size and optimiser settings.
      progress: show a tqdm bar.

    Returns:
      ``(encoder, metrics)``: the trained ``CLIPVisionModelWithProjection`` and ``{"steps", "seconds",
      "train_loss", "train_accuracy"}`` (the last 50 steps' means; seconds of this call).
    """
    start = time.time()
    crops, labels = render_references(seed, options.pool_per_identity, size=config.model.image_encoder.image_size)
    model = IdentityClassifier(build_encoder(config, seed), rngs=nnx.Rngs(seed + 1))
    graphdef, params = nnx.split(model, nnx.Param)
    warmup = min(options.warmup_steps, max(1, num_steps // 4))
    schedule = optax.warmup_cosine_decay_schedule(0.0, options.learning_rate, warmup, max(num_steps, warmup + 1))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, weight_decay=options.weight_decay))
    params = nnx.to_pure_dict(params)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    def batch(step: int):
        index = np.random.default_rng([seed, step]).integers(0, len(labels), batch_size)
        return crops[index], labels[index], jax.random.fold_in(jax.random.key(seed), step)

    state, history = checkpointed_loop(_make_step(graphdef, optimizer), state, batch, num_steps=num_steps,
                                       workdir=workdir, desc="image encoder", progress=progress,
                                       checkpoint_every=options.checkpoint_every)
    trained = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(trained, state["params"])
    nnx.update(model, trained)
    tail = history[-50:]
    metrics = {"steps": num_steps, "seconds": time.time() - start,
               "train_loss": float(np.mean([h["loss"] for h in tail])) if tail else None,
               "train_accuracy": float(np.mean([h["accuracy"] for h in tail])) if tail else None}
    return model.encoder, metrics


@jax.jit(static_argnums=0)
def _features(graphdef: nnx.GraphDef, state: nnx.State, crops: jax.Array) -> jax.Array:
    return penultimate_features(nnx.merge(graphdef, state)(_to_pixels(crops)))


def encode_features(encoder: CLIPVisionModelWithProjection, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Penultimate features of masked uint8 crops (N, S, S, 3) -> (N, hidden_size) float32."""
    graphdef, state = nnx.split(encoder)
    # One compiled shape: the last batch is padded.
    padded = np.concatenate([crops, np.zeros((-len(crops) % batch_size, *crops.shape[1:]), crops.dtype)])
    return np.concatenate([np.asarray(_features(graphdef, state, padded[i:i + batch_size]))
                           for i in range(0, len(padded), batch_size)])[:len(crops)]


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, num_classes: int, *, l2: float = 1e-3
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Multinomial logistic regression (mean cross-entropy + ``l2`` * |W|^2) on standardised features, by
    L-BFGS. Returns ``(weights (D, K), bias (K,), mean (D,), std (D,))``; predict ``argmax(((x - mean) / std) @ W
    + b)``."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = ((x - mean) / std).astype(np.float64)
    onehot = np.eye(num_classes)[y]
    d = z.shape[1]

    def objective(theta):
        w, b = theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:]
        logits = z @ w + b
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        loss = -np.mean(np.sum(onehot * np.log(p + 1e-12), 1)) + l2 * np.sum(w * w)
        g = (p - onehot) / len(z)
        return loss, np.concatenate([(z.T @ g + 2 * l2 * w).ravel(), g.sum(0)])

    theta = scipy.optimize.minimize(objective, np.zeros(d * num_classes + num_classes), jac=True,
                                    method="L-BFGS-B", options={"maxiter": 500}).x
    return theta[:d * num_classes].reshape(d, num_classes), theta[d * num_classes:], mean, std


def linear_probe_accuracy(encoder: CLIPVisionModelWithProjection, *, seed: int = 1, fit_per_identity: int = 60,
                          test_per_identity: int = 40) -> dict:
    """Identity accuracy of a logistic-regression probe on the penultimate features.

    Fitted on ``fit_per_identity`` training-style references per identity (``world.reference(seed, ...)``: use a
    seed other than training's), scored on ``test_per_identity`` held-out-style references per identity and on
    as many new training-style ones.

    Returns:
      ``{"heldout_accuracy", "train_style_accuracy", "fit_accuracy", "heldout_per_style": {style: accuracy}}``.
    """
    size = encoder.config.image_size
    fit_x, fit_y = render_references(seed, fit_per_identity, size=size)
    test_refs = [world.reference(seed + 1, i, identity, size=size, styles=world.HELDOUT_STYLES)
                 for i in range(test_per_identity) for identity in world.IDENTITIES]
    held_x = np.stack([masked_reference(r) for r in test_refs])
    held_y = np.asarray([world.IDENTITIES.index(r.identity) for r in test_refs])
    new_x, new_y = render_references(seed + 2, test_per_identity, size=size)
    w, b, mean, std = fit_logistic_regression(encode_features(encoder, fit_x), fit_y, NUM_CLASSES)

    def predict(crops):
        return (((encode_features(encoder, crops) - mean) / std) @ w + b).argmax(1)

    held_correct = predict(held_x) == held_y
    styles = np.asarray([r.style for r in test_refs])
    return {"heldout_accuracy": float(held_correct.mean()),
            "train_style_accuracy": float((predict(new_x) == new_y).mean()),
            "fit_accuracy": float((predict(fit_x) == fit_y).mean()),
            "heldout_per_style": {s: float(held_correct[styles == s].mean()) for s in world.HELDOUT_STYLES}}
