"""The glyph world's scorer, its pixel measures, the manifest format and the image encoder's training (tiny runs)."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from realisid_jax.glyphs import identity_encoder, manifest, scorer, world


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A scorer after a short training (pool of 80 scenes, 100 steps of 32 crops)."""
    workdir = tmp_path_factory.mktemp("scorer")
    model, metrics = scorer.train_scorer(seed=0, num_steps=100, batch_size=32, num_scenes=80, eval_per_size=0,
                                         workdir=workdir, progress=False)
    return model, metrics, workdir


def test_scorer_on_heldout_renders_far_above_chance(trained):
    model, metrics, _ = trained
    assert metrics["train_accuracy"] > 0.3
    rng = np.random.default_rng([5, 5])
    scenes = [scorer.sized_scene(rng, world.IDENTITIES[i % 24], 1 / 3) for i in range(48)]
    rows = [scorer.score_image(model, s.image, s.spec) for s in scenes]
    assert np.mean([r["persons"][0]["correct"] for r in rows]) > 4 / len(world.IDENTITIES)
    assert all(r["background_correct"] for r in rows)


def test_scorer_save_load_round_trip(trained, tmp_path):
    model, _, _ = trained
    model.save(tmp_path)
    loaded = scorer.Scorer.load(tmp_path)
    ink = np.random.default_rng(0).random((3, scorer.INPUT_SIZE, scorer.INPUT_SIZE), np.float32)
    np.testing.assert_array_equal(model.predict(ink)[0], loaded.predict(ink)[0])
    assert loaded.config == model.config


def test_scorer_resumes_from_its_checkpoint(trained):
    _, _, workdir = trained
    _, metrics = scorer.train_scorer(seed=0, num_steps=100, batch_size=32, num_scenes=2, eval_per_size=0,
                                     workdir=workdir, progress=False)
    assert metrics["train_accuracy"] is None  # nothing left to train


def test_derotated_crop_undoes_the_rotation():
    glyph = world.render_glyph("L", "dejavu-sans", (0, 0, 0), 100, 0.0, (255, 255, 255))
    canvas = np.full((200, 200, 3), 255, np.uint8)
    rotated = np.asarray(Image.fromarray(glyph.image).rotate(30, resample=Image.Resampling.BICUBIC, expand=True,
                                                             fillcolor=(255, 255, 255)))
    h = rotated.shape[0]
    canvas[100 - h // 2:100 - h // 2 + h, 100 - h // 2:100 - h // 2 + h] = rotated
    box = (100 - h / 2, 100 - h / 2, 100 - h / 2 + h, 100 - h / 2 + h)
    back = scorer.derotated_crop(canvas, box, 30, size=64, margin=1.0)
    expected = scorer.derotated_crop(glyph.image, (0, 0, 100, 100), 0, size=64, margin=1.0)
    ink_back, ink_expected = back.min(-1) < 128, expected.min(-1) < 128
    assert (ink_back & ink_expected).sum() / (ink_back | ink_expected).sum() > 0.8


def test_ink_box_iou_and_background():
    image = np.zeros((100, 100, 3), np.uint8)
    image[:] = world.BACKGROUNDS["teal"]
    image[20:60, 30:50] = (250, 250, 250)  # ink: 20 x 40
    image[90:95, 90:95] = (250, 250, 250)  # a distractor outside the margin
    image[62:66, 30:34] = (250, 250, 250)  # a separate component in the margin, not touching the box
    background = scorer.border_colour(image)
    assert scorer.nearest_background(background) == "teal"
    assert scorer.ink_box_iou(image, (20, 20, 60, 60), background) == pytest.approx(20 * 40 / 1600)
    assert scorer.ink_box_iou(image, (30, 20, 50, 60), background) == pytest.approx(1.0)
    assert scorer.ink_box_iou(image, (0, 70, 10, 80), background) == 0.0
    assert scorer.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


def test_score_image_on_two_persons(trained):
    model, _, _ = trained
    scene = world.scene(3, 0, num_persons=2)
    row = scorer.score_image(model, scene.image, scene.spec)
    assert len(row["persons"]) == 2 and {"both_correct", "swapped"} <= set(row)
    assert row["background"] == scene.spec.background
    for person in row["persons"]:
        assert 0.2 < person["iou"] <= 1.0 and 0 <= person["rotation_error_deg"] <= 180
    with pytest.raises(ValueError, match="RGB"):
        scorer.score_image(model, scene.image[..., 0], scene.spec)


def _records(folder, count=3):
    records = []
    for i in range(count):
        scene = world.scene(9, i, num_persons=1 + i % 2)
        Image.fromarray(scene.image).save(folder / f"{i}.png")
        records.append(manifest.record_of(scene.spec, image=f"{i}.png", variant="renders" if i else "other",
                                          references=[f"refs/{p.identity}.png" for p in scene.spec.persons]))
    return records


def test_manifest_round_trip_and_scoring(trained, tmp_path):
    model, _, _ = trained
    records = _records(tmp_path)
    path = manifest.write_manifest(tmp_path, records)
    assert path.name == manifest.MANIFEST_NAME and manifest.read_manifest(path) == records
    rows = manifest.score_manifest(model, path)
    assert [r["image"] for r in rows] == ["0.png", "1.png", "2.png"]
    summary = manifest.summarize(rows)
    assert summary["images"] == 3 and summary["background_accuracy"] == 1.0
    assert summary["two_person_images"] == 1 and set(summary["variants"]) == {"renders", "other"}
    assert sum(b["persons"] for b in summary["buckets"].values()) == 4
    assert manifest.box_bucket((0, 0, 26, 26), 256, 256) == "1/10"
    assert manifest.box_bucket((0, 0, 120, 120), 256, 256) == "1/2"


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("background"), "missing field"),
    (lambda r: r.update(background="mauve"), "unknown background"),
    (lambda r: r["persons"][0].update(identity="O"), "persons\\[0\\]: unknown identity"),
    (lambda r: r["persons"][0].update(box=[10, 10, 5, 20]), "empty"),
    (lambda r: r["persons"][0].update(box=[1, 2, 3]), "4 numbers"),
    (lambda r: r.update(height="256"), "wrong type"),
])
def test_manifest_errors_name_the_line(tmp_path, edit, message):
    records = _records(tmp_path, count=2)
    bad = records[1].to_json()
    edit(bad)
    path = tmp_path / "manifest.jsonl"
    path.write_text(json.dumps(records[0].to_json()) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(manifest.ManifestError, match=f"manifest.jsonl:2: .*{message}"):
        manifest.read_manifest(path)


def test_manifest_rejects_bad_json_and_wrong_sizes(trained, tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(manifest.ManifestError, match="manifest.jsonl:1: not JSON"):
        manifest.read_manifest(path)
    record = dataclasses.replace(_records(tmp_path, count=1)[0], height=128)
    manifest.write_manifest(path, [record])
    with pytest.raises(manifest.ManifestError, match="record says 256x128"):
        manifest.score_manifest(trained[0], path)


def test_identity_encoder_trains_and_probes(tmp_path):
    from realisid_jax.config import load_config

    config = load_config("configs/sdxl.py:glyphs")
    options = identity_encoder.TrainOptions(pool_per_identity=2, checkpoint_every=2)
    encoder, metrics = identity_encoder.train_identity_encoder(config, num_steps=3, batch_size=8, workdir=tmp_path,
                                                               options=options, progress=False)
    assert np.isfinite(metrics["train_loss"])
    _, resumed = identity_encoder.train_identity_encoder(config, num_steps=3, batch_size=8, workdir=tmp_path,
                                                         options=options, progress=False)
    assert resumed["train_loss"] is None  # the finished run is restored, not repeated
    probe = identity_encoder.linear_probe_accuracy(encoder, fit_per_identity=2, test_per_identity=1)
    assert 0 <= probe["heldout_accuracy"] <= 1 and set(probe["heldout_per_style"]) == set(world.HELDOUT_STYLES)


def test_logistic_regression_separates_separable_classes():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(50, 4)) + 4 * np.eye(4)[k] for k in range(3)])
    y = np.repeat(np.arange(3), 50)
    w, b, mean, std = identity_encoder.fit_logistic_regression(x, y, 3)
    assert ((((x - mean) / std) @ w + b).argmax(1) == y).mean() > 0.95
