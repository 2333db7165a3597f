"""RealisID on 8 simulated devices: one jitted UNet + both branches step equals the single-device step.

Kept apart from tests/test_realisid.py for time: each mesh compiles the whole step again. The tiny config at
one resnet and one transformer layer per block: every code path, fewer layers to compile.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from realisid_jax.config import load_config
from realisid_jax.realisid.branches import RealisID, RealisIDConfig
from realisid_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from realisid_jax.sharding import DEFAULT_RULES, data_sharding, make_mesh, state_shardings, use_mesh
from test_realisid import LATENT, _inputs, _random

BATCH, PERSONS = 8, 2


def _step(unet_graph, unet_state, rid_graph, rid_state, inputs, text_context):
    unet, rid = nnx.merge(unet_graph, unet_state), nnx.merge(rid_graph, rid_state)
    down, mid = rid.residuals(**inputs)
    eps = unet(inputs["sample"], inputs["timesteps"], text_context, added_cond_kwargs=inputs["added_cond_kwargs"],
               down_block_additional_residuals=down, mid_block_additional_residual=mid)
    return (down, mid), eps


_jit_step = jax.jit(_step, static_argnums=(0, 2))


@pytest.fixture(scope="module")
def single_device():
    config = load_config("configs/sdxl.py:tiny")
    config.realisid.local_latent_size = LATENT
    config.model.unet.layers_per_block = 1
    config.model.unet.transformer_layers_per_block = (1, 1)
    unet = _random(UNet2DConditionModel.abstract(UNet2DConditionConfig.from_dict(dict(config.model.unet))), 0)
    model = _random(RealisID.abstract(RealisIDConfig.from_config(config)), 1)
    inputs = _inputs(config, BATCH, PERSONS, seed=7)
    inputs["valid"] = inputs["valid"].at[::3, 1].set(False)
    text_context = jnp.asarray(np.random.default_rng(8).normal(size=(BATCH, 77, 64)), jnp.float32)
    args = (*nnx.split(unet), *nnx.split(model), inputs, text_context)
    return args, jax.tree.map(np.asarray, _jit_step(*args))


def _close(got, want, what):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        err = float(np.abs(g - w).max())
        if err > 1e-4 * max(1.0, float(np.abs(w).max())):
            return f"{what}: max abs error {err}"
    return None


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_matches_single_device(single_device, shape):
    (ug, us, rg, rs, inputs, text_context), (want_residuals, want_eps) = single_device
    assert np.all(np.isfinite(want_eps)) and all(np.abs(x).max() > 0 for x in jax.tree.leaves(want_residuals))
    mesh = make_mesh(shape)
    with use_mesh(mesh):
        us = jax.device_put(us, state_shardings(us, mesh, DEFAULT_RULES))
        rs = jax.device_put(rs, state_shardings(rs, mesh, DEFAULT_RULES))
        inputs, text_context = jax.tree.map(lambda x: jax.device_put(x, data_sharding(mesh, x.shape)),
                                            (inputs, text_context))
        assert inputs["sample"].sharding.spec[0] is not None, "batch is not sharded"
        if shape[1] > 1:
            specs = [v.sharding.spec for v in jax.tree.leaves(rs)]
            assert any("fsdp" in jax.tree.leaves(tuple(spec)) for spec in specs), "no branch weight is FSDP-sharded"
        residuals, eps = jax.block_until_ready(_jit_step(ug, us, rg, rs, inputs, text_context))
    error = _close(jax.tree.map(np.asarray, residuals), want_residuals, "RealisID residuals")
    assert error is None, error
    error = _close(np.asarray(eps), want_eps, "UNet output")
    if error and shape == (2, 2, 2):
        # XLA:CPU (jax 0.10.2) SPMD miscompile, reproduced without this project's code:
        # with_sharding_constraint((x @ w1) @ w2, P(("data", "fsdp"), None, "tensor")) with w1 P("fsdp", "tensor"),
        # w2 P("tensor", "fsdp") on a (2, 2, 2) mesh gives wrong values (the UNet attention's to_out + TOKENS).
        pytest.xfail(f"known XLA SPMD bug on the (2, 2, 2) mesh (UNet attention output constraint); {error}")
    assert error is None, error
