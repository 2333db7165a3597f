"""``realisid convert`` and the orbax cache: round trip, sharded restore on a (2, 4, 1) mesh, config checks."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from tiny_sdxl import randomised

from realisid_jax.commands import convert as convert_command
from realisid_jax.config import load_config
from realisid_jax.realisid.components import random_components
from realisid_jax.models.unet_2d_condition import UNet2DConditionModel
from realisid_jax.sharding import DEFAULT_RULES, make_mesh, state_shardings
from realisid_jax.loading.orbax_cache import read_meta, save_converted
from realisid_jax.realisid.components import load_converted_components as load_converted
from realisid_jax.loading.pretrained import from_pretrained

CONFIG = load_config("configs/sdxl.py:tiny")


def _leaves(model):
    return jax.tree_util.tree_flatten_with_path(nnx.state(model).to_pure_dict())[0]


def _assert_models_equal(actual, expected):
    got, want = _leaves(actual), _leaves(expected)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    models = random_components(CONFIG, seed=3).named()
    # Zero-initialised ControlNet convs would let a wrong restore of them pass unnoticed.
    realisid = models["realisid"]
    params = nnx.state(realisid, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(params))))
    nnx.update(realisid, jax.tree.map(lambda v: v + 0.01 * jax.random.normal(next(keys), v.shape, v.dtype), params))
    path = save_converted(tmp_path_factory.mktemp("cache") / "tiny", models, CONFIG)
    return path, models


def test_round_trip_bit_exact(cache):
    path, models = cache
    assert read_meta(path)["components"] == list(models)
    restored = load_converted(path, CONFIG)
    assert set(restored) == set(models)
    for name, model in models.items():
        _assert_models_equal(restored[name], model)


def test_sharded_restore_on_2x4x1_mesh(cache):
    path, models = cache
    mesh = make_mesh((2, 4, 1))
    restored = load_converted(path, CONFIG, mesh=mesh, components=["unet", "realisid"])
    sharded = 0
    for name in ("unet", "realisid"):
        _assert_models_equal(restored[name], models[name])
        state = nnx.state(restored[name])
        expected = state_shardings(state, mesh, DEFAULT_RULES)
        for (path_, variable), (_, sharding) in zip(nnx.to_flat_state(state), nnx.to_flat_state(expected)):
            array = variable.get_value()
            assert array.sharding.is_equivalent_to(sharding.get_value(), array.ndim), path_
            if array.addressable_shards[0].data.shape != array.shape:
                sharded += 1
    assert sharded > 50  # fsdp-sharded kernels really arrive split over devices


def test_restore_casts_to_config_param_dtype(cache):
    path, models = cache
    config = load_config("configs/sdxl.py:tiny", ["frozen_param_dtype=bfloat16", "dtype=bfloat16"])
    unet = load_converted(path, config, components=["unet"])["unet"]
    kernel = unet.conv_in.kernel.get_value()
    assert kernel.dtype == jnp.bfloat16
    expected = np.asarray(models["unet"].conv_in.kernel.get_value(), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(kernel), expected)


def test_other_architecture_is_refused(cache):
    path, _ = cache
    config = load_config("configs/sdxl.py:tiny", ["model.unet.layers_per_block=1"])
    with pytest.raises(ValueError, match="differently"):
        load_converted(path, config, components=["unet"])
    with pytest.raises(KeyError, match="text_encoder_3"):
        load_converted(path, CONFIG, components=["text_encoder_3"])
    with pytest.raises(FileNotFoundError, match="not a converted-weights cache"):
        load_converted(path.parent, CONFIG)


def test_convert_command_from_pipeline_folder(tmp_path, capsys):
    m = CONFIG.model
    torch.manual_seed(0)
    base = tmp_path / "pipeline"
    randomised(TorchUNet(**dict(m.unet))).save_pretrained(base / "unet")
    randomised(TorchVAE(**dict(m.vae))).save_pretrained(base / "vae")
    text_config = transformers.CLIPTextConfig(**dict(m.text_encoder))
    transformers.CLIPTextModel(text_config).save_pretrained(base / "text_encoder")
    transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**dict(m.text_encoder_2))).save_pretrained(
        base / "text_encoder_2")
    parser = argparse.ArgumentParser()
    convert_command.register(parser.add_subparsers())
    args = parser.parse_args(["convert", "--config", "configs/sdxl.py:tiny", "--base", str(base),
                              "--out", str(tmp_path / "out")])
    args.config_overrides = []
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "not in the sources" in printed and "image_encoder" in printed
    restored = load_converted(tmp_path / "out", CONFIG)
    assert sorted(restored) == ["realisid", "text_encoder", "text_encoder_2", "unet", "vae"]
    _assert_models_equal(restored["unet"], from_pretrained(UNet2DConditionModel, base / "unet"))
    # Branches initialised from the UNet (ControlNet from_unet): their encoder copies the UNet's.
    np.testing.assert_array_equal(np.asarray(restored["realisid"].global_branch.conv_in.kernel.get_value()),
                                  np.asarray(restored["unet"].conv_in.kernel.get_value()))
