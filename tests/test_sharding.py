"""Mesh construction and the logical-axis rules machinery."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from realisid_jax.sharding import (DEFAULT_RULES, active_rules, constrain, data_sharding, logical_to_spec, make_mesh,
                                   use_mesh)


def test_make_mesh_fills_the_free_axis_and_checks_sizes():
    assert dict(make_mesh((-1, 2, 1)).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="at most one"):
        make_mesh((-1, -1, 2))
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh((4, 4, 1))


def test_logical_names_map_to_mesh_axes_and_replicate_what_does_not_divide():
    mesh = make_mesh((2, 4, 1))
    assert logical_to_spec(("embed", "mlp"), (64, 32), mesh, DEFAULT_RULES) == P("fsdp", None)
    assert logical_to_spec(("activation_batch", None), (8, 3), mesh, DEFAULT_RULES) == P(("data", "fsdp"), None)
    # 6 rows do not split 8 ways; 3 input channels do not split 4 ways.
    assert logical_to_spec(("activation_batch", None), (6, 3), mesh, DEFAULT_RULES) == P(None, None)
    assert logical_to_spec(("conv_h", "conv_w", "conv_in", "conv_out"), (3, 3, 3, 6), mesh, DEFAULT_RULES) == \
        P(None, None, None, None)
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("embd",), (8,), mesh, DEFAULT_RULES)


def test_constraints_are_active_only_inside_use_mesh():
    mesh = make_mesh((8, 1, 1))
    x = np.ones((8, 4), np.float32)
    assert active_rules() is None
    assert constrain(x, ("activation_batch", None)) is x
    with use_mesh(mesh):
        assert active_rules() == DEFAULT_RULES
        y = jax.jit(lambda v: constrain(v * 2, ("activation_batch", None)))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2)
    assert data_sharding(mesh, (8, 4)).spec == P("data", None)


def test_two_matmuls_under_the_default_rules_are_exact_on_every_mesh():
    """Regression guard for the XLA:CPU miscompilation that activation constraints on "tensor" triggered on a
    (2, 2, 2) mesh (error ~300 on this product); the default rules must keep it exact."""
    rng = np.random.default_rng(0)
    x, w1, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((8, 16, 64), (64, 64), (64, 64)))
    ref = (x @ w1) @ w2
    for shape in ((8, 1, 1), (2, 4, 1), (2, 2, 2)):
        mesh = make_mesh(shape)
        with use_mesh(mesh):
            args = [jax.device_put(a, NamedSharding(mesh, logical_to_spec(n, a.shape, mesh, DEFAULT_RULES)))
                    for a, n in ((x, ("activation_batch", None, None)), (w1, ("embed", "mlp")), (w2, ("mlp", "embed")))]
            out = jax.jit(lambda a, b, c: constrain((a @ b) @ c, ("activation_batch", "activation_length",
                                                                   "activation_embed")))(*args)
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-3, rtol=1e-4)


def test_gathered_weights_keep_the_values_and_gather_each_kernel_whole():
    """``mesh.gather_weights`` wraps every conv and linear kernel op, survives ``set_conv_impl`` and leaves the
    loss and gradients of an FSDP-sharded step unchanged. (Where it changes the program, the reduced TPU step's
    peak per chip: tests/test_tpu_aot.py, slow.)"""
    from flax import nnx

    from realisid_jax.models.layers import GatheredKernel, conv, linear, set_conv_impl, set_weight_gathering
    from realisid_jax.models.unet_blocks import FEATURE_MAP
    from realisid_jax.sharding import state_shardings

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv, self.proj = conv(8, 32, 3, rngs=rngs), linear(32, 16, rngs=rngs)

        def __call__(self, x):
            return self.proj(jax.nn.silu(self.conv(x)))

    mesh = make_mesh((1, 8, 1))
    x = np.random.default_rng(0).standard_normal((8, 8, 8, 8)).astype(np.float32)

    def loss_and_grads(gather):
        model = Net(nnx.Rngs(0))
        set_weight_gathering(model, gather)
        set_conv_impl(model, "xla")
        assert isinstance(model.conv.conv_general_dilated, GatheredKernel) == gather
        assert isinstance(model.proj.dot_general, GatheredKernel) == gather
        graphdef, params = nnx.split(model)
        params = jax.device_put(params, state_shardings(params, mesh, DEFAULT_RULES))
        loss = jax.jit(jax.value_and_grad(lambda p, x: (nnx.merge(graphdef, p)(constrain(x, FEATURE_MAP)) ** 2).mean()))
        with use_mesh(mesh):
            return loss(params, x)

    plain, plain_grads = loss_and_grads(False)
    gathered, grads = loss_and_grads(True)
    np.testing.assert_allclose(gathered, plain, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, plain_grads)
