"""Checkpoint import on bad input: wrong shapes, missing / unexpected keys, missing files and folders, hub ids;
and a PyTorch ``.bin`` checkpoint loading exactly as its ``.safetensors`` twin."""

import json

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from safetensors.numpy import load_file, save_file

from realisid_jax.models.unet_2d_condition import UNet2DConditionModel
from realisid_jax.folders import HubIdError
from realisid_jax.loading.errors import CheckpointMismatchError
from realisid_jax.loading.pretrained import from_pretrained

torch.set_num_threads(1)

MICRO = dict(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
             attention_head_dim=2, cross_attention_dim=8, sample_size=8)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def torch_unet():
    torch.manual_seed(0)
    return TorchUNet(**MICRO)


@pytest.fixture
def folder(torch_unet, tmp_path):
    torch_unet.save_pretrained(tmp_path)
    return tmp_path


def edit_checkpoint(folder, edit):
    state = load_file(folder / WEIGHTS)
    edit(state)
    save_file(state, folder / WEIGHTS)


def test_wrong_shape_lists_key_and_both_shapes(folder):
    key = "down_blocks.1.attentions.0.proj_in.weight"
    edit_checkpoint(folder, lambda s: s.update({key: np.zeros((16, 16, 1, 2), np.float32)}))
    with pytest.raises(CheckpointMismatchError) as info:
        from_pretrained(UNet2DConditionModel, folder)
    message = str(info.value)
    assert key in message and "(16, 16, 1, 2)" in message and "(16, 16, 1, 1)" in message
    assert info.value.wrong_shape == [(key, (16, 16, 1, 2), (16, 16, 1, 1))]


def test_missing_and_unexpected_keys_are_listed(folder):
    missing, unexpected = "mid_block.resnets.1.conv2.bias", "mid_block.resnets.1.conv3.weight"

    def edit(state):
        state[unexpected] = state.pop(missing)

    edit_checkpoint(folder, edit)
    with pytest.raises(CheckpointMismatchError) as info:
        from_pretrained(UNet2DConditionModel, folder)
    assert info.value.missing == [missing] and info.value.unexpected == [unexpected]
    assert missing in str(info.value) and unexpected in str(info.value)


def test_config_for_another_architecture_is_a_mismatch(folder):
    # A checkpoint of one layout read with another's config: every affected key is reported at once.
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "use_linear_projection": True}))
    with pytest.raises(CheckpointMismatchError) as info:
        from_pretrained(UNet2DConditionModel, folder)
    assert {k for k, *_ in info.value.wrong_shape} >= {"down_blocks.1.attentions.0.proj_in.weight",
                                                        "up_blocks.0.attentions.0.proj_out.weight"}


def test_missing_weights_file(folder):
    (folder / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.bin") as info:
        from_pretrained(UNet2DConditionModel, folder)
    assert "config.json" in str(info.value)  # what the folder does hold


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(UNet2DConditionModel, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(UNet2DConditionModel, tmp_path)
    with pytest.raises(FileNotFoundError, match="unet"):
        from_pretrained(UNet2DConditionModel, tmp_path, subfolder="unet")


def test_hub_id_is_refused():
    with pytest.raises(HubIdError, match="huggingface-cli download"):
        from_pretrained(UNet2DConditionModel, "stabilityai/stable-diffusion-xl-base-1.0", subfolder="unet")


def test_bin_checkpoint_loads_like_safetensors(torch_unet, tmp_path):
    torch_unet.save_pretrained(tmp_path / "st")
    torch_unet.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    assert not (tmp_path / "bin" / WEIGHTS).exists()
    a = nnx.state(from_pretrained(UNet2DConditionModel, tmp_path / "st"), nnx.Param)
    b = nnx.state(from_pretrained(UNet2DConditionModel, tmp_path / "bin"), nnx.Param)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # Both match the PyTorch tensors (transposed to flax layout), not merely each other.
    kernel = np.asarray(nnx.state(from_pretrained(UNet2DConditionModel, tmp_path / "bin"))["conv_in"]["kernel"])
    np.testing.assert_array_equal(kernel, torch_unet.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0))


def test_pipeline_folder_with_subfolder(torch_unet, tmp_path):
    torch_unet.save_pretrained(tmp_path / "pipe" / "unet")
    model = from_pretrained(UNet2DConditionModel, tmp_path / "pipe", subfolder="unet")
    assert model.config.block_out_channels == (8, 16)
