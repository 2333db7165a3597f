"""The optimiser of RealisID's branches: AdamW (paper: lr 1e-5, weight decay 1e-2), linear warm-up then
constant (this project's default; the paper states no schedule), global-norm gradient clipping."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """``lr * min(1, (step + 1) / warmup_steps)``: step 0 already moves the weights (no zero-lr step)."""
    peak, warmup = float(train.learning_rate), int(train.warmup_steps)
    if warmup <= 0:
        return optax.constant_schedule(peak)
    return lambda step: peak * jnp.minimum(1.0, (step + 1) / warmup)


def make_optimizer(train: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``clip_by_global_norm(max_grad_norm)`` then AdamW with :func:`learning_rate_schedule`.

    Args:
      train: ``config.train`` (``learning_rate``, ``weight_decay``, ``warmup_steps``, ``max_grad_norm``).

    Returns:
      ``(optimizer, schedule)``; the schedule maps the step to the learning rate (for logging).
    """
    schedule = learning_rate_schedule(train)
    optimizer = optax.chain(
        optax.clip_by_global_norm(float(train.max_grad_norm)),
        optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=float(train.weight_decay)),
    )
    return optimizer, schedule
