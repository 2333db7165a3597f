"""UNet2DConditionModel: parity with diffusers 0.42.1 on tiny random weights, sharded execution on 8 simulated
devices, and the parameter counts of the real SD1.5 / SDXL UNets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from realisid_jax import sharding
from realisid_jax.config import load_config
from realisid_jax.models.modeling_utils import count_params
from realisid_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel

TINY_SDXL = load_config("configs/tiny.py").model.unet.to_dict()
# SD1.5 layout at tiny widths: cross-attention first, 1x1-conv proj_in, int attention_head_dim (= heads).
TINY_SD15 = dict(
    in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, cross_attention_dim=48, use_linear_projection=False, norm_num_groups=8,
    norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, sample_size=16,
)
BATCH = 2


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


def make_inputs(cfg: dict, h: int, w: int, seed: int, residuals: bool, batch: int = BATCH):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, h, w, cfg["in_channels"]), dtype=np.float32)
    ctx = rng.standard_normal((batch, 7, cfg["cross_attention_dim"]), dtype=np.float32)
    inputs = dict(sample=x, encoder_hidden_states=ctx)
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {
            "text_embeds": rng.standard_normal((batch, pooled), dtype=np.float32),
            "time_ids": np.resize(np.array([[h * 8, w * 8, 0, 0, h * 8, w * 8], [300, 200, 16, 8, h * 8, w * 8]],
                                           np.float32), (batch, 6))}
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


def jitted(model):
    """Split once, merge inside a plain ``jax.jit`` (the project's hot-loop pattern)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, t, inputs):
        inputs = dict(inputs)
        return nnx.merge(graphdef, state)(inputs.pop("sample"), t, inputs.pop("encoder_hidden_states"), **inputs)

    return lambda t, inputs: forward(state, t, inputs)


def assert_close(out, ref, tol=1e-4):
    assert out.shape == ref.shape
    err = float(np.max(np.abs(np.asarray(out) - ref)))
    assert err <= tol * max(1.0, float(np.max(np.abs(ref)))), f"max abs error {err}"


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pair(request, tmp_path_factory):
    """(diffusers UNet, our UNet loaded from its save_pretrained folder, config dict, latent (h, w))."""
    cfg, size = (TINY_SD15, (10, 12)) if request.param == "sd15" else (TINY_SDXL, (16, 16))
    torch.manual_seed(0)
    ref = randomized(TorchUNet(**cfg), seed=1)
    folder = tmp_path_factory.mktemp(f"unet_{request.param}")
    ref.save_pretrained(folder)
    return ref, UNet2DConditionModel.from_pretrained(folder), cfg, size


@pytest.mark.parametrize("residuals", [False, True], ids=["plain", "controlnet_residuals"])
def test_parity_with_diffusers(pair, residuals):
    ref_model, model, cfg, (h, w) = pair
    inputs = make_inputs(cfg, h, w, seed=3, residuals=residuals)
    forward = jitted(model)
    outputs = []
    for t in (1, 500, 999):
        ref = torch_forward(ref_model, inputs, t)
        out = forward(jnp.asarray(t), inputs)
        assert_close(out, ref)
        outputs.append(np.asarray(out))
    # The timestep and the residuals must matter, or the comparison above proves little.
    assert np.max(np.abs(outputs[0] - outputs[2])) > 1e-2
    if residuals:
        plain = {k: v for k, v in inputs.items() if "residual" not in k}
        assert np.max(np.abs(np.asarray(forward(jnp.asarray(999), plain)) - outputs[2])) > 1e-2


def test_per_sample_timesteps_and_config_quirks(pair):
    ref_model, model, cfg, (h, w) = pair
    inputs = make_inputs(cfg, h, w, seed=4, residuals=False)
    t = np.array([3, 871])
    ref = torch_forward(ref_model, inputs, torch.from_numpy(t))
    rest = {k: v for k, v in inputs.items() if k not in ("sample", "encoder_hidden_states")}
    assert_close(model(inputs["sample"], jnp.asarray(t), inputs["encoder_hidden_states"], **rest), ref)
    # diffusers' naming quirk: attention_head_dim is the number of heads (num_attention_heads unset).
    heads = model.config.attention_head_dim
    first_heads = heads if isinstance(heads, int) else heads[-1]
    assert model.mid_block.attentions[0].transformer_blocks[0].attn1.heads == first_heads


def test_residual_arguments_are_checked(pair):
    _, model, cfg, (h, w) = pair
    inputs = make_inputs(cfg, h, w, seed=5, residuals=True)
    with pytest.raises(ValueError, match="both"):
        model(inputs["sample"], 1, inputs["encoder_hidden_states"], added_cond_kwargs=inputs.get("added_cond_kwargs"),
              down_block_additional_residuals=inputs["down_block_additional_residuals"])
    with pytest.raises(ValueError, match="skip connections"):
        model(inputs["sample"], 1, inputs["encoder_hidden_states"], added_cond_kwargs=inputs.get("added_cond_kwargs"),
              down_block_additional_residuals=inputs["down_block_additional_residuals"][:-1],
              mid_block_additional_residual=inputs["mid_block_additional_residual"])


def test_sdxl_needs_added_conditions():
    model = UNet2DConditionModel.abstract(UNet2DConditionConfig.from_dict(TINY_SDXL))
    with pytest.raises(ValueError, match="time_ids"):
        jax.eval_shape(lambda x, c: model(x, 1, c, added_cond_kwargs={"text_embeds": jnp.zeros((1, 32))}),
                       jnp.zeros((1, 16, 16, 4)), jnp.zeros((1, 7, 64)))


@pytest.mark.parametrize("override,match", [
    (dict(class_embed_type="timestep"), "class_embed_type"), (dict(addition_embed_type="text"), "'text'"),
    (dict(upcast_attention=True), "upcast_attention"), (dict(time_cond_proj_dim=8), "time_cond_proj_dim"),
    (dict(down_block_types=("DownBlock2D", "AttnDownBlock2D")), "AttnDownBlock2D")])
def test_unsupported_config_raises(override, match):
    with pytest.raises(NotImplementedError, match=match):
        UNet2DConditionModel.abstract(UNet2DConditionConfig.from_dict({**TINY_SDXL, **override}))


def test_gradient_checkpointing_same_values_and_grads(pair):
    _, model, cfg, (h, w) = pair
    inputs = make_inputs(cfg, h, w, seed=6, residuals=False)
    rest = {k: v for k, v in inputs.items() if k not in ("sample", "encoder_hidden_states")}

    def loss(m):
        return jnp.mean(m(inputs["sample"], 500, inputs["encoder_hidden_states"], **rest) ** 2)

    graphdef, state = nnx.split(model)
    plain = jax.jit(jax.value_and_grad(lambda s: loss(nnx.merge(graphdef, s))))(state)
    remat_model = nnx.merge(graphdef, state)
    remat_model.enable_gradient_checkpointing()
    remat_graphdef, _ = nnx.split(remat_model)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda s: loss(nnx.merge(remat_graphdef, s))))(state))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
    remat = jax.jit(jax.value_and_grad(lambda s: loss(nnx.merge(remat_graphdef, s))))(state)
    np.testing.assert_allclose(remat[0], plain[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(plain[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_matches_single_device(mesh_shape, sharded_reference):
    model, inputs, expected = sharded_reference
    graphdef, state = nnx.split(model)
    mesh = sharding.make_mesh(mesh_shape)
    with sharding.use_mesh(mesh):
        assert sharding.active_rules() is not None
        shardings = sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES)
        state = jax.device_put(state, shardings)
        specs = [v.sharding.spec for v in jax.tree.leaves(state)]
        assert any(any(axis is not None for axis in spec) for spec in specs), "no weight is sharded"
        data = jax.tree.map(lambda a: jax.device_put(a, sharding.data_sharding(mesh, a.shape)), inputs)

        @jax.jit
        def forward(state, data):
            data = dict(data)
            return nnx.merge(graphdef, state)(data.pop("sample"), 999, data.pop("encoder_hidden_states"), **data)

        out = forward(state, data)
        out.block_until_ready()
    assert out.sharding.spec[0] is not None, "batch is not sharded"
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def sharded_reference(tmp_path_factory):
    """Tiny SDXL UNet, a batch of 8 with ControlNet residuals, and its single-device output."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("unet_sharded")
    randomized(TorchUNet(**TINY_SDXL), seed=2).save_pretrained(folder)
    model = UNet2DConditionModel.from_pretrained(folder)
    inputs = make_inputs(TINY_SDXL, 16, 16, seed=7, residuals=True, batch=8)
    expected = np.asarray(jitted(model)(jnp.asarray(999), inputs))
    return model, inputs, expected


@pytest.mark.parametrize("name,expected", [("sdxl", 2_567_463_684), ("sd15", 859_520_964)])
def test_parameter_count(name, expected):
    config = UNet2DConditionConfig.from_dict(load_config(f"configs/{name}.py").model.unet.to_dict())
    assert count_params(UNet2DConditionModel.abstract(config)) == expected
