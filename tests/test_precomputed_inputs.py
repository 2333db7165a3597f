"""Precomputed training inputs (``prepare-data --precompute``, ``train.precomputed_inputs``) on the reduced tiny SDXL
config at 64 px: the stored fields are what the raw step computes, one step from them equals one raw step with the
same key, the step's frozen state holds no encoder, mismatches are named, and the CLI writes them from a diffusers
checkpoint (checked against diffusers itself)."""

import functools
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
from flax import nnx

from realisid_jax.cli import main as cli_main
from realisid_jax.config import load_config
from realisid_jax.data.input_pipeline import DecodeExample, make_train_iterator
from realisid_jax.data.precompute import InputEncoder
from realisid_jax.commands import prepare_data as prepare_command
from realisid_jax.data.precomputed import (EMPTY_PROMPT_FILE, STORAGE_DTYPES, PrecomputedInputsError, batch_fields,
                                           example_shapes)
from realisid_jax.data.prepare import PrepareOptions, prepare_dataset
from realisid_jax.data.sample_data import write_sample_source
from realisid_jax.models.modeling_utils import count_params, init_rngs
from realisid_jax.realisid.components import Components, abstract_components
from realisid_jax.sharding import make_mesh
from realisid_jax.schedulers import SDXL_SCHEDULER_CONFIG, DDPMScheduler
from realisid_jax.text.tokenizer import offline_clip_tokenizer, tokenize
from realisid_jax.training.batches import batch_shapes, host_batch, landmark_pixels
from realisid_jax.training.memory import lower_train_step, train_step_memory
from realisid_jax.training.state import build_models, split_components, training_components, without_encoders
from realisid_jax.training.step import StepSettings, compute_loss, text_conditioning
from realisid_jax.training.trainer import Trainer, train
from realisid_jax.realisid.objective import condition_dropout
from test_memory_plan import MICRO
from tiny_sdxl import build_tiny_sdxl

ROOT = Path(__file__).resolve().parents[1]
CONFIG = f"{ROOT / 'configs' / 'sdxl.py'}:tiny"
RESOLUTION, BATCH = 64, 4
OVERRIDES = [f"train.resolution={RESOLUTION}", f"train.batch_size={BATCH}", "train.sample_every=0",
             # Every kind of dropout row is likely in a batch of 4 (the test picks a key that gives all four).
             "train.drop_id_prob=0.25", "train.drop_text_prob=0.25", "train.drop_both_prob=0.25", *MICRO]
OPTIONS = PrepareOptions(resolution=RESOLUTION, reference_size=224, min_face_px=8)
ENCODER_NAMES = ("vae", "text_encoder", "text_encoder_2", "image_encoder")


def config(*extra):
    return load_config(CONFIG, [*OVERRIDES, *extra])


def random_weights(cfg, seed=0) -> Components:
    """Every model of ``cfg`` with random weights drawn on the host (kernels ~ N(0, 1/fan_in), norm scales near 1):
    seconds, where compiling the initialisers takes a minute on 2 cores. The branches' zero convolutions are
    random too, so the loss depends on every input."""
    graphdef, state = nnx.split(abstract_components(cfg))
    rng = np.random.default_rng(seed)

    def value(path, x):
        name = str(path[-2])
        if "scale" in name:
            return (1 + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
        fan_in = math.prod(x.shape[:-1]) if len(x.shape) > 1 else 100
        return (rng.standard_normal(x.shape) / math.sqrt(fan_in)).astype(x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(value, state))


@pytest.fixture(scope="module")
def models():
    return random_weights(config())


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """12 captioned real faces and their raw prepared dataset (its face-analysis cache is reused below)."""
    root = tmp_path_factory.mktemp("precomputed")
    write_sample_source(root / "src", 12)
    summary = prepare_dataset(root / "src", root / "raw", options=OPTIONS)
    assert summary["written"] >= 8, summary
    return root


def precompute(source, models, name, dtype):
    """``source``'s dataset with the precomputed inputs of ``models`` in ``dtype`` (the analysis cache copied)."""
    out = source / name
    shutil.copytree(source / "raw" / "_work", out / "_work")
    encoder = InputEncoder(models, [offline_clip_tokenizer()] * 2, dtype=dtype, batch_size=BATCH)
    summary = prepare_dataset(source / "src", out, options=OPTIONS, encoder=encoder)
    assert summary["analysed"] == 0 and summary["precomputed"]["dtype"] == dtype, summary
    return out


@pytest.fixture(scope="module")
def stored16(source, models):
    return precompute(source, models, "float16", "float16")


@pytest.fixture(scope="module")
def stored32(source, models):
    return precompute(source, models, "float32", "float32")


def records(data):
    source = tfds.data_source("realisid_faces", split="train", data_dir=str(data))
    return [source[i] for i in range(len(source))]


# -------------------------------------------------------------------------------------- (a) stored = raw


def test_stored_fields_are_what_the_raw_step_computes(stored16, models):
    cfg = config()
    rows = records(stored16)
    shapes = example_shapes(cfg)
    assert {name: rows[0][name].shape for name in shapes} == shapes
    assert all(rows[0][name].dtype == np.float16 for name in shapes)

    # The raw step's own computations, on the pixels its input pipeline reads.
    decoded = [DecodeExample(RESOLUTION).map(r) for r in rows]
    pixels = jnp.asarray(np.stack([d["pixel_values"] for d in decoded]))
    reference = jnp.asarray(np.stack([d["reference"] for d in decoded]))
    tokenizer = offline_clip_tokenizer()
    ids = [jnp.asarray(tokenize(tokenizer, [d["input_text"] for d in decoded]))] * 2
    settings = StepSettings.from_config(cfg, [tokenize(tokenizer, "")[0]] * 2)
    no_text = jnp.zeros(len(rows), bool)
    posterior = jax.jit(lambda x: models.vae.encode(x))(pixels)
    embeds, pooled = jax.jit(lambda i: text_conditioning(models, i, no_text, settings))(ids)
    features = jax.jit(lambda x: models.image_encoder(x).hidden_states[-2])(reference)
    raw = {"latent_mean": posterior.mean, "latent_logvar": posterior.logvar, "prompt_embeds": embeds,
           "pooled_prompt_embeds": pooled, "image_features": features}
    for name, expected in raw.items():
        stored = np.stack([r[name] for r in rows]).astype(np.float32)
        expected = np.asarray(expected)
        # float16: 11 significant bits, relative rounding 2^-11 of each value.
        np.testing.assert_allclose(stored, expected, rtol=2**-10, atol=1e-6 * np.abs(expected).max(), err_msg=name)
        assert np.abs(expected).max() > 0.1, name

    with np.load(stored16 / "realisid_faces" / "1.0.0" / EMPTY_PROMPT_FILE) as empty:
        dropped, dropped_pooled = jax.jit(lambda i: text_conditioning(models, i, jnp.ones(1, bool), settings))(
            [jnp.asarray(tokenize(tokenizer, "a caption"))] * 2)
        np.testing.assert_allclose(empty["prompt_embeds"], np.asarray(dropped[0]), rtol=2**-10, atol=1e-5)
        np.testing.assert_allclose(empty["pooled_prompt_embeds"], np.asarray(dropped_pooled[0]), rtol=2**-10,
                                   atol=1e-5)

    meta = json.loads((stored16 / "realisid_faces" / "1.0.0" / "metadata.json").read_text())["precomputed"]
    assert meta["dtype"] == "float16" and {k: tuple(v) for k, v in meta["fields"].items()} == shapes
    assert meta["bytes_per_example"] == 2 * sum(math.prod(s) for s in shapes.values())


# ------------------------------------------------------------------------------ (b) same step, same key


def _batches(data, cfg_raw, cfg_pre):
    """The same 4 examples as a raw and as a precomputed device batch (host arrays)."""
    raw = next(make_train_iterator(data, batch_size=BATCH, seed=0, resolution=RESOLUTION))
    fields = batch_fields(cfg_pre, "empty_prompt")
    pre = next(make_train_iterator(data, batch_size=BATCH, seed=0, resolution=RESOLUTION,
                                   precomputed=example_shapes(cfg_pre), empty_prompt=True))
    tokenizers = [offline_clip_tokenizer()] * 2
    px = landmark_pixels(cfg_raw)
    raw = host_batch(raw, tokenizers, px)
    pre = host_batch(pre, (), px, resolution=RESOLUTION, precomputed=tuple(fields))
    np.testing.assert_array_equal(raw["face_box"], pre["face_box"])
    assert set(raw) == set(batch_shapes(cfg_raw)) and set(pre) == set(batch_shapes(cfg_pre))
    return raw, pre


def _rng_with_every_dropout(cfg):
    """A train-state key whose first step's condition dropout (``train_step``: ``fold_in(rng, 0)``, then
    ``compute_loss``'s split) has a kept row, an ID-only, a text-only and a both-dropped row."""
    t = cfg.train
    for seed in range(1000):
        key = jax.random.PRNGKey(seed)
        k_drop = jax.random.split(jax.random.fold_in(key, 0), 4)[3]
        no_id, no_text = condition_dropout(k_drop, BATCH, t.drop_id_prob, t.drop_text_prob, t.drop_both_prob)
        if len({(bool(a), bool(b)) for a, b in zip(no_id, no_text)}) == 4:
            return key
    raise AssertionError("no key drops every way")


def test_the_step_from_precomputed_inputs_equals_the_raw_step(stored32, models):
    """The step's loss (Eq. 7: the forward pass training differentiates) from float32-stored inputs equals the raw
    step's for the same key, with rows of every dropout kind; and it depends on the stored inputs."""
    cfg_raw, cfg_pre = config("train.remat=False"), config("train.remat=False", "train.precomputed_inputs=True")
    raw_batch, pre_batch = _batches(stored32, cfg_raw, cfg_pre)
    key = jax.random.fold_in(_rng_with_every_dropout(cfg_raw), 0)
    scheduler = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    empty_ids = [tokenize(offline_clip_tokenizer(), "")[0]] * 2

    def loss_of(cfg, components):
        graphdef, params, rest = split_components(components, cfg)
        loss = jax.jit(functools.partial(compute_loss, graphdef=graphdef, scheduler=scheduler,
                                         settings=StepSettings.from_config(cfg, empty_ids)))
        return lambda batch: loss(params["realisid"].to_pure_dict(), rest, {k: jnp.asarray(v) for k, v in
                                                                             batch.items()}, key)

    raw_loss, raw_aux = loss_of(cfg_raw, models)(raw_batch)
    pre_components = without_encoders(nnx.merge(*nnx.split(models)), cfg_pre)  # a copy: ``models`` keeps its own
    pre_step = loss_of(cfg_pre, pre_components)
    pre_loss, pre_aux = pre_step(pre_batch)
    np.testing.assert_allclose(float(pre_loss), float(raw_loss), rtol=1e-5)
    for name in ("mse", "face_loss"):
        np.testing.assert_allclose(float(pre_aux[name]), float(raw_aux[name]), rtol=1e-5, err_msg=name)
    # Not vacuous: the stored image features and the stored empty prompt (text-dropped rows) both count.
    for name in ("image_features", "empty_prompt_embeds"):
        changed = dict(pre_batch, **{name: pre_batch[name] + 1.0})
        assert abs(float(pre_step(changed)[0]) - float(pre_loss)) > 1e-4 * float(pre_loss), name


# ------------------------------------------------------------------------- (c) no encoder in the step


def _nbytes(tree):
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_the_precomputed_step_holds_and_plans_no_encoder():
    cfg_raw, cfg_pre = config(), config("train.precomputed_inputs=True")

    def frozen(cfg):
        return nnx.eval_shape(lambda: split_components(training_components(cfg, init_rngs(0)), cfg))[2]

    raw, pre = frozen(cfg_raw), frozen(cfg_pre)
    assert set(ENCODER_NAMES) <= set(raw) and not set(ENCODER_NAMES) & set(pre), (set(raw), set(pre))
    assert _nbytes(pre) == _nbytes(raw["unet"]) < 0.5 * _nbytes(raw)

    # The memory plan's step (lowered for 8 simulated devices, FSDP; compiling it is the slow test below).
    plans = {name: lower_train_step(cfg, 8, resolution=RESOLUTION) for name, cfg in (("raw", cfg_raw),
                                                                                    ("pre", cfg_pre))}
    assert plans["pre"].frozen_params == count_params(abstract_components(cfg_pre).unet) < plans["raw"].frozen_params
    assert plans["pre"].trainable_params == plans["raw"].trainable_params
    assert plans["pre"].state_bytes < plans["raw"].state_bytes
    assert set(plans["pre"].batch) == {"face_box", "landmark_image", "time_ids", *batch_fields(cfg_pre, "empty_prompt")}
    assert {"pixel_values", "input_ids", "input_ids_2", "reference"} <= set(plans["raw"].batch)
    assert {k: v.shape[1:] for k, v in plans["pre"].batch.items() if k in example_shapes(cfg_pre)} == \
        example_shapes(cfg_pre)


@pytest.mark.slow
def test_memory_plan_of_the_precomputed_step():
    """XLA's figures for the tiny step on 8 simulated devices (~2.5 min each here): the precomputed step holds
    fewer bytes per device and computes fewer FLOPs."""
    raw = train_step_memory(config(), 8, resolution=RESOLUTION)
    pre = train_step_memory(config("train.precomputed_inputs=True"), 8, resolution=RESOLUTION)
    assert pre.frozen_params < raw.frozen_params and pre.state_bytes < raw.state_bytes
    assert pre.argument_bytes < raw.argument_bytes and pre.flops < raw.flops
    assert pre.alias_bytes == raw.alias_bytes > 0  # the same donated train state


# ---------------------------------------------------------------------------------- (d) mismatches


def test_mismatches_are_named(source, stored16, models, tmp_path, capsys):
    cfg = config("train.precomputed_inputs=True")
    shapes = example_shapes(cfg)
    args = dict(batch_size=BATCH, seed=0, resolution=RESOLUTION)
    with pytest.raises(PrecomputedInputsError, match="has no precomputed latent_mean, latent_logvar, prompt_embeds, "
                                                     "image_features, pooled_prompt_embeds"):
        make_train_iterator(source / "raw", precomputed=shapes, **args)
    # ... checked by `train` before any model is built.
    with pytest.raises(PrecomputedInputsError, match="has no precomputed latent_mean"):
        train(cfg, tmp_path / "run", data_dir=source / "raw")
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(PrecomputedInputsError, match=r"latent_mean is \(8, 8, 4\), the config needs \(16, 16, 4\) "
                                                     r"\(prepared for another train.resolution"):
        make_train_iterator(stored16, precomputed=example_shapes(config("train.resolution=128")), **args)
    broken = tmp_path / "no_empty_prompt"
    shutil.copytree(stored16 / "realisid_faces", broken / "realisid_faces")
    (broken / "realisid_faces" / "1.0.0" / EMPTY_PROMPT_FILE).unlink()
    make_train_iterator(broken, precomputed=shapes, **args)  # "zeros" needs no empty prompt
    with pytest.raises(PrecomputedInputsError, match=f"has no {EMPTY_PROMPT_FILE}"):
        make_train_iterator(broken, precomputed=shapes, empty_prompt=True, **args)
    with pytest.raises(PrecomputedInputsError, match="training samples need: set --config.train.sample_every=0"):
        Trainer(config("train.precomputed_inputs=True", "train.sample_every=10"))

    # The other way round: a raw config reads a precomputed dataset as raw, with a note.
    next(make_train_iterator(stored16, **args))
    assert "holds precomputed inputs; --config.train.precomputed_inputs=True" in capsys.readouterr().err

    # The step itself, at trace time: a raw batch for components without encoders, or half a precomputed batch.
    graphdef, params, rest = nnx.eval_shape(lambda: split_components(training_components(cfg, init_rngs(0)), cfg))
    loss = functools.partial(compute_loss, graphdef=graphdef, settings=StepSettings.from_config(cfg, []),
                             scheduler=DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG))
    key = jax.random.PRNGKey(0)
    spec = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in batch_shapes(config()).items()}
    with pytest.raises(PrecomputedInputsError, match="hold no VAE / text / image encoder .* lacks the precomputed "
                                                     "latent_mean, latent_logvar"):
        jax.eval_shape(loss, params["realisid"].to_pure_dict(), rest, spec, key)
    spec = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in batch_shapes(cfg).items() if k != "image_features"}
    with pytest.raises(PrecomputedInputsError, match="but not image_features"):
        jax.eval_shape(loss, params["realisid"].to_pure_dict(), rest, spec, key)


# ------------------------------------------------------------------------------------- (e) the CLI


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


def test_prepare_data_precompute_cli_matches_diffusers(source, tiny_checkpoint, tmp_path, capsys):
    pipeline, image_encoder, pipe, torch_encoder = tiny_checkpoint
    out = tmp_path / "data"
    shutil.copytree(source / "raw" / "_work", out / "_work")
    common = ["prepare-data", "--src", str(source / "src"), "--out", str(out), "--config", CONFIG, "--resolution",
              str(RESOLUTION), "--min-face-px", "8", "--workers", "0"]
    assert prepare_command._STORAGE_DTYPES == STORAGE_DTYPES  # its --precompute-dtype choices
    assert cli_main([*common, "--precompute"]) == 2
    assert "error: --precompute needs --base" in capsys.readouterr().err
    assert cli_main([*common, "--base", str(pipeline)]) == 2
    assert "error: --base is only read with --precompute" in capsys.readouterr().err
    assert cli_main([*common, "--precompute", "--base", str(pipeline), "--image-encoder", str(image_encoder)]) == 0
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["analysed"] == 0 and summary["precomputed"]["base"] == str(pipeline), summary

    # The stored fields are diffusers' / transformers' own outputs for the same pixels and captions (float16).
    rows = records(out)
    shapes = example_shapes(load_config(CONFIG, [f"train.resolution={RESOLUTION}"]))
    assert {name: rows[0][name].shape for name in shapes} == shapes
    decoded = [DecodeExample(RESOLUTION).map(r) for r in rows]
    nchw = lambda key: torch.from_numpy(np.stack([d[key] for d in decoded])).permute(0, 3, 1, 2)  # noqa: E731
    with torch.no_grad():
        posterior = pipe.vae.encode(nchw("pixel_values")).latent_dist
        embeds, _, pooled, _ = pipe.encode_prompt([d["input_text"] for d in decoded], device="cpu",
                                                  do_classifier_free_guidance=False)
        empty, _, empty_pooled, _ = pipe.encode_prompt("", device="cpu", do_classifier_free_guidance=False)
        features = torch_encoder(pixel_values=nchw("reference"), output_hidden_states=True).hidden_states[-2]
    nhwc = {"latent_mean": posterior.mean, "latent_logvar": posterior.logvar}
    expected = {**{k: v.permute(0, 2, 3, 1) for k, v in nhwc.items()}, "prompt_embeds": embeds,
                "pooled_prompt_embeds": pooled, "image_features": features}
    for name, want in expected.items():
        want = want.numpy()
        np.testing.assert_allclose(np.stack([r[name] for r in rows]).astype(np.float32), want, rtol=2**-9,
                                   atol=2e-4 * np.abs(want).max(), err_msg=name)
    with np.load(out / "realisid_faces" / "1.0.0" / EMPTY_PROMPT_FILE) as stored:
        np.testing.assert_allclose(stored["prompt_embeds"], empty[0].numpy(), rtol=2**-9, atol=1e-3)
        np.testing.assert_allclose(stored["pooled_prompt_embeds"], empty_pooled[0].numpy(), rtol=2**-9, atol=1e-3)

    # Training from them loads the base's UNet only (no --image-encoder needed).
    cfg = load_config(CONFIG, [f"train.resolution={RESOLUTION}", "train.precomputed_inputs=True"])
    setup, _, _ = build_models(cfg, make_mesh((1, 1, 1), jax.devices()[:1]), tuple(tuple(r) for r in cfg.mesh.rules),
                               pretrained=pipeline)
    assert set(setup.frozen_inputs) == {"unet"}


@pytest.mark.slow
def test_trainer_from_precomputed_inputs_matches_the_raw_trainer(source, tmp_path):
    """End to end (~10 min here): the same random weights trained 3 steps by the raw ``Trainer`` and by one from
    float32 inputs precomputed with its encoders (input pipeline, device batches, sharded jitted step) lose the
    same."""
    run = ["mesh.shape=(8,1,1)", "train.batch_size=8", "train.num_steps=3", "train.log_every=1"]
    raw = Trainer(config(*run))
    components = nnx.merge(raw.setup.graphdef, {"realisid": raw.initial_state()["params"]}, raw.setup.frozen_inputs)
    out = tmp_path / "data"
    shutil.copytree(source / "raw" / "_work", out / "_work")
    prepare_dataset(source / "src", out, options=OPTIONS,
                    encoder=InputEncoder(components, raw.tokenizers, dtype="float32", batch_size=BATCH))
    raw_losses = raw.fit(tmp_path / "raw", data_dir=out).losses
    pre = Trainer(config(*run, "train.precomputed_inputs=True"))
    assert set(pre.setup.frozen_inputs) == {"unet"}
    np.testing.assert_allclose(pre.fit(tmp_path / "pre", data_dir=out).losses, raw_losses, rtol=1e-5)
