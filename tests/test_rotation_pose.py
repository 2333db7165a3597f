"""A square subject's pose given as a rotation: ``realisid sample --rotation DEG`` and the app's rotation field become
``Person.landmarks`` (the ``"square"`` layout's keypoints), refused where they cannot apply, and recorded in the PNG so
that ``--from-png`` reproduces the image.

The CLI checks run in-process and stop before any model is built (a spy on ``prepare_conditions`` reads c_pe); one
test samples (glyphs config, random weights, 64x64, 2 steps) through the app and re-runs it with ``--from-png``.
"""

import argparse
import types

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from realisid_jax.app.metadata import Generation, png_info, read_generation, recorded_persons
from realisid_jax.app.request import PersonRequest, Request, RequestError, Studio
from realisid_jax.cli import main
from realisid_jax.commands.weights import build_pipeline
from realisid_jax.config import load_config
from realisid_jax.face.draw import draw_landmark_image, square_keypoints
from realisid_jax.glyphs import world
from realisid_jax.realisid import pipeline as pipeline_module

GLYPHS = "configs/sdxl.py:glyphs"
SIZE = 64


class _Stop(Exception):
    """Raised in place of the model build: the CLI's input handling is done."""


@pytest.fixture
def glyph_png(tmp_path):
    path = tmp_path / "glyph.png"
    Image.fromarray(world.reference(0, 0, "A").image).save(path)
    return path


@pytest.fixture
def prepared(monkeypatch):
    """The ``PersonConditions`` the CLI prepared; the model build is replaced by ``_Stop``."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    def no_models(*_args, **_kwargs):
        raise _Stop

    real = pipeline_module.prepare_conditions
    monkeypatch.setattr(pipeline_module, "prepare_conditions", spy)
    monkeypatch.setattr("realisid_jax.commands.sample.build_pipeline", no_models)
    return seen


def _sample(*extra):
    return main(["sample", "--config", GLYPHS, "--height", str(SIZE), "--width", str(SIZE), *extra])


def test_rotation_sets_the_landmark_image(glyph_png, tmp_path, prepared):
    face = ["--face", str(glyph_png), "--box", "8,8,40,40"]
    with pytest.raises(_Stop):
        _sample(*face, *face, "--rotation", "30", "--rotation", "-", "--out", str(tmp_path / "out"))
    conditions = prepared[0]
    size = conditions.landmark_images.shape[1]
    want = draw_landmark_image(square_keypoints(30), size, layout="square").astype(np.float32) / 255
    np.testing.assert_array_equal(conditions.landmark_images[0], want)
    own = draw_landmark_image(conditions.references[1].landmarks, size, layout="square").astype(np.float32) / 255
    np.testing.assert_array_equal(conditions.landmark_images[1], own)  # '-': the reference's own, upright
    assert not np.array_equal(conditions.landmark_images[0], conditions.landmark_images[1])


@pytest.mark.parametrize("extra, message", [
    (["--config", "configs/sdxl.py:tiny", "--rotation", "30"], "landmark_layout is 'square'"),
    (["--rotation", "30", "--rotation", "10"], "1 --face but 2 --rotation"),
    (["--rotation", "nan"], "--rotation 'nan' is not finite"),
    (["--rotation", "inf"], "--rotation 'inf' is not finite"),
    (["--rotation", "ten"], "--rotation 'ten' is not a number"),
    (["--rotation", "30", "--pose", "POSE"], "person 1 has both --pose and --rotation"),
])
def test_bad_rotations_are_one_line_errors(glyph_png, tmp_path, capsys, prepared, extra, message):
    extra = [str(glyph_png) if v == "POSE" else v for v in extra]
    out = tmp_path / "out"
    assert _sample("--face", str(glyph_png), "--box", "8,8,40,40", "--out", str(out), *extra) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists() and not prepared


def _record(**kw) -> Generation:
    fields = dict(prompt="a glyph", negative_prompt=None, seed=1, boxes=((8.0, 8.0, 40.0, 40.0),), steps=2,
                  scheduler="ddim", text_guidance_scale=5.0, id_guidance_scale=3.0, id_start_fraction=0.0,
                  height=SIZE, width=SIZE, num_images=1, config=GLYPHS, references=(world.reference(0, 0, "A").image,))
    return Generation(**{**fields, **kw})


def test_record_carries_rotations_and_old_records_read_without(tmp_path):
    path = tmp_path / "new.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_info(_record(rotations=(-12.5,))))
    record = read_generation(path)
    assert record.rotations == (-12.5,)
    np.testing.assert_array_equal(recorded_persons(record)[0].landmarks, square_keypoints(-12.5))

    old = PngImagePlugin.PngInfo()  # a record written before rotations were recorded
    old.chunks = [c for c in png_info(_record()).chunks if not c[1].startswith(b"realisid:rotations\0")]
    Image.new("RGB", (8, 8)).save(tmp_path / "old.png", pnginfo=old)
    record = read_generation(tmp_path / "old.png")
    assert "realisid:rotations" not in Image.open(tmp_path / "old.png").text
    assert record.rotations == () and recorded_persons(record)[0].landmarks is None


def test_app_refuses_rotations_it_cannot_use(glyph_png):
    def studio(config):
        stub = types.SimpleNamespace(config=load_config(config), scheduler=types.SimpleNamespace(config={}))
        return Studio(stub, config_name=config, out_dir="unused")

    reference = world.reference(0, 0, "A").image
    request = dict(prompt="a glyph", height=SIZE, width=SIZE, steps=2, scheduler="ddim", text_guidance_scale=5.0,
                   id_guidance_scale=3.0, id_start_fraction=0.0)
    assert studio(GLYPHS).takes_rotation and not studio("configs/sdxl.py:tiny").takes_rotation
    for config, person, message in [
        ("configs/sdxl.py:tiny", PersonRequest(reference, (0.5, 0.5, 0.5, 0.5), rotation=30.0), "'square'"),
        (GLYPHS, PersonRequest(reference, (0.5, 0.5, 0.5, 0.5), rotation=float("nan")), "finite"),
        (GLYPHS, PersonRequest(reference, (0.5, 0.5, 0.5, 0.5), reference, 30.0), "not both"),
    ]:
        with pytest.raises(RequestError, match=f"person 1: .*{message}"):
            studio(config).generate(Request(persons=(person,), **request))


def test_app_rotation_is_recorded_and_reproduced_by_from_png(tmp_path):
    config = load_config(GLYPHS)
    args = argparse.Namespace(base=None, branches=None, image_encoder=None)
    studio = Studio(build_pipeline(config, args), config_name=GLYPHS, out_dir=tmp_path / "app")
    person = PersonRequest(world.reference(0, 0, "A").image, (0.5, 0.5, 0.5, 0.5), rotation=30.0)
    result = studio.generate(Request("a glyph", (person,), SIZE, SIZE, 2, "ddim", 5.0, 3.0, 0.0, seed=1))
    assert read_generation(result.images[0]).rotations == (30.0,)

    out = tmp_path / "again"
    assert main(["sample", "--from-png", str(result.images[0]), "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out / "image_000.png")),
                                  np.asarray(Image.open(result.images[0])))
    # The same c_pe (the sheet's middle column): the re-run turned the recorded rotation into the same landmarks.
    np.testing.assert_array_equal(np.asarray(Image.open(out / "conditioning_sheet.png")),
                                  np.asarray(Image.open(result.sheet)))
    assert read_generation(out / "image_000.png").rotations == (30.0,)  # the CLI's record carries it too
