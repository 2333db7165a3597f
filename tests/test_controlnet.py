"""ControlNetModel: parity with diffusers 0.42.1 (residuals, and the UNet output they produce), ``from_unet``
weight copy and zero init, config checks, and the SDXL ControlNet parameter count."""

import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from realisid_jax.config import load_config
from realisid_jax.models.controlnet import ControlNetConfig, ControlNetModel
from realisid_jax.models.modeling_utils import count_params
from realisid_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from realisid_jax.loading.torch_state import export_torch_state
from realisid_jax.loading.pretrained import from_pretrained

# One thread: on a shared 2-core machine torch's thread pool spins (2 s instead of 20 ms per tiny forward).
torch.set_num_threads(1)

TINY = load_config("configs/sdxl.py:tiny")
TINY_SDXL = TINY.model.unet.to_dict()
TINY_SD15 = dict(
    in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, cross_attention_dim=48, use_linear_projection=False, norm_num_groups=8,
    norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, sample_size=16,
)
EMBED_CHANNELS = tuple(TINY.model.local_branch.conditioning_embedding_out_channels)
# (UNet config, condition channels, latent h, w, conditioning_scale): the RealisID local branch (landmark
# image, SDXL) and a 1-channel location mask on the SD1.5 layout at an odd latent size.
CASES = {"sdxl_landmarks": (TINY_SDXL, 3, 16, 16, 0.7), "sd15_mask": (TINY_SD15, 1, 9, 12, 1.3)}
BATCH = 2


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturbs every parameter, the zero-initialised Z1/Z2 convs included, so that the test can fail."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1)))


def nhwc(t):
    return np.moveaxis(t.numpy(), 1, -1)


@functools.cache
def models(kind: str):
    """diffusers UNet + ControlNet (``from_unet``, then randomised), and ours loaded from their folders."""
    unet_cfg, channels, *_ = CASES[kind]
    torch.manual_seed(0)
    unet = randomized(TorchUNet(**unet_cfg), seed=1)
    controlnet = randomized(TorchControlNet.from_unet(unet, conditioning_channels=channels,
                                                      conditioning_embedding_out_channels=EMBED_CHANNELS), seed=2)
    with tempfile.TemporaryDirectory() as unet_dir, tempfile.TemporaryDirectory() as controlnet_dir:
        unet.save_pretrained(unet_dir)
        controlnet.save_pretrained(controlnet_dir)
        return unet, controlnet, from_pretrained(UNet2DConditionModel, unet_dir), \
            from_pretrained(ControlNetModel, controlnet_dir)


def make_inputs(kind: str) -> dict:
    cfg, channels, h, w, _ = CASES[kind]
    rng = np.random.default_rng(3)
    if channels == 1:  # location mask: 1 inside a face box
        cond = np.zeros((BATCH, 8 * h, 8 * w, 1), np.float32)
        cond[0, 10:40, 20:50], cond[1, 30:70, 8:60] = 1.0, 1.0
    else:  # rasterised landmarks in [0, 1]
        cond = rng.uniform(size=(BATCH, 8 * h, 8 * w, channels)).astype(np.float32)
    inputs = dict(sample=rng.standard_normal((BATCH, h, w, 4), dtype=np.float32),
                  encoder_hidden_states=rng.standard_normal((BATCH, 16, cfg["cross_attention_dim"]), dtype=np.float32),
                  controlnet_cond=cond)
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {
            "text_embeds": rng.standard_normal((BATCH, pooled), dtype=np.float32),
            "time_ids": np.array([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w], [300, 200, 16, 8, 8 * h, 8 * w]], np.float32)}
    return inputs


def torch_reference(kind: str, inputs: dict, t: int, controlnet=None):
    """diffusers: ControlNet residuals, then the UNet output with them (and without, as a third value)."""
    unet, trained, *_ = models(kind)
    controlnet = controlnet or trained
    scale = CASES[kind][-1]
    kw = {}
    if "added_cond_kwargs" in inputs:
        kw["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in inputs["added_cond_kwargs"].items()}
    x, ctx = nchw(inputs["sample"]), torch.from_numpy(inputs["encoder_hidden_states"])
    with torch.no_grad():
        down, mid = controlnet(x, t, ctx, nchw(inputs["controlnet_cond"]), conditioning_scale=scale,
                               return_dict=False, **kw)
        out = unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid, **kw).sample
        plain = unet(x, t, ctx, **kw).sample
    return [nhwc(d) for d in down], nhwc(mid), nhwc(out), nhwc(plain)


@functools.cache
def branch_then_unet(kind: str):
    """Jitted: our ControlNet's residuals fed into our UNet; states are arguments, graphs closed over."""
    *_, unet, controlnet = models(kind)
    unet_graph, unet_state = nnx.split(unet)
    cn_graph, cn_state = nnx.split(controlnet)

    def forward(cn_state, unet_state, t, scale, inputs):
        extra = {k: v for k, v in inputs.items() if k == "added_cond_kwargs"}
        x, ctx = inputs["sample"], inputs["encoder_hidden_states"]
        down, mid = nnx.merge(cn_graph, cn_state)(x, t, ctx, inputs["controlnet_cond"], conditioning_scale=scale,
                                                  **extra)
        out = nnx.merge(unet_graph, unet_state)(x, t, ctx, down_block_additional_residuals=down,
                                                mid_block_additional_residual=mid, **extra)
        return down, mid, out

    args = (cn_state, unet_state, jnp.asarray(1), jnp.float32(CASES[kind][-1]), make_inputs(kind))
    compiled = jax.jit(forward).lower(*args).compile()
    return lambda cn_state, t: compiled(cn_state, unet_state, jnp.asarray(t), args[3], args[4]), cn_state


def assert_close(out, ref, tol=1e-4):
    assert np.shape(out) == np.shape(ref)
    err = float(np.max(np.abs(np.asarray(out) - ref)))
    assert err <= tol * max(1.0, float(np.max(np.abs(ref)))), f"max abs error {err}"


@pytest.mark.parametrize("kind", list(CASES))
def test_parity_with_diffusers(kind):
    inputs = make_inputs(kind)
    forward, state = branch_then_unet(kind)
    for t in (1, 999):
        down, mid, out = forward(state, t)
        ref_down, ref_mid, ref_out, ref_plain = torch_reference(kind, inputs, t)
        assert len(down) == len(ref_down)
        for ours, ref in zip(down, ref_down):
            assert_close(ours, ref)
        assert_close(mid, ref_mid)
        assert_close(out, ref_out)
        # The branch must matter, or the comparison above proves little.
        assert np.max(np.abs(ref_out - ref_plain)) > 1e-2


def test_from_unet_copies_weights_and_zero_inits():
    kind = "sdxl_landmarks"
    torch_unet, _, unet, _ = models(kind)
    ours = ControlNetModel.from_unet(unet, conditioning_channels=3, conditioning_embedding_out_channels=EMBED_CHANNELS)
    theirs = TorchControlNet.from_unet(torch_unet, conditioning_channels=3,
                                       conditioning_embedding_out_channels=EMBED_CHANNELS).state_dict()
    exported = export_torch_state(nnx.state(ours, nnx.Param))
    assert exported.keys() == theirs.keys()
    zero = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")
    for key, value in exported.items():
        assert value.shape == tuple(theirs[key].shape), key
        if key.startswith(zero):
            assert not value.any(), f"{key} is not zero-initialised"
        elif not key.startswith("controlnet_cond_embedding."):
            np.testing.assert_array_equal(value, theirs[key].numpy(), err_msg=key)
    # Copies, not aliases: donating the branch state must not delete the frozen UNet's buffers.
    assert ours.conv_in.kernel.get_value() is not unet.conv_in.kernel.get_value()

    # A fresh branch adds exactly nothing: zero residuals, the UNet's own output.
    forward, _ = branch_then_unet(kind)
    down, mid, out = forward(nnx.state(ours), 999)
    assert not any(np.asarray(d).any() for d in down) and not np.asarray(mid).any()
    assert_close(out, torch_reference(kind, make_inputs(kind), 999)[3])


def test_from_unet_without_weights_is_random_except_zero_convs():
    # A micro UNet: initialising a model under jit costs seconds of XLA:CPU compile even at tiny widths.
    unet = UNet2DConditionModel.abstract(UNet2DConditionConfig(
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
        attention_head_dim=2, cross_attention_dim=8))
    fresh = export_torch_state(nnx.state(ControlNetModel.from_unet(
        unet, conditioning_channels=1, conditioning_embedding_out_channels=(4, 8), load_weights_from_unet=False),
        nnx.Param))
    zero = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")
    assert {k.split(".")[0] for k in fresh} == {"conv_in", "time_embedding", "controlnet_cond_embedding",
                                                "down_blocks", "mid_block", "controlnet_down_blocks",
                                                "controlnet_mid_block"}
    assert all(not v.any() for k, v in fresh.items() if k.startswith(zero))
    assert np.std(fresh["down_blocks.1.attentions.0.proj_in.weight"]) > 0.01


def test_condition_must_encode_to_latent_size():
    *_, controlnet = models("sdxl_landmarks")
    inputs = make_inputs("sdxl_landmarks")
    with pytest.raises(ValueError, match="pixel resolution"):
        jax.eval_shape(lambda: controlnet(inputs["sample"], 1, inputs["encoder_hidden_states"],
                                          inputs["controlnet_cond"][:, :64, :64], **{
                                              "added_cond_kwargs": inputs["added_cond_kwargs"]}))


def test_gradient_checkpointing_remats_encoder_blocks():
    *_, controlnet = models("sd15_mask")
    inputs = make_inputs("sd15_mask")
    graphdef, state = nnx.split(controlnet)
    model = nnx.merge(graphdef, state)
    model.enable_gradient_checkpointing()
    remat_graph, _ = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(remat_graph, s)(
        inputs["sample"], 1, inputs["encoder_hidden_states"], inputs["controlnet_cond"]))(state)
    assert sum(e.primitive.name == "remat2" for e in jaxpr.jaxpr.eqns) == len(controlnet.down_blocks) + 1


@pytest.mark.parametrize("override", [dict(global_pool_conditions=True), dict(mid_block_type=None),
                                      dict(controlnet_conditioning_channel_order="bgr"),
                                      dict(class_embed_type="projection")])
def test_unsupported_config_raises(override):
    unet_config = UNet2DConditionConfig.from_dict(TINY_SDXL)
    with pytest.raises(NotImplementedError, match=next(iter(override))):
        ControlNetConfig.from_unet_config(unet_config, **override)


def test_sdxl_parameter_count():
    unet_config = UNet2DConditionConfig.from_dict(load_config("configs/sdxl.py").model.unet.to_dict())
    config = ControlNetConfig.from_unet_config(unet_config, conditioning_channels=3)
    assert config.addition_embed_type == "text_time" and config.transformer_layers_per_block == (1, 2, 10)
    assert count_params(ControlNetModel.abstract(config)) == 1_251_014_160
