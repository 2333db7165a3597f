"""``scan_layers``: rows of identical layers as one ``lax.scan`` give the unrolled models' outputs and gradients
(so diffusers / transformers parity carries over), with one layer's code in the program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from realisid_jax.config import load_config
from realisid_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from realisid_jax.models.layer_scan import scan_layers, set_scan_layers
from realisid_jax.models.transformer_2d import BasicTransformerBlock, Transformer2DModel
from realisid_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel

CONFIG = load_config("configs/sdxl.py:tiny")


def _both(model, run):
    """``run(graphdef, state)`` jitted with scan_layers off, then on (same weights)."""
    results = []
    for scan in (False, True):
        set_scan_layers(model, scan)
        graphdef, state = nnx.split(model)
        results.append(jax.jit(run, static_argnums=0)(graphdef, state))
    return results


def test_unet_outputs_and_gradients_match_unrolled():
    cfg = UNet2DConditionConfig.from_dict(dict(CONFIG.model.unet.to_dict(), transformer_layers_per_block=(2, 3)))
    unet = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.normal(size=(2, 16, 16, 4)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(2, 7, cfg.cross_attention_dim)), jnp.float32)
    added = {"text_embeds": jnp.asarray(rng.normal(size=(2, 32)), jnp.float32),
             "time_ids": jnp.full((2, 6), 256.0)}

    def run(graphdef, state):
        def loss(state):
            out = nnx.merge(graphdef, state)(sample, jnp.array([10, 900]), context, added_cond_kwargs=added)
            return jnp.mean(out ** 2), out
        return jax.grad(loss, has_aux=True)(state)

    (grads_unrolled, out_unrolled), (grads_scanned, out_scanned) = _both(unet, run)
    np.testing.assert_allclose(out_scanned, out_unrolled, rtol=1e-5, atol=1e-5)
    flat_u, flat_s = jax.tree.leaves(grads_unrolled), jax.tree.leaves(grads_scanned)
    assert len(flat_u) == len(flat_s)
    for gu, gs in zip(flat_u, flat_s):
        np.testing.assert_allclose(gs, gu, rtol=1e-4, atol=1e-6)


def test_clip_hidden_states_match_unrolled():
    cfg = CLIPTextConfig.from_dict(dict(CONFIG.model.text_encoder.to_dict(), num_hidden_layers=3))
    model = CLIPTextModel(cfg, rngs=nnx.Rngs(1))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 1000, size=(2, 77)), jnp.int32)

    def run(graphdef, state):
        return nnx.merge(graphdef, state)(ids).hidden_states

    unrolled, scanned = _both(model, run)
    assert len(scanned) == len(unrolled) == 4
    for a, b in zip(scanned, unrolled):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_program_holds_one_layer():
    """Four scanned layers lower to one layer's matmuls inside a loop (what shortens the TPU compile)."""
    model = Transformer2DModel(2, 8, 16, num_layers=4, cross_attention_dim=8, use_linear_projection=True,
                               norm_num_groups=4, rngs=nnx.Rngs(0))
    x, context = jnp.zeros((1, 4, 4, 16)), jnp.zeros((1, 3, 8))

    def dots(scan):
        set_scan_layers(model, scan)
        graphdef, state = nnx.split(model)
        text = jax.jit(lambda s: nnx.merge(graphdef, s)(x, context)).lower(state).as_text()
        return text.count("stablehlo.dot_general"), "stablehlo.while" in text

    (unrolled, unrolled_loop), (scanned, scanned_loop) = dots(False), dots(True)
    assert not unrolled_loop and scanned_loop
    assert scanned < unrolled / 2, (scanned, unrolled)


def test_layers_that_differ_are_refused():
    layers = [BasicTransformerBlock(16, 2, 8, cross_attention_dim=8, rngs=nnx.Rngs(0)),
              BasicTransformerBlock(16, 2, 8, rngs=nnx.Rngs(0))]
    with pytest.raises(ValueError, match="graph definitions differ"):
        scan_layers(layers, jnp.zeros((1, 4, 16)), jnp.zeros((1, 3, 8)))
