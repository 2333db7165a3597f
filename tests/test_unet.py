"""UNet2DConditionModel: parity with diffusers 0.42.1 on tiny random weights, sharded execution on 8 simulated
devices, gradient checkpointing, config validation, and the parameter counts of the real SD1.5 / SDXL UNets."""

import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from realisid_jax import sharding
from realisid_jax.config import load_config
from realisid_jax.models.embeddings import Timesteps, broadcast_timesteps, text_time_input
from realisid_jax.models.modeling_utils import count_params
from realisid_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from realisid_jax.loading.pretrained import from_pretrained

# One thread: on a shared 2-core machine torch's thread pool spins (2 s instead of 20 ms per tiny forward).
torch.set_num_threads(1)

TINY_SDXL = load_config("configs/sdxl.py:tiny").model.unet.to_dict()
# SD1.5 layout at tiny widths: cross-attention blocks first, 1x1-conv proj_in, int attention_head_dim (= heads).
TINY_SD15 = dict(
    in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, cross_attention_dim=48, use_linear_projection=False, norm_num_groups=8,
    norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, sample_size=16,
)
# (config, latent height, width, batch). SD1.5 runs at an odd size (forces diffusers' upsample_size path); the
# SDXL case uses a batch of 8 so that its output is also the single-device reference of the sharded test.
CASES = {"sd15": (TINY_SD15, 9, 12, 2), "sdxl": (TINY_SDXL, 16, 16, 8)}
# Several timesteps in one compiled function: all-equal rows as diffusers' scalar timesteps, then mixed.
TIMESTEPS = ((1, 1), (500, 500), (999, 999), (3, 871))


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturbs every parameter (norm scales/biases and zero-initialised weights included) so that a wrong
    or skipped weight changes the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def skip_shapes(cfg: dict, batch: int, h: int, w: int):
    """NHWC shapes of the UNet's skip connections (ControlNet down residuals) and of the mid-block output."""
    channels, layers = cfg["block_out_channels"], cfg["layers_per_block"]
    shapes = [(batch, h, w, channels[0])]
    for i, c in enumerate(channels):
        shapes += [(batch, h, w, c)] * layers
        if i < len(channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((batch, h, w, c))
    return shapes, (batch, h, w, channels[-1])


def make_inputs(cfg: dict, h: int, w: int, batch: int, seed: int, residuals: bool) -> dict:
    rng = np.random.default_rng(seed)
    inputs = dict(sample=rng.standard_normal((batch, h, w, cfg["in_channels"]), dtype=np.float32),
                  encoder_hidden_states=rng.standard_normal((batch, 7, cfg["cross_attention_dim"]), dtype=np.float32))
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        ids = np.array([[h * 8, w * 8, 0, 0, h * 8, w * 8], [300, 200, 16, 8, h * 8, w * 8]], np.float32)
        inputs["added_cond_kwargs"] = {"text_embeds": rng.standard_normal((batch, pooled), dtype=np.float32),
                                       "time_ids": np.resize(ids, (batch, 6))}
    if residuals:
        down, mid = skip_shapes(cfg, batch, h, w)
        inputs["down_block_additional_residuals"] = tuple(rng.standard_normal(s, dtype=np.float32) for s in down)
        inputs["mid_block_additional_residual"] = rng.standard_normal(mid, dtype=np.float32)
    return inputs


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))


def torch_forward(model, inputs, t):
    kw = {}
    if "added_cond_kwargs" in inputs:
        kw["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in inputs["added_cond_kwargs"].items()}
    if "down_block_additional_residuals" in inputs:
        kw["down_block_additional_residuals"] = tuple(nchw(r) for r in inputs["down_block_additional_residuals"])
        kw["mid_block_additional_residual"] = nchw(inputs["mid_block_additional_residual"])
    with torch.no_grad():
        out = model(nchw(inputs["sample"]), t, torch.from_numpy(inputs["encoder_hidden_states"]), **kw).sample
    return np.moveaxis(out.numpy(), 1, -1)


def call(model, t, inputs):
    rest = {k: v for k, v in inputs.items() if k not in ("sample", "encoder_hidden_states")}
    return model(inputs["sample"], t, inputs["encoder_hidden_states"], **rest)


def compiled(fn, *args):
    """``jax.jit(fn)`` compiled for ``args``."""
    return jax.jit(fn).lower(*args).compile()


def assert_close(out, ref, tol=1e-4):
    assert out.shape == ref.shape
    err = float(np.max(np.abs(np.asarray(out) - ref)))
    assert err <= tol * max(1.0, float(np.max(np.abs(ref)))), f"max abs error {err}"


@functools.cache
def reference(kind: str):
    """(diffusers UNet, our UNet loaded from the folder it was saved to by ``save_pretrained``)."""
    torch.manual_seed(0)
    ref = randomized(TorchUNet(**CASES[kind][0]), seed=1)
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        return ref, from_pretrained(UNet2DConditionModel, folder)


@functools.cache
def run(kind: str, residuals: bool):
    """Our jitted UNet (split once, ``nnx.merge`` inside ``jax.jit``) at every ``TIMESTEPS`` entry."""
    cfg, h, w, batch = CASES[kind]
    _, model = reference(kind)
    inputs = make_inputs(cfg, h, w, batch, seed=3, residuals=residuals)
    graphdef, state = nnx.split(model)
    timesteps = [jnp.resize(jnp.asarray(t), batch) for t in TIMESTEPS]
    forward = compiled(lambda state, t, inputs: call(nnx.merge(graphdef, state), t, inputs),
                       state, timesteps[0], inputs)
    return inputs, [np.asarray(forward(state, t, inputs)) for t in timesteps]


@pytest.mark.parametrize("residuals", [False, True], ids=["plain", "controlnet_residuals"])
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_parity_with_diffusers(kind, residuals):
    ref_model, _ = reference(kind)
    inputs, outputs = run(kind, residuals)
    batch = inputs["sample"].shape[0]
    for t, out in zip(TIMESTEPS, outputs):
        t = t[0] if t[0] == t[1] else torch.tensor(np.resize(t, batch))
        assert_close(out, torch_forward(ref_model, inputs, t))
    # The timestep must matter, or the comparison above proves little about the time embedding.
    assert np.max(np.abs(outputs[0] - outputs[2])) > 1e-2


def test_residuals_change_the_output():
    _, plain = run("sdxl", False)
    _, with_residuals = run("sdxl", True)
    assert np.max(np.abs(plain[2] - with_residuals[2])) > 1e-2


def test_residual_arguments_are_checked():
    cfg, h, w, batch = CASES["sdxl"]
    _, model = reference("sdxl")
    inputs = make_inputs(cfg, h, w, batch, seed=5, residuals=True)
    partial = {k: v for k, v in inputs.items() if k != "mid_block_additional_residual"}
    with pytest.raises(ValueError, match="both"):
        jax.eval_shape(lambda: call(model, 1, partial))
    inputs["down_block_additional_residuals"] = inputs["down_block_additional_residuals"][:-1]
    with pytest.raises(ValueError, match="skip connections"):
        jax.eval_shape(lambda: call(model, 1, inputs))


def test_timesteps_and_added_conditions_inputs():
    np.testing.assert_array_equal(broadcast_timesteps(7, 3), [7.0, 7.0, 7.0])
    np.testing.assert_array_equal(broadcast_timesteps(jnp.array([4]), 2), [4.0, 4.0])
    with pytest.raises(ValueError, match="timesteps"):
        broadcast_timesteps(jnp.array([1, 2, 3]), 2)
    with pytest.raises(ValueError, match="time_ids"):
        text_time_input(Timesteps(8, True, 0), {"text_embeds": jnp.zeros((1, 32))})


def test_heads_follow_diffusers_naming_quirk():
    # SD1.5: attention_head_dim=8 is the number of heads (num_attention_heads unset), 40/80/160 wide.
    model = UNet2DConditionModel.abstract(UNet2DConditionConfig.from_dict(
        {**TINY_SD15, "block_out_channels": (320, 640), "attention_head_dim": 8, "norm_num_groups": 32}))
    attn = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.heads == 8 and attn.to_q.kernel.shape == (320, 320)
    assert model.mid_block.attentions[0].transformer_blocks[0].attn2.heads == 8


@pytest.mark.parametrize("override,match", [
    (dict(class_embed_type="timestep"), "class_embed_type"), (dict(addition_embed_type="text"), "'text'"),
    (dict(upcast_attention=True), "upcast_attention"), (dict(time_cond_proj_dim=8), "time_cond_proj_dim"),
    (dict(down_block_types=("DownBlock2D", "AttnDownBlock2D")), "AttnDownBlock2D")])
def test_unsupported_config_raises(override, match):
    with pytest.raises(NotImplementedError, match=match):
        UNet2DConditionModel.abstract(UNet2DConditionConfig.from_dict({**TINY_SDXL, **override}))


def test_gradient_checkpointing_remats_every_block():
    cfg, h, w, _ = CASES["sdxl"]
    _, model = reference("sdxl")
    inputs = make_inputs(cfg, h, w, 1, seed=6, residuals=False)

    def remat_count(m):
        graphdef, state = nnx.split(m)
        jaxpr = jax.make_jaxpr(lambda s: call(nnx.merge(graphdef, s), 500, inputs))(state)
        return sum(e.primitive.name == "remat2" for e in jaxpr.jaxpr.eqns)

    assert remat_count(model) == 0
    graphdef, state = nnx.split(model)
    remat_model = nnx.merge(graphdef, state)
    remat_model.enable_gradient_checkpointing()
    blocks = len(model.down_blocks) + 1 + len(model.up_blocks)
    assert remat_count(remat_model) == blocks


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_matches_single_device(mesh_shape):
    inputs, expected = run("sdxl", True)
    _, model = reference("sdxl")
    graphdef, state = nnx.split(model)
    mesh = sharding.make_mesh(mesh_shape)
    with sharding.use_mesh(mesh):
        assert sharding.active_rules() is not None
        state = jax.device_put(state, sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES))
        specs = [v.sharding.spec for v in jax.tree.leaves(state)]
        if mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:  # (8, 1, 1) is pure data parallelism
            assert any(any(axis is not None for axis in spec) for spec in specs), "no weight is sharded"
        data = jax.tree.map(lambda a: jax.device_put(a, sharding.data_sharding(mesh, a.shape)), inputs)
        # Scalar timestep here; the reference used the (B,) vector of the same value.
        out = compiled(lambda state, data: call(nnx.merge(graphdef, state), 999, data), state, data)(state, data)
        out.block_until_ready()
    assert out.sharding.spec[0] is not None, "batch is not sharded"
    np.testing.assert_allclose(np.asarray(out), expected[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,expected", [("sdxl", 2_567_463_684), ("sd15", 859_520_964)])
def test_parameter_count(name, expected):
    config = UNet2DConditionConfig.from_dict(load_config(f"configs/{name}.py").model.unet.to_dict())
    assert count_params(UNet2DConditionModel.abstract(config)) == expected
