"""Every weights layout people download loads the same weights: plain, fp16-variant-only, sharded safetensors
and sharded ``.bin`` folders (diffusers' and transformers' names), written by ``save_pretrained``."""

import json
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from huggingface_hub import split_torch_state_dict_into_shards
from tiny_sdxl import TINY, build_tiny_sdxl, randomised

from realisid_jax.cli import main
from realisid_jax.commands.convert import convert
from realisid_jax.config import load_config
from realisid_jax.loading.orbax_cache import read_meta
from realisid_jax.loading.files import find_weights
from realisid_jax.loading.pretrained import from_pretrained
from realisid_jax.models.clip_text import CLIPTextModel
from realisid_jax.models.clip_vision import CLIPVisionModelWithProjection
from realisid_jax.models.unet_2d_condition import UNet2DConditionModel
from realisid_jax.realisid.pipeline import RealisIDPipeline
from realisid_jax.schedulers import SDXL_SCHEDULER_CONFIG, DDPMScheduler
from realisid_jax.text.tokenizer import standard_tokenizers, tokenize
from realisid_jax.training.trainer import noise_schedule, tokenizers

SHARD = "60KB"  # tiny models are ~0.5 MB: several shards each


def _save_bin_shards(model: torch.nn.Module, folder, weights_name: str) -> None:
    """Sharded ``.bin`` in transformers' layout (``pytorch_model-0000i-of-0000n.bin`` + ``.bin.index.json``):
    transformers 5 no longer writes ``.bin`` itself."""
    model.config.save_pretrained(folder)
    state = model.state_dict()
    split = split_torch_state_dict_into_shards(state, filename_pattern=weights_name.replace(".bin", "{suffix}.bin"),
                                               max_shard_size=SHARD)
    for file, keys in split.filename_to_tensors.items():
        torch.save({k: state[k].contiguous() for k in keys}, folder / file)
    index = {"metadata": {}, "weight_map": split.tensor_to_filename}
    (folder / f"{weights_name}.index.json").write_text(json.dumps(index))


def _layouts(model, root, weights_name, *, diffusers_bin: bool):
    """Folders of one model: plain, fp16 variant only, sharded safetensors, sharded .bin."""
    model.save_pretrained(root / "plain")
    model.save_pretrained(root / "sharded", max_shard_size=SHARD)
    if diffusers_bin:
        model.save_pretrained(root / "bin", max_shard_size=SHARD, safe_serialization=False)
    else:
        (root / "bin").mkdir()
        _save_bin_shards(model, root / "bin", weights_name)
    model.to(torch.float16).save_pretrained(root / "fp16", variant="fp16")  # last: the cast is lossy
    return {name: root / name for name in ("plain", "fp16", "sharded", "bin")}


def _weights(module) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.fixture(scope="module")
def unet_folders(tmp_path_factory):
    torch.manual_seed(0)
    unet = randomised(diffusers.UNet2DConditionModel(**TINY.unet.to_dict()))
    return _layouts(unet, tmp_path_factory.mktemp("unet"), "diffusion_pytorch_model.bin", diffusers_bin=True)


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    torch.manual_seed(0)
    encoder = randomised(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY.text_encoder.to_dict())))
    return _layouts(encoder, tmp_path_factory.mktemp("clip"), "pytorch_model.bin", diffusers_bin=False)


@pytest.mark.parametrize("model, folders", [(UNet2DConditionModel, "unet_folders"), (CLIPTextModel, "clip_folders")])
def test_every_layout_gives_the_plain_weights(request, capsys, model, folders):
    folders = request.getfixturevalue(folders)
    for layout in ("sharded", "bin"):
        assert len(find_weights(folders[layout], model.weights_names)) > 1, f"{layout}: expected several shards"
    plain = _weights(from_pretrained(model, folders["plain"]))
    for layout in ("sharded", "bin"):
        got = _weights(from_pretrained(model, folders[layout]))
        assert got.keys() == plain.keys()
        for key, value in plain.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{layout}: {key}")
    capsys.readouterr()
    fp16 = _weights(from_pretrained(model, folders["fp16"]))  # only variant files: picked with a note
    assert "only fp16 weights" in capsys.readouterr().out
    explicit = _weights(from_pretrained(model, folders["fp16"], variant="fp16"))
    for key, value in plain.items():
        assert fp16[key].dtype == np.float32  # cast per tensor into the config's param dtype
        np.testing.assert_array_equal(fp16[key], value.astype(np.float16).astype(np.float32), err_msg=key)
        np.testing.assert_array_equal(explicit[key], fp16[key])


def test_variant_errors_name_what_the_folder_holds(unet_folders, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"variants \['fp16'\]"):
        from_pretrained(UNet2DConditionModel, unet_folders["fp16"], variant="bf16")
    both = tmp_path / "both"
    shutil.copytree(unet_folders["fp16"], both)
    shutil.copy(both / "diffusion_pytorch_model.fp16.safetensors", both / "diffusion_pytorch_model.ema.safetensors")
    with pytest.raises(ValueError, match=r"\['ema', 'fp16'\]; choose one"):
        from_pretrained(UNet2DConditionModel, both)


def test_sample_on_an_fp16_variant_only_sdxl_folder(tmp_path, capsys):
    _, encoder, pipe, _ = build_tiny_sdxl(tmp_path / "plain")
    pipe.to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    names = {p.name for p in (tmp_path / "fp16" / "unet").iterdir()}
    assert "diffusion_pytorch_model.fp16.safetensors" in names and "diffusion_pytorch_model.safetensors" not in names
    out = tmp_path / "out"
    rc = main(["sample", "--config", "configs/sdxl.py:tiny", "--base", str(tmp_path / "fp16"), "--image-encoder",
               str(encoder), "--variant", "fp16", "--out", str(out), "--steps", "2", "--height", "128",
               "--width", "128"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "image_000.png").is_file()


def test_a_clip_model_folder_gives_its_vision_tower(tmp_path):
    torch.manual_seed(0)
    clip = randomised(transformers.CLIPModel(transformers.CLIPConfig(
        text_config=TINY.text_encoder.to_dict(), vision_config=TINY.image_encoder.to_dict(), projection_dim=24)))
    clip.save_pretrained(tmp_path / "clip")
    encoder = from_pretrained(CLIPVisionModelWithProjection, tmp_path / "clip")
    assert encoder.config.projection_dim == 24  # the CLIPModel's, not its vision_config's default
    torch_state = clip.state_dict()
    np.testing.assert_array_equal(np.asarray(encoder.visual_projection.kernel.get_value()),
                                  torch_state["visual_projection.weight"].numpy().T)
    pixels = np.random.default_rng(0).standard_normal((1, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        want = clip.visual_projection(clip.vision_model(torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output)
    np.testing.assert_allclose(np.asarray(encoder(pixels).image_embeds), want.numpy(), atol=1e-5, rtol=1e-4)


def test_an_image_encoder_of_another_kind_is_refused_by_name(clip_folders):
    with pytest.raises(ValueError, match="holds a CLIPTextModel; an image encoder must be a transformers "
                                         "CLIPVisionModelWithProjection or CLIPModel folder"):
        from_pretrained(CLIPVisionModelWithProjection, clip_folders["plain"])



def test_a_converted_cache_gives_its_folders_images(tmp_path):
    """``realisid convert`` records the folder's tokenizer pad tokens and scheduler config (the tiny folder's differ
    from SDXL's: pad ``<|endoftext|>``, no ``set_alpha_to_one``), so a pipeline from the cache equals the folder's
    in everything its images depend on: weights, scheduler, tokens."""
    folder, encoder, _, _ = build_tiny_sdxl(tmp_path)
    config = load_config("configs/sdxl.py:tiny")
    convert(config, str(folder), str(tmp_path / "cache"), image_encoder=str(encoder), log=lambda _: None)
    meta = read_meta(tmp_path / "cache")
    assert meta["pad_tokens"] == ["<|endoftext|>"] * 2 and "set_alpha_to_one" not in meta["scheduler_config"]
    assert [t.pad_token for t in tokenizers(config, tmp_path / "cache")] == meta["pad_tokens"]  # train --pretrained
    assert noise_schedule(tmp_path / "cache") == noise_schedule(folder)
    pipes = [RealisIDPipeline.from_pretrained(config, str(base), image_encoder=str(encoder))
             for base in (folder, tmp_path / "cache")]
    assert pipes[1].scheduler == pipes[0].scheduler
    assert [tokenize(t, "a")[0].tolist() for t in pipes[1].tokenizers] == \
        [tokenize(t, "a")[0].tolist() for t in pipes[0].tokenizers]
    want = nnx.to_flat_state(nnx.state(pipes[0].components))
    got = dict(nnx.to_flat_state(nnx.state(pipes[1].components)))
    assert set(got) == {path for path, _ in want}
    for path, value in want:
        assert got[path].dtype == value.dtype, path
        np.testing.assert_array_equal(np.asarray(got[path].get_value()), np.asarray(value.get_value()), err_msg=path)


def test_a_base_without_tokenizers_gets_sdxls():
    single_file = Path("model.safetensors")  # read by neither: a single file carries no tokenizer or scheduler
    assert [t.pad_token for t in tokenizers(load_config("configs/sdxl.py:tiny"), single_file)] == ["<|endoftext|>", "!"]
    assert noise_schedule(single_file) == DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    first, second = standard_tokenizers(2)
    assert tokenize(first, "a photo")[0, -1] == first.eos_token_id and tokenize(second, "a photo")[0, -1] == 0  # "!"
    assert [t.pad_token for t in standard_tokenizers(2, ["!", "!"])] == ["!", "!"]
    with pytest.raises(ValueError, match="not in the CLIP vocabulary"):
        standard_tokenizers(1, ["<pad>"])
