"""Single-file SD 1.5 / SDXL checkpoints in the original Stability layout: tiny random diffusers/transformers
models are written into one ``.safetensors`` with a diffusers -> LDM mapping written here (checked against
diffusers' own LDM -> diffusers conversion), loaded with ``load_single_file``, and compared output by output."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.loaders import single_file_utils as sfu
from flax import nnx
from safetensors.torch import save_file
from tiny_sdxl import randomised

from realisid_jax.commands.convert import load_base
from realisid_jax.config import load_config
from realisid_jax.loading.torch_state import export_torch_state
from realisid_jax.loading.errors import CheckpointMismatchError
from realisid_jax.loading.single_file import detect_components, load_single_file

SDXL = load_config("configs/sdxl.py:tiny")
SD15 = load_config("configs/sdxl.py:tiny")
SD15.model.unet = dict(
    in_channels=4, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
    cross_attention_dim=32, use_linear_projection=False, norm_num_groups=8, sample_size=32)
SD15.model.vae = {**SDXL.model.vae, "layers_per_block": 2}
SD15.model.text_encoder_2 = None

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_to_ldm(sd: dict, cfg: dict) -> dict:
    """diffusers UNet keys -> LDM ``UNetModel`` keys, by index arithmetic (L = layers_per_block)."""
    n, step = len(cfg["block_out_channels"]), cfg["layers_per_block"] + 1
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        if module in top:
            out[f"{top[module]}.{leaf}"] = value
            continue
        m = re.fullmatch(r"(down|up|mid)_blocks?\.?(\d*)\.?(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)",
                         key)
        kind, block, part, j, rest = m.groups()
        block, j = int(block or 0), int(j)
        if part == "resnets":
            name, _, tail = rest.partition(".")
            rest = f"{UNET_RESNET[name]}.{tail}"
        if kind == "mid":
            out[f"middle_block.{2 * j if part == 'resnets' else 1}.{rest}"] = value
        elif kind == "down":
            index = 1 + block * step + (step - 1 if part == "downsamplers" else j)
            sub = {"resnets": "0", "attentions": "1", "downsamplers": "0.op"}[part]
            out[f"input_blocks.{index}.{sub}.{rest.removeprefix('conv.')}"] = value
        else:
            attn = cfg["up_block_types"][block].startswith("CrossAttn")
            index = block * step + (step - 1 if part == "upsamplers" else j)
            sub = {"resnets": "0", "attentions": "1", "upsamplers": "2" if attn else "1"}[part]
            out[f"output_blocks.{index}.{sub}.{rest}"] = value
    assert n == len(cfg["up_block_types"])
    return out


def _vae_to_ldm(sd: dict, cfg: dict) -> dict:
    n = len(cfg["block_out_channels"])
    out = {}
    for key, value in sd.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample",
                     new)
        new = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", new)
        if "mid_block.attentions.0." in new:
            module, _, leaf = new.partition("mid_block.attentions.0.")[2].rpartition(".")
            new = new.partition("mid_block")[0] + f"mid.attn_1.{VAE_ATTN[module]}.{leaf}"
            value = value[:, :, None, None] if value.ndim == 2 else value
        out[new] = value
    return out


def _open_clip_to_ldm(sd: dict) -> dict:
    out = {"logit_scale": torch.tensor(2.6592)}
    layers = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for key, value in sd.items():
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m and m[2] in layers:
            out[f"transformer.resblocks.{m[1]}.{layers[m[2]]}.{m[3]}"] = value
        elif m and m[2] == "self_attn.q_proj":
            qkv = [sd[f"text_model.encoder.layers.{m[1]}.self_attn.{p}_proj.{m[3]}"] for p in "qkv"]
            out[f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"] = torch.cat(qkv)
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = sd["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = sd["text_model.final_layer_norm.bias"]
    out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    return out


def _prefixed(prefix, sd):
    return {prefix + k: v.contiguous() for k, v in sd.items()}


def _same_state(converted: dict, reference: dict):
    assert sorted(converted) == sorted(reference)
    for k, v in reference.items():
        torch.testing.assert_close(converted[k].reshape(v.shape), v, rtol=0, atol=0)


def _assert_close(actual, reference, rel=1e-4):
    reference = np.asarray(reference, np.float32)
    err = float(np.max(np.abs(np.asarray(actual, np.float32) - reference)))
    assert err <= rel * max(1.0, float(np.max(np.abs(reference)))), f"max abs error {err:.3g}"


def _jit_call(model, *args, **kwargs):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda st, a, kw: nnx.merge(graphdef, st)(*a, **kw))(state, args, kwargs)


def _write_checkpoint(config, path):
    """Random torch models of ``config`` saved as one LDM-layout file; diffusers' converter must recover each."""
    m = config.model
    torch.manual_seed(0)
    unet = randomised(TorchUNet(**dict(m.unet)))
    vae = randomised(TorchVAE(**dict(m.vae)))
    te = randomised(transformers.CLIPTextModel(transformers.CLIPTextConfig(**dict(m.text_encoder))))
    te_sd = {f"text_model.{k}": v for k, v in te.state_dict().items()}  # the prefixed layout SD files have
    sdxl = m.text_encoder_2 is not None
    te_prefix = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    checkpoint = {**_prefixed("model.diffusion_model.", _unet_to_ldm(unet.state_dict(), dict(m.unet))),
                  **_prefixed("first_stage_model.", _vae_to_ldm(vae.state_dict(), dict(m.vae))),
                  **_prefixed(te_prefix, te_sd), "alphas_cumprod": torch.linspace(1, 0, 10)}
    _same_state(sfu.convert_ldm_unet_checkpoint(checkpoint, dict(m.unet)), unet.state_dict())
    _same_state(sfu.convert_ldm_vae_checkpoint(checkpoint, dict(m.vae)), vae.state_dict())
    _same_state(sfu.convert_ldm_clip_checkpoint(checkpoint), te_sd)
    models = dict(unet=unet, vae=vae, text_encoder=te)
    if sdxl:
        te2_config = transformers.CLIPTextConfig(**dict(m.text_encoder_2))
        te2 = randomised(transformers.CLIPTextModelWithProjection(te2_config))
        checkpoint.update(_prefixed("conditioner.embedders.1.model.", _open_clip_to_ldm(te2.state_dict())))
        _same_state(sfu.convert_open_clip_checkpoint(te2, checkpoint, prefix="conditioner.embedders.1.model."),
                    te2.state_dict())
        models["text_encoder_2"] = te2
    save_file(checkpoint, str(path))
    return models


@pytest.fixture(scope="module", params=["sdxl", "sd15"])
def loaded(request, tmp_path_factory):
    config = SDXL if request.param == "sdxl" else SD15
    path = tmp_path_factory.mktemp(request.param) / "model.safetensors"
    reference = _write_checkpoint(config, path)
    return config, path, reference, load_single_file(path, config)


def test_detects_components(loaded):
    config, path, reference, _ = loaded
    assert set(detect_components(path)) == set(reference)


def test_unet_parity(loaded):
    config, _, reference, ours = loaded
    if config is SDXL:
        pytest.skip("one compiled UNet per file (2 shared cores): SD 1.5's has more blocks and conv projections; "
                    "SDXL's tensors are checked bit-exactly above")
    rng = np.random.default_rng(0)
    cfg = config.model.unet
    sample = rng.standard_normal((2, 4, 16, 24)).astype(np.float32)
    context = rng.standard_normal((2, 7, cfg["cross_attention_dim"])).astype(np.float32)
    t = np.array([10, 700])
    torch_added, added = None, {}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        added = {"text_embeds": rng.standard_normal((2, pooled)).astype(np.float32),
                 "time_ids": np.tile(np.array([[256, 384, 0, 0, 256, 384]], np.float32), (2, 1))}
        torch_added = {k: torch.from_numpy(v) for k, v in added.items()}
        added = {"added_cond_kwargs": {k: jnp.asarray(v) for k, v in added.items()}}
    with torch.no_grad():
        expected = reference["unet"](torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(context),
                                     added_cond_kwargs=torch_added).sample.permute(0, 2, 3, 1).numpy()
    actual = _jit_call(ours["unet"], jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(context),
                       **added)
    _assert_close(actual, expected)


def test_every_tensor_bit_exact(loaded):
    """Each loaded parameter equals its torch counterpart exactly (the outputs below check the layouts)."""
    _, _, reference, ours = loaded
    for name, model in ours.items():
        exported = export_torch_state(nnx.state(model, nnx.Param))
        expected = reference[name].state_dict()
        if name == "text_encoder":
            expected = {f"text_model.{k}": v for k, v in expected.items()}
        assert sorted(exported) == sorted(expected), name
        for key, value in expected.items():
            np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=f"{name}: {key}")


def test_vae_parity(loaded):
    config, _, reference, ours = loaded
    if config is SD15:
        pytest.skip("same VAE code path as SDXL's; its SD 1.5 tensors are checked bit-exactly above")
    image = np.random.default_rng(1).uniform(-1, 1, (1, 3, 32, 48)).astype(np.float32)
    with torch.no_grad():
        expected = reference["vae"](torch.from_numpy(image)).sample.permute(0, 2, 3, 1).numpy()
    _assert_close(_jit_call(ours["vae"], jnp.asarray(image.transpose(0, 2, 3, 1))), expected)


@pytest.mark.parametrize("name", ["text_encoder", "text_encoder_2"])
def test_text_encoder_parity(loaded, name):
    _, _, reference, ours = loaded
    if name not in reference:
        pytest.skip("SD 1.5 has one text encoder")
    ids = np.array([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70], np.int64)
    with torch.no_grad():
        expected = reference[name](torch.from_numpy(ids))
    actual = _jit_call(ours[name], jnp.asarray(ids))
    _assert_close(actual.last_hidden_state, expected.last_hidden_state.numpy())
    if name == "text_encoder_2":
        _assert_close(actual.text_embeds, expected.text_embeds.numpy())


def test_mismatch_lists_ldm_keys(loaded, tmp_path):
    config, path, _, _ = loaded
    from safetensors.torch import load_file

    state = load_file(str(path))
    state["model.diffusion_model.input_blocks.99.0.in_layers.0.weight"] = torch.zeros(3)
    del state["model.diffusion_model.out.2.bias"]
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(CheckpointMismatchError) as info:
        load_single_file(broken, config, components=["unet"])
    assert info.value.missing == ["conv_out.bias"]
    assert info.value.unexpected == ["input_blocks.99.0.in_layers.0.weight"]  # not covered: kept as named


def test_missing_component_and_convert_base(loaded, tmp_path):
    """``realisid convert --base FILE --image-encoder DIR``: the file's models and the separate encoder; the
    file's VAE equals the same VAE saved as a diffusers folder."""
    config, path, reference, ours = loaded
    with pytest.raises(ValueError, match="holds no 'image_encoder'"):
        load_single_file(path, config, components=["image_encoder"])
    encoder_config = transformers.CLIPVisionConfig(**dict(config.model.image_encoder))
    transformers.CLIPVisionModelWithProjection(encoder_config).save_pretrained(tmp_path / "encoder")
    assert set(load_base(str(path), config, image_encoder=str(tmp_path / "encoder"))) == {*reference, "image_encoder"}
    reference["vae"].save_pretrained(tmp_path / "vae")
    vae = load_base(str(tmp_path), config)["vae"]
    np.testing.assert_array_equal(np.asarray(vae.decoder.conv_out.kernel[...]),
                                  np.asarray(ours["vae"].decoder.conv_out.kernel[...]))
