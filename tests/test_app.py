"""``realisid app``'s request handler (no browser): bad requests, no recompilation, PNG records that reproduce."""

import argparse
import functools
import io
import struct
import time
import zlib

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


# ------------------------------------------------------------------------------------------------ bad uploads
@functools.cache
def _bomb(side: int = 30000) -> bytes:
    """A side x side PNG of 110 KB: 1-bit grey rows, all zero, deflated (2.5 GiB as RGB)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(b"\0" * ((side // 8 + 1) * side), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def _bad_uploads(folder) -> dict:
    """A file that is not an image, a PNG cut short, a 30000x30000 PNG of 110 KB, and a 2 MB photo."""
    files = {"not_an_image": folder / "notes.png", "truncated": folder / "cut.png", "bomb": folder / "bomb.png",
             "too_large": folder / "big.bmp"}
    files["not_an_image"].write_text("these are notes, not a photo\n")
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="PNG")
    files["truncated"].write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])

    files["bomb"].write_bytes(_bomb())
    Image.fromarray(np.zeros((820, 820, 3), np.uint8)).save(files["too_large"])  # ~2 MB uncompressed
    return files


UPLOAD_MESSAGES = {
    "not_an_image": "notes.png is not an image (or not in a format this app reads",
    "truncated": "cut.png is cut short or damaged (OSError: image file is truncated",
    "bomb": "bomb.png is larger than this app reads (over 50,000,000 pixels); scale it down",
    "too_large": "big.bmp is 1.9 MB, over the upload limit of 1 MB",
}


def test_unreadable_uploads_are_one_line_messages(studio, tmp_path):
    from realisid_jax.app.request import UnreadablePhoto, read_photo

    files = _bad_uploads(tmp_path)
    assert files["bomb"].stat().st_size < 200_000
    for kind, path in files.items():
        photo = read_photo(path, max_bytes=2**20)
        assert isinstance(photo, UnreadablePhoto) and str(photo).startswith(UPLOAD_MESSAGES[kind]), (kind, photo)
        assert "\n" not in str(photo)
        assert studio.face_preview(photo) == (None, f"⚠️ {photo}")
        for slot in ("reference", "pose"):
            person = (PersonRequest(photo, ASTRONAUT.box) if slot == "reference"
                      else PersonRequest(data.astronaut(), ASTRONAUT.box, pose=photo))
            with pytest.raises(RequestError, match=f"^person 1: the {slot} photo {path.name} "):
                studio.generate(_request(persons=(person,)))
    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    np.testing.assert_array_equal(read_photo(tmp_path / "astronaut.png"), data.astronaut())


# ------------------------------------------------------------------------------------- the served page (HTTP)
USER = ("ann", "s3cret")


@pytest.fixture(scope="module")
def server(studio):
    """The page as ``realisid app --auth ann:s3cret --max-upload-mb 1`` serves it, on 127.0.0.1."""
    import socket

    from realisid_jax.app.page import build_page, launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page = build_page(studio, max_upload_mb=1)
    launch(page, port=port, out=str(studio.out_dir), auth=USER, max_upload_mb=1, block=False)
    yield f"http://127.0.0.1:{port}/"
    page.close()


def _client(url, **kw):
    from gradio_client import Client

    return Client(url, auth=USER, verbose=False, analytics_enabled=False, **kw)


def test_login_protects_the_page(server):
    import httpx
    from gradio_client import Client

    assert httpx.get(server + "config").status_code == 401
    assert httpx.post(server + "login", data={"username": USER[0], "password": "wrong"}).status_code == 400
    with pytest.raises(Exception, match="(?i)login|auth|401"):
        Client(server, verbose=False, analytics_enabled=False)
    with httpx.Client() as session:
        assert session.post(server + "login", data=dict(zip(("username", "password"), USER))).status_code == 200
        assert session.get(server + "config").status_code == 200


def test_bad_uploads_get_their_message_and_the_server_keeps_serving(server, tmp_path):
    import resource

    import httpx
    from gradio_client import handle_file

    client = _client(server)
    files = _bad_uploads(tmp_path)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for kind in ("not_an_image", "truncated", "bomb"):
        face, message = client.predict(handle_file(str(files[kind])), api_name="/face_preview")
        assert face is None and message.startswith(f"⚠️ {UPLOAD_MESSAGES[kind]}"), (kind, message)
    # 30000x30000 RGB would be 2.5 GiB: refused from the header, the process's peak memory barely moves.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 300_000  # KiB
    with pytest.raises(Exception, match="exceeds the maximum file size of 1048576 bytes"):  # as the page says it
        client.predict(handle_file(str(files["too_large"])), api_name="/face_preview")
    with httpx.Client() as session:  # a client that does not check first: the server stops the upload on arrival
        session.post(server + "login", data=dict(zip(("username", "password"), USER)))
        answer = session.post(server + "gradio_api/upload", files={"files": files["too_large"].open("rb")})
    assert answer.status_code == 413 and "maximum allowed size of 1048576 bytes" in answer.text
    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    face, message = client.predict(handle_file(str(tmp_path / "astronaut.png")), api_name="/face_preview")
    assert message == "" and Image.open(face).size == (512, 512)  # still serving


def test_two_clients_at_once_get_their_own_images_and_a_third_compiles_nothing(server, studio, tmp_path):
    from gradio_client import handle_file
    from gradio_client.utils import Status

    astronaut, camera = tmp_path / "astronaut.png", tmp_path / "camera.png"
    Image.fromarray(data.astronaut()).save(astronaut)
    Image.fromarray(np.asarray(Image.fromarray(data.astronaut()).transpose(Image.FLIP_LEFT_RIGHT))).save(camera)

    def arguments(prompt, seed, photo):
        slots = [(handle_file(str(photo)), None, None, 0.5, 0.3, 0.25, 0.375)]
        slots += [(None, None, None, 0.5, 0.5, 0.25, 0.25)] * (studio.max_persons - 1)
        return (prompt, "", SIZE, SIZE, 2, "ddim", 7.5, 5.0, 0.5, seed, False, 1, *(v for s in slots for v in s))

    requests = {"a woman in a garden": (11, astronaut), "a man on a boat": (12, camera)}
    clients = [_client(server, download_files=str(tmp_path / f"client{i}")) for i in range(2)]
    jobs = [client.submit(*arguments(prompt, seed, photo), api_name="/run")
            for client, (prompt, (seed, photo)) in zip(clients, requests.items())]
    ranks = {0: set(), 1: set()}
    while not all(job.done() for job in jobs):
        for i, job in enumerate(jobs):
            status = job.status()
            if status.code == Status.IN_QUEUE and status.rank is not None:
                ranks[i].add(status.rank)
        time.sleep(0.05)
    assert {0} in (ranks[0], ranks[1]), ranks  # the waiting one was shown its place: first in the queue
    for job, (prompt, (seed, photo)) in zip(jobs, requests.items()):
        gallery, status, used_seed = job.result()
        assert "Done" in status and used_seed == seed
        record = read_generation(gallery[0]["image"])
        assert (record.prompt, record.seed) == (prompt, seed)
        np.testing.assert_array_equal(record.references[0], np.asarray(Image.open(photo)))

    with _Lowerings() as lowerings:
        gallery, status, _ = clients[0].predict(*arguments("a third one", 13, camera), api_name="/run")
    assert lowerings.count == 0 and "Done" in status
    assert read_generation(gallery[0]["image"]).prompt == "a third one"


def test_auth_and_upload_limit_arguments(monkeypatch, capsys):
    def no_models(*_args, **_kwargs):
        raise AssertionError("reached the model build")

    monkeypatch.setattr("realisid_jax.commands.app.build_pipeline", no_models)
    monkeypatch.setattr("realisid_jax.commands.app.enable_compilation_cache", lambda: None)
    for bad in (["--auth", "ann"], ["--auth", ":pw"], ["--max-upload-mb", "0"], ["--max-upload-mb", "nan"]):
        with pytest.raises(SystemExit) as refused:
            main(["app", *bad])
        assert refused.value.code == 2 and f"argument {bad[0]}" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="reached the model build"):
        main(["app", "--host", "0.0.0.0", "--auth", "ann:pw:with:colons", "--max-upload-mb", "0.5"])
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")] == [
        "warning: --host 0.0.0.0: the page asks for the --auth login, but over plain HTTP: the password crosses that "
        "network unencrypted"]
