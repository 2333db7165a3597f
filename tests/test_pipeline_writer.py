"""``save_pipeline_folder``: the project's Flax models of ``configs/sdxl.py:tiny`` (random, every parameter
perturbed) written as a diffusers SDXL pipeline folder, read by diffusers / transformers (same outputs) and by the
project's own loaders (same weights), and written again byte for byte."""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from realisid_jax.cli import main
from realisid_jax.config import load_config
from realisid_jax.loading.pipeline_folder import load_model_folders, load_pipeline_folder
from realisid_jax.loading.pipeline_writer import (SDXL_SCHEDULER_CONFIG, save_image_encoder, save_pipeline_folder,
                                                  save_transformers_model)
from realisid_jax.models.registry import dtypes, frozen_configs
from realisid_jax.text.tokenizer import load_tokenizer, standard_tokenizers, tokenize

CONFIG = load_config("configs/sdxl.py:tiny")
MODELS = ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder")


def _random_model(cls, cfg, seed: int, **dtype_kw) -> nnx.Module:
    """The model with host-drawn random parameters, none zero so parity can fail: kernels N(0, 1/fan_in), norm
    scales 1 + N(0, 0.01), the rest N(0, 0.01). Filled into the abstract model: building it eagerly compiles each
    initializer on its own (30 s for the five models). ``dtype_kw``: default the config's dtypes."""
    graphdef, state = nnx.split(cls.abstract(cfg, **(dtype_kw or dtypes(CONFIG))))
    rng = np.random.default_rng(seed)

    def draw(leaf: str, shape) -> np.ndarray:
        x = rng.standard_normal(shape, np.float32)
        if leaf == "kernel":
            return x / np.sqrt(np.prod(shape[:-1]))
        return 1 + 0.1 * x if leaf == "scale" else 0.1 * x

    return nnx.merge(graphdef, nnx.from_flat_state(
        [(path, v.replace(jnp.asarray(draw(str(path[-1]), v.shape), v.dtype)))
         for path, v in nnx.to_flat_state(state)]))


@pytest.fixture(scope="module")
def models() -> dict[str, nnx.Module]:
    return {name: _random_model(cls, cfg, seed=i)
            for i, (name, (cls, cfg)) in enumerate(frozen_configs(CONFIG).items())}


@pytest.fixture(scope="module")
def folder(models, tmp_path_factory):
    tokenizer, tokenizer_2 = standard_tokenizers(2)
    return save_pipeline_folder(tmp_path_factory.mktemp("written") / "pipeline", **models, tokenizer=tokenizer,
                                tokenizer_2=tokenizer_2, scheduler_config=SDXL_SCHEDULER_CONFIG)


def _flat(model: nnx.Module) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_weights(model, reference, name):
    ours, theirs = _flat(model), _flat(reference)
    assert ours.keys() == theirs.keys(), name
    for path, value in theirs.items():
        np.testing.assert_array_equal(ours[path], value, err_msg=f"{name} {path}")


def _jit(model: nnx.Module, fn):
    """``fn(model, *args)`` as split once + ``jax.jit`` with ``nnx.merge`` inside."""
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
    return lambda *args: compiled(state, *args)


def _assert_close(ours, theirs, name, tol=1e-4):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, name
    err = float(np.max(np.abs(ours - theirs)))
    assert err <= tol * max(1.0, float(np.max(np.abs(theirs)))), f"{name}: max abs error {err}"


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return np.moveaxis(t.detach().numpy(), 1, -1)


def _nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))


@pytest.fixture(scope="module")
def torch_models(folder) -> dict:
    """Each component loaded with its library's own ``from_pretrained``; no key may be missing or unexpected."""
    index = json.loads((folder / "model_index.json").read_text())
    loaded = {}
    for name in MODELS:
        library, class_name = index[name]
        cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
        model, info = cls.from_pretrained(folder / name, output_loading_info=True)
        problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
        assert not problems and not info.get("error_msgs"), f"{name}: {problems} {info.get('error_msgs')}"
        loaded[name] = model.eval()
    return loaded


def test_diffusers_reads_the_folder_as_an_sdxl_pipeline(folder):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    assert isinstance(pipe.image_encoder, transformers.CLIPVisionModelWithProjection)
    assert isinstance(pipe.text_encoder_2, transformers.CLIPTextModelWithProjection)
    assert [pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token] == ["<|endoftext|>", "!"]


def test_torch_and_jax_give_the_same_outputs(models, torch_models):
    rng = np.random.default_rng(0)
    cfg = CONFIG.model.unet
    sample = rng.standard_normal((1, 16, 16, cfg.in_channels), np.float32)
    context = rng.standard_normal((1, 7, cfg.cross_attention_dim), np.float32)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {"text_embeds": rng.standard_normal((1, pooled), np.float32),
             "time_ids": np.array([[128, 128, 0, 0, 128, 128]], np.float32)}
    ours = _jit(models["unet"], lambda m, x, c, a: m(x, 500, c, added_cond_kwargs=a))(sample, context, added)
    with torch.no_grad():
        theirs = torch_models["unet"](_nchw(sample), 500, torch.from_numpy(context),
                                      added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample
    _assert_close(ours, _nhwc(theirs), "unet")

    latents = rng.standard_normal((1, 8, 8, CONFIG.model.vae.latent_channels), np.float32)
    ours = _jit(models["vae"], lambda m, z: m.decode(z))(latents)
    with torch.no_grad():
        theirs = torch_models["vae"].decode(_nchw(latents)).sample
    _assert_close(ours, _nhwc(theirs), "vae decode")

    for name, tokenizer in zip(("text_encoder", "text_encoder_2"), standard_tokenizers(2)):
        ids = tokenize(tokenizer, ["a photo of a cat", "a glyph on a teal background"])
        out = _jit(models[name], lambda m, i: m(i))(ids)
        with torch.no_grad():
            ref = torch_models[name](torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
        _assert_close(out.hidden_states[-2], ref.hidden_states[-2], f"{name} hidden_states[-2]")
        _assert_close(out.last_hidden_state, ref.last_hidden_state, f"{name} last_hidden_state")
        pooled_name = "text_embeds" if name == "text_encoder_2" else "pooler_output"
        _assert_close(getattr(out, pooled_name), getattr(ref, pooled_name), f"{name} {pooled_name}")

    size = CONFIG.model.image_encoder.image_size
    pixels = rng.standard_normal((1, size, size, 3), np.float32)
    out = _jit(models["image_encoder"], lambda m, x: m(x))(pixels)
    with torch.no_grad():
        ref = torch_models["image_encoder"](_nchw(pixels), output_hidden_states=True)
    _assert_close(out.image_embeds, ref.image_embeds, "image_embeds")
    _assert_close(out.hidden_states[-2], ref.hidden_states[-2], "image hidden_states[-2]")


def test_the_files_are_those_diffusers_save_pretrained_writes(folder, tmp_path):
    """diffusers re-saving what it read gives the same file list, model_index.json, transformers config.json
    files, tensor names and values."""
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.save_pretrained(tmp_path)
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for name in ("model_index.json", "text_encoder/config.json", "text_encoder_2/config.json",
                 "image_encoder/config.json", "tokenizer_2/tokenizer_config.json"):
        theirs = json.loads((tmp_path / name).read_text())
        theirs.pop("_name_or_path", None)  # where diffusers read the pipeline from
        assert json.loads((folder / name).read_text()) == theirs, name
    for name in ("unet", "vae"):  # ours: the keys the project models; diffusers adds its defaults
        ours, theirs = (json.loads((f / name / "config.json").read_text()) for f in (folder, tmp_path))
        assert {k: theirs[k] for k in ours} == ours, name
    for path in files:
        if path.suffix == ".safetensors":
            ours, theirs = load_file(folder / path), load_file(tmp_path / path)
            assert ours.keys() == theirs.keys(), path
            for key in ours:
                np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{path} {key}")


def test_project_loaders_read_it_back_bit_exactly(models, folder):
    components = load_pipeline_folder(folder)
    assert set(components.models()) == set(MODELS)
    for name in MODELS:
        _assert_same_weights(getattr(components, name), models[name], f"load_pipeline_folder {name}")
    assert [t.pad_token for t in components.tokenizers] == ["<|endoftext|>", "!"]
    assert {k: v for k, v in components.scheduler_config.items() if k != "_diffusers_version"} == \
        SDXL_SCHEDULER_CONFIG
    loaded = load_model_folders(folder, CONFIG, image_encoder=folder / "image_encoder")
    assert set(loaded) == set(MODELS)
    for name in MODELS:
        _assert_same_weights(loaded[name], models[name], f"load_model_folders {name}")


def test_round_trip_writes_identical_files(folder, tmp_path):
    """Read back and written again: every file byte-identical, except that transformers lists the pad token "!"
    among tokenizer_2's added tokens once it was read from a folder; it tokenises the same."""
    components = load_pipeline_folder(folder)
    again = save_pipeline_folder(tmp_path / "again", **components.models(), tokenizer=components.tokenizer,
                                 tokenizer_2=components.tokenizer_2, scheduler_config=components.scheduler_config)
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for path in files:
        if path.name != "tokenizer.json":
            assert (folder / path).read_bytes() == (again / path).read_bytes(), path
    prompts = ["wow!! a glyph!", "a photo of a cat"]
    for name in ("tokenizer", "tokenizer_2"):
        ids = [tokenize(load_tokenizer(f, subfolder=name), prompts) for f in (folder, again)]
        np.testing.assert_array_equal(*ids, err_msg=name)


def test_standalone_image_encoder_and_bfloat16(models, tmp_path):
    encoder = save_image_encoder(tmp_path / "encoder", models["image_encoder"])
    loaded = load_model_folders(None, CONFIG, image_encoder=encoder)
    _assert_same_weights(loaded["image_encoder"], models["image_encoder"], "stand-alone image_encoder")
    cls, cfg = frozen_configs(CONFIG)["text_encoder_2"]
    bf16 = _random_model(cls, cfg, seed=0, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    save_transformers_model(tmp_path / "bf16", bf16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    model = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "bf16")
    assert model.text_projection.weight.dtype == torch.bfloat16


def test_wrong_classes_are_refused(models, tmp_path):
    tokenizer, tokenizer_2 = standard_tokenizers(2)
    swapped = {**models, "unet": models["vae"]}
    with pytest.raises(TypeError, match="unet is a AutoencoderKL, expected UNet2DConditionModel"):
        save_pipeline_folder(tmp_path, **swapped, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
    with pytest.raises(ValueError, match="_class_name"):
        save_pipeline_folder(tmp_path, **models, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                             scheduler_config={"beta_start": 0.00085})
    with pytest.raises(TypeError, match="CLIPVisionModelWithProjection"):
        save_image_encoder(tmp_path, models["text_encoder"])
    assert not any(tmp_path.iterdir())


def test_realisid_sample_runs_on_a_written_folder(folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["sample", "--config", "configs/sdxl.py:tiny", "--base", str(folder), "--image-encoder",
               str(folder / "image_encoder"), "--out", str(out), "--height", "128", "--width", "128",
               "--config.sampling.num_inference_steps=2"])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["conditioning_sheet.png", "image_000.png"]
