"""`realisid glyphs prepare` end to end at a few steps per part: the run folder's base pipeline loads through the
same loaders as an SDXL folder and samples through `realisid sample`; a re-run skips the finished parts."""

import json

import numpy as np
import pytest

from realisid_jax.cli import main

FEW_STEPS = [f"--config.glyphs.{k}={v}" for k, v in dict(
    data_count=16, eval_scenes=2, base_scenes=4, vae_steps=2, vae_batch_size=2, encoder_steps=2,
    encoder_batch_size=8, unet_steps=2, unet_batch_size=2, unet_pool=8, scorer_steps=2).items()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("glyph_run")
    assert main(["glyphs", "prepare", "--out", str(out), *FEW_STEPS]) == 0
    return out


def test_stage_writes_every_part_and_the_report(run):
    for part in ("data", "vae", "image_encoder", "unet", "scorer", "base_scenes"):
        assert (run / "parts" / f"{part}.json").is_file()
    report = json.loads((run / "report.json").read_text())
    assert np.isfinite(report["vae"]["psnr_db"]) and 0 <= report["image_encoder"]["heldout_accuracy"] <= 1
    assert report["base_scenes"]["images"] == 4
    assert "VAE PSNR" in (run / "report.md").read_text()
    lines = (run / "base_scenes" / "manifest.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    assert {"image", "variant", "caption", "background", "height", "width", "persons"} <= set(record)
    assert (run / "base_scenes" / record["image"]).is_file()


def test_rerun_skips_finished_parts(run, capsys):
    before = (run / "report.json").read_text()
    assert main(["glyphs", "prepare", "--out", str(run), *FEW_STEPS]) == 0
    assert capsys.readouterr().out.count("skipped") == 6
    assert json.loads((run / "report.json").read_text()) == json.loads(before)


def test_base_folder_loads_like_sdxl_and_samples(run, tmp_path):
    from realisid_jax.config import load_config
    from realisid_jax.loading.pipeline_folder import load_model_folders, load_pipeline_folder

    base = load_pipeline_folder(run / "base")
    assert base.image_encoder is not None and base.text_encoder_2 is not None
    config = load_config("configs/sdxl.py:glyphs")
    models = load_model_folders(run / "base", config, image_encoder=run / "base" / "image_encoder")
    assert set(models) >= {"unet", "vae", "text_encoder", "text_encoder_2", "image_encoder"}
    from PIL import Image

    from realisid_jax.glyphs import world

    reference = tmp_path / "K.png"
    Image.fromarray(world.reference(0, 0, "K", styles=world.HELDOUT_STYLES).image).save(reference)
    out = tmp_path / "out"
    assert main(["sample", "--config", "configs/sdxl.py:glyphs", "--base", str(run / "base"), "--image-encoder",
                 str(run / "base" / "image_encoder"), "--face", str(reference), "--box", "32,32,96,96",
                 "--out", str(out), "--prompt", "a glyph on a teal background",
                 "--config.sampling.num_inference_steps=2"]) == 0
    assert (out / "image_000.png").is_file() and (out / "conditioning_sheet.png").is_file()


def test_unknown_part_is_refused(tmp_path, capsys):
    assert main(["glyphs", "prepare", "--out", str(tmp_path), "--parts", "vae,nope"]) == 2
    assert "unknown nope" in capsys.readouterr().err
    assert not (tmp_path / "parts").exists()


def test_base_schedule_is_zero_terminal_snr_v_prediction(run):
    from realisid_jax.realisid.components import base_scheduler_config
    from realisid_jax.training.trainer import noise_schedule

    stored = base_scheduler_config(run / "base")
    assert stored["prediction_type"] == "v_prediction" and stored["rescale_betas_zero_snr"]
    assert noise_schedule(run / "base").alphas_cumprod[-1] == 0  # what `realisid train` reads


def test_branches_train_on_precomputed_world_data_and_sample(run, tmp_path):
    """The real path of RealisID in the world: make-data --precompute, train, export, sample with branches."""
    data, work, branches = tmp_path / "data", tmp_path / "work", tmp_path / "branches"
    assert main(["glyphs", "make-data", "--out", str(data), "--count", "8", "--precompute", "--base",
                 str(run / "base")]) == 0
    assert main(["train", "--config", "configs/sdxl.py:glyphs", "--workdir", str(work), "--data", str(data),
                 "--pretrained", str(run / "base"), "--image-encoder", str(run / "base" / "image_encoder"),
                 "--config.train.precomputed_inputs=True", "--config.train.num_steps=2",
                 "--config.train.batch_size=2", "--config.train.checkpoint_every=2"]) == 0
    assert main(["export", "--workdir", str(work), "--out", str(branches)]) == 0
    from PIL import Image

    from realisid_jax.glyphs import world

    reference = tmp_path / "7.png"
    Image.fromarray(world.reference(0, 1, "7", styles=world.HELDOUT_STYLES).image).save(reference)
    out = tmp_path / "out"
    assert main(["sample", "--config", "configs/sdxl.py:glyphs", "--base", str(run / "base"), "--image-encoder",
                 str(run / "base" / "image_encoder"), "--branches", str(branches), "--face", str(reference),
                 "--box", "40,40,104,104", "--rotation", "15", "--out", str(out),
                 "--prompt", "a glyph on a red background", "--config.sampling.num_inference_steps=2"]) == 0
    assert (out / "image_000.png").is_file()


def test_make_data_precompute_needs_a_base(tmp_path, capsys):
    assert main(["glyphs", "make-data", "--out", str(tmp_path / "d"), "--count", "2", "--precompute"]) == 2
    assert "--precompute and --base go together" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
