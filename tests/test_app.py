"""``realisid app``'s request handler (no browser): bad requests, no recompilation, PNG records that reproduce."""

import argparse

import jax
import numpy as np
import pytest
from PIL import Image
from skimage import data

from realisid_jax.app.metadata import MetadataError, read_generation
from realisid_jax.app.request import PersonRequest, Request, RequestError, Studio
from realisid_jax.cli import main
from realisid_jax.commands.weights import build_pipeline
from realisid_jax.config import load_config

CONFIG_FILE = "configs/sdxl.py:tiny"
SIZE = 128
ASTRONAUT = PersonRequest(data.astronaut(), (0.5, 0.3, 0.25, 0.375))  # a 32x48 px box: squared by the pipeline


@pytest.fixture(scope="module")
def studio(tmp_path_factory, face_models):
    """The app's studio exactly as ``realisid app`` builds it (embedded default: random tiny weights)."""
    config = load_config(CONFIG_FILE)
    args = argparse.Namespace(base=None, branches=None, image_encoder=None)
    return Studio(build_pipeline(config, args), config_name=CONFIG_FILE, out_dir=tmp_path_factory.mktemp("app"))


def _request(persons=(ASTRONAUT,), **kw):
    fields = dict(prompt="an astronaut", persons=persons, height=SIZE, width=SIZE, steps=2, scheduler="ddim",
                  text_guidance_scale=7.5, id_guidance_scale=5.0, id_start_fraction=0.5, seed=3)
    return Request(**{**fields, **kw})


class _Lowerings:
    """Counts programs lowered to MLIR (each cache miss of a jit, persistent cache or not)."""

    EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._on_event)

    def _on_event(self, event, duration, **kw):
        self.count += event == self.EVENT


@pytest.mark.parametrize("request_kw, message", [
    (dict(height=100), "multiples of 64"),
    (dict(width=2 * SIZE, persons=(PersonRequest(data.astronaut(), (0.5, 0.5, 0.75, 0.25)),)), "does not fit"),
    (dict(persons=(ASTRONAUT,) * 5), "maximum is 4"),
    (dict(persons=(ASTRONAUT, PersonRequest(data.coffee(), (0.2, 0.7, 0.25, 0.25)))), "person 2: no usable face"),
    (dict(persons=(PersonRequest(data.astronaut(), (0.5, 0.5, 0.25, 0.25), pose=data.coffee()),)),
     "person 1: no usable face in the pose photo"),
    (dict(persons=(PersonRequest(None, (0.5, 0.5, 0.25, 0.25)), PersonRequest(data.astronaut(), (2, 2, 0.25, 0.25)))),
     "^person 2: box 240,240,272,272 lies wholly outside the 128x128 image"),
    (dict(scheduler="plms"), "unknown scheduler"),
    (dict(steps=0), "at least 1"),
])
def test_bad_requests_are_one_line_messages(studio, request_kw, message):
    with pytest.raises(RequestError, match=message):
        studio.generate(_request(**request_kw))


def test_face_and_layout_previews(studio):
    face, message = studio.face_preview(data.astronaut())
    assert message == "" and face.shape == data.astronaut().shape and not np.array_equal(face, data.astronaut())
    none, message = studio.face_preview(data.coffee())
    assert none is None and "no face" in message
    layout, message = studio.layout_preview([ASTRONAUT], SIZE, 2 * SIZE)
    assert message == "" and layout.shape == (192, 384, 3) and layout.max() > 200  # the box is drawn
    empty, _ = studio.layout_preview([PersonRequest(None, (0.5, 0.5, 0.25, 0.25))], SIZE, 2 * SIZE)
    assert empty.max() < 100  # no photo, no person, no box
    _, message = studio.layout_preview([ASTRONAUT], 100, SIZE)
    assert "multiples of 64" in message
    _, message = studio.layout_preview([PersonRequest(data.astronaut(), (2, 2, 0.25, 0.25))], SIZE, SIZE)
    assert message == "person 1: box 240,240,272,272 lies wholly outside the 128x128 image (pixels, x0,y0,x1,y1); " \
                      "place it on the image"  # what Generate answers


def test_second_request_does_not_recompile_and_pngs_reproduce(studio, tmp_path, capsys):
    first = studio.generate(_request())
    image = np.asarray(Image.open(first.images[0]))
    assert image.shape == (SIZE, SIZE, 3) and first.sheet.is_file()
    record = read_generation(first.images[0])
    # The box as the pipeline used it: 48x48 px (square by the longer edge) around the set centre.
    np.testing.assert_allclose(record.boxes, [(40, 14.4, 88, 62.4)], atol=1e-3)
    assert (record.prompt, record.seed, record.steps, record.config) == ("an astronaut", 3, 2, CONFIG_FILE)
    np.testing.assert_array_equal(record.references[0], data.astronaut())

    with _Lowerings() as lowerings:  # new seed, prompt, box and scales: all data to the compiled loop
        second = studio.generate(_request(prompt="a portrait", seed=None, text_guidance_scale=3.0,
                                          persons=(PersonRequest(data.astronaut(), (0.3, 0.6, 0.2, 0.2)),)))
    assert lowerings.count == 0
    assert not np.array_equal(np.asarray(Image.open(second.images[0])), image)

    assert main(["sample", "--from-png", str(first.images[0]), "--out", str(tmp_path)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "image_000.png")), image)
    assert read_generation(tmp_path / "image_000.png").boxes == record.boxes


def test_from_png_without_a_record_is_a_clear_error(tmp_path, capsys):
    Image.fromarray(data.astronaut()).save(tmp_path / "plain.png")
    assert main(["sample", "--from-png", str(tmp_path / "plain.png"), "--out", str(tmp_path / "out")]) == 2
    assert "no realisid generation record" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(MetadataError):
        read_generation(tmp_path / "plain.png")


@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("192.168.1.5", True), ("myhost", True),
                                          ("127.0.0.1", False), ("localhost", False), ("::1", False)])
def test_host_other_than_loopback_warns(monkeypatch, capsys, host, warned):
    def no_models(*_args, **_kwargs):
        raise AssertionError("reached the model build")

    monkeypatch.setattr("realisid_jax.commands.app.build_pipeline", no_models)
    monkeypatch.setattr("realisid_jax.commands.app.enable_compilation_cache", lambda: None)
    with pytest.raises(AssertionError, match="reached the model build"):  # warned before any model loads
        main(["app", "--host", host])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ([f"warning: --host {host}: anyone who can reach this machine on that network can use the "
                         "page (it has no login); the default 127.0.0.1 serves this machine only"] if warned else [])
