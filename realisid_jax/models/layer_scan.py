"""Identical layers in a row as one ``lax.scan``: maxtext's ``scan_layers``, over diffusers' parameter names.

SDXL repeats its transformer layers ten deep (UNet ``down_blocks[2]``, ``mid_block``, ``up_blocks[0]``, and each
ControlNet's copies of them) and its CLIP towers 32 deep. Unrolled, every layer is its own code in the compiled
program: the TPU compiler's time and memory grow with it (its code generation runs per fusion). Scanned, one
layer's code runs ``n`` times. The parameters stay where checkpoints put them (``transformer_blocks.3.attn1...``):
the layers' states are stacked inside the traced function, a copy of those weights in the compute's memory
(sharded as the weights are), which is why it is a choice of the training step (``config.train.scan_layers``) and
sampling keeps its layers unrolled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class ScannedLayers:
    """Mixin of modules holding a row of identical layers; ``scan_layers`` is a static attribute (part of the
    graph definition a jit traces), set for a whole model by ``set_scan_layers``."""

    scan_layers: bool = False


def set_scan_layers(model: nnx.Module, scan: bool) -> None:
    """Runs every row of identical layers in ``model`` (``Transformer2DModel.transformer_blocks``,
    ``CLIPEncoder.layers``) as one ``lax.scan`` when ``scan`` is true, layer by layer otherwise (same maths).
    Call before ``nnx.split`` / jit."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, ScannedLayers):
            module.scan_layers = bool(scan)


def scan_layers(layers: Sequence[nnx.Module], hidden_states: jax.Array, *args,
                keep_outputs: bool = False, **static) -> tuple[jax.Array, jax.Array | None]:
    """``hidden_states = layer(hidden_states, *args, **static)`` for each of ``layers`` in order, as one
    ``lax.scan`` over their stacked states.

    Args:
      layers: modules with the same graph definition (same class, shapes and static attributes).
      hidden_states: the carried activation, any shape; ``args`` are closed over (the same for every layer).
      keep_outputs: also return every layer's output, stacked on a new leading axis (n, ...).

    Returns:
      ``(last output, stacked outputs or None)``.

    Raises:
      ValueError: the layers' graph definitions differ (they cannot share one body).
    """
    graphdef, first = nnx.split(layers[0])
    states = [first]
    for layer in layers[1:]:
        other, state = nnx.split(layer)
        if other != graphdef:
            raise ValueError(f"cannot scan {type(layers[0]).__name__} layers: their graph definitions differ")
        states.append(state)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    apply: Callable = lambda state, h: nnx.merge(graphdef, state)(h, *args, **static)  # noqa: E731

    def body(h, state):
        h = apply(state, h)
        return h, (h if keep_outputs else None)

    return jax.lax.scan(body, hidden_states, stacked)
