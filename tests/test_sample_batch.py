"""``realisid sample-batch`` through the real CLI on the 8 simulated devices (tiny SDXL folder, random weights,
2 steps): each image once with its record, resume after SIGTERM, a re-run that does nothing, one compile per
group, the same images on one device; and bad request lines refused before any model loads.

One module-scoped run sequence (interrupted run, resume, re-run) is shared by the tests, so each group compiles
once per mesh.
"""

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from skimage import data
from tiny_sdxl import build_tiny_sdxl

from realisid_jax.app.metadata import read_generation
from realisid_jax.cli import main
from realisid_jax.commands import sample_batch
from realisid_jax.config import load_config
from realisid_jax.realisid import batch
from realisid_jax.realisid.pipeline import RealisIDPipeline
from realisid_jax.sharding import make_mesh

pytestmark = pytest.mark.usefixtures("face_models")

BOX = [40, 30, 88, 78]
# Two groups: 128x128 (requests a, b: 5 images) and 64x128 (request c: 2 images); at one image per device,
# a batch of 8 per group.
REQUESTS = [
    dict(id="a", prompt="a photo of a person in a garden", persons=[dict(photo="astronaut.png", box=BOX)], seed=1,
         num_images=3),
    dict(id="b", prompt="a person at the beach", negative_prompt="blurry", seed=2, num_images=2,
         persons=[dict(photo="astronaut.png", box=BOX, pose="astronaut.png")], text_guidance_scale=5.0,
         id_guidance_scale=3.0, id_start_fraction=0.5),
    dict(id="c", prompt="a portrait", persons=[dict(photo="astronaut.png", box=[10, 4, 58, 52])], seed=3,
         height=64, width=128, num_images=2),
]
NAMES = ["a-0", "a-1", "a-2", "b-0", "b-1", "c-0", "c-1"]
COMMON = ["--config", "configs/sdxl.py:tiny", "--config.sampling.num_inference_steps=2",
          "--config.sampling.height=128", "--config.sampling.width=128"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_batch")
    Image.fromarray(data.astronaut()).save(root / "astronaut.png")
    (root / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REQUESTS) + "\n")
    base, clip_vision, _, _ = build_tiny_sdxl(root / "sdxl")
    return root, ["--base", str(base), "--image-encoder", str(clip_vision)]


def _cli(args):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(args)
    return rc, stdout.getvalue(), stderr.getvalue()


def _snapshot(out):
    return {p.name: (p.stat().st_mtime_ns, np.asarray(Image.open(p))) for p in sorted((out / "images").glob("*"))}


@pytest.fixture(scope="module")
def runs(folder):
    """An 8-device run stopped by SIGTERM during its first batch, its resume, and a third run; what each left."""
    root, weights = folder
    out = root / "out"
    args = ["sample-batch", *COMMON, "--requests", str(root / "requests.jsonl"), "--out", str(out), *weights]
    compiles = []
    compile_group = batch.compile_group

    def counting(*a, **kw):
        compiles.append(a[-1].latents.shape)
        return compile_group(*a, **kw)

    run = batch.BatchSampler.run

    def preempted(self, key, host):
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, while the first batch runs
        return run(self, key, host)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch, "compile_group", counting)
        mp.setattr(batch.BatchSampler, "run", preempted)
        first = _cli(args)
        after_first = _snapshot(out)
        mp.setattr(batch.BatchSampler, "run", run)
        first_compiles = list(compiles)
        second = _cli(args)
        after_second = _snapshot(out)
        mp.setattr(RealisIDPipeline, "from_pretrained", _no_build)
        third = _cli(args)
    return dict(out=out, first=first, second=second, third=third, after_first=after_first,
                after_second=after_second, first_compiles=first_compiles, compiles=compiles)


def _no_build(*args, **kwargs):
    raise AssertionError("a pipeline was built")


def test_interrupted_run_writes_its_batch_and_exits_0(runs):
    rc, stdout, stderr = runs["first"]
    assert rc == 0, stderr
    assert "stopped by SIGTERM" in stdout
    assert sorted(runs["after_first"]) == ["a-0.png", "a-1.png", "a-2.png", "b-0.png", "b-1.png"]  # group 1 only
    assert runs["first_compiles"] == [(8, 16, 16, 4)]


def test_resume_makes_the_rest_each_image_once_with_its_record(runs):
    rc, stdout, stderr = runs["second"]
    assert rc == 0, stderr
    assert "2 images" in stdout and "5 already there" in stdout and "128x64" in stdout
    images = runs["after_second"]
    assert sorted(images) == [f"{n}.png" for n in NAMES]  # no temporary file left
    for name, (mtime, _) in runs["after_first"].items():
        assert images[name][0] == mtime, f"{name} was written again"
    assert runs["compiles"][1:] == [(8, 8, 16, 4)]  # the resume compiled only the group it ran
    assert images["c-0.png"][1].shape == (64, 128, 3) and images["a-0.png"][1].shape == (128, 128, 3)
    assert np.abs(images["a-0.png"][1].astype(int) - images["a-1.png"][1].astype(int)).max() > 0
    out = runs["out"]
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in manifest) == NAMES
    g = read_generation(out / "images" / "b-1.png")
    assert (g.prompt, g.negative_prompt, g.seed, g.image_index, g.num_images) == ("a person at the beach", "blurry",
                                                                                  2, 1, 2)
    assert (g.steps, g.height, g.width, g.text_guidance_scale, g.id_guidance_scale, g.id_start_fraction) == (
        2, 128, 128, 5.0, 3.0, 0.5)
    assert g.boxes == ((40.0, 30.0, 88.0, 78.0),) and g.poses[0] is not None
    assert g.references[0].shape == (512, 512, 3)


def test_rerun_skips_everything_without_building_a_model(runs):
    rc, stdout, stderr = runs["third"]
    assert rc == 0, stderr
    assert "all 7 images" in stdout
    for name, (mtime, _) in runs["after_second"].items():
        assert _snapshot(runs["out"])[name][0] == mtime


def test_one_device_gives_the_same_images(runs, folder):
    root, _ = folder
    config = load_config(COMMON[1], COMMON[2:])
    requests = sample_batch.read_requests(root / "requests.jsonl", config)[:1]  # request a: 3 images
    weights = root / "sdxl"
    pipeline = RealisIDPipeline.from_pretrained(config, str(weights / "pipeline"),
                                                image_encoder=str(weights / "image_encoder"),
                                                mesh=make_mesh((1, 1, 1), jax.devices()[:1]))
    out = root / "one_device"
    summary = sample_batch.sample_requests(pipeline, requests, out, conditions=sample_batch.Conditions(config),
                                           batch_size=2, progress=False)
    assert (summary.made, summary.compiles) == (3, 1)  # two batches, one compile
    for name in ("a-0", "a-1", "a-2"):
        one = np.asarray(Image.open(out / "images" / f"{name}.png")).astype(int)
        eight = runs["after_second"][f"{name}.png"][1].astype(int)
        assert np.array_equal(one, eight), name


def test_requests_group_by_size_person_bucket_steps_and_scheduler():
    config = load_config(COMMON[1], COMMON[2:])
    person = batch.Person("astronaut.png", BOX)

    def request(name, persons=1, **kw):
        return batch.SampleRequest(id=name, prompt="p", persons=(person,) * persons, **kw).with_defaults(config.sampling)

    requests = [request("a", num_images=2), request("b", 2), request("c", 3), request("d", scheduler="euler"),
                request("e", num_inference_steps=3), request("f", height=64), request("g")]
    groups = sample_batch.plan_groups(requests, max_persons=4)
    assert {str(k): [f"{r.id}-{j}" for r, j in v] for k, v in groups.items()} == {
        "128x128/1p/2 steps/ddim": ["a-0", "a-1", "g-0"], "128x128/2p/2 steps/ddim": ["b-0"],
        "128x128/4p/2 steps/ddim": ["c-0"], "128x128/1p/2 steps/euler": ["d-0"],
        "128x128/1p/3 steps/ddim": ["e-0"], "128x64/1p/2 steps/ddim": ["f-0"]}


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: Expecting property name"),
    (json.dumps(dict(prompt="x", steps=3)), "line 2: unknown field(s) steps"),
    (json.dumps(dict(prompt="x", seed=-1)), "line 2: seed -1 is out of range"),
    (json.dumps(dict(prompt="x", persons=[dict(photo="astronaut.png", box=[200, 200, 260, 260])])),
     "line 2: person 1:"),
    (json.dumps(dict(prompt="x", persons=[dict(photo="grey.png", box=BOX)])), "line 2: no face found in"),
    (json.dumps(dict(prompt="x", persons=[dict(photo="missing.png", box=BOX)])), "line 2:"),
    (json.dumps(dict(id="a", prompt="x")), "line 2: id 'a' is already used on line 1"),
])
def test_bad_request_line_is_refused_before_any_model(tmp_path, monkeypatch, line, message):
    monkeypatch.setattr(RealisIDPipeline, "from_pretrained", _no_build)
    monkeypatch.setattr(RealisIDPipeline, "from_config", _no_build)
    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps(REQUESTS[0]) + "\n" + line + "\n")
    out = tmp_path / "out"
    rc, stdout, stderr = _cli(["sample-batch", *COMMON, "--requests", str(requests), "--out", str(out)])
    assert rc == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_give_the_images_of_one(runs, folder, tmp_path):
    """2 processes x 4 CPU devices (``jax.distributed`` on localhost, one 8-device mesh) write the images of the
    1-process 8-device run, each image once."""
    root, weights = folder
    out = tmp_path / "two"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "realisid_jax.cli", "sample-batch", *COMMON, "--requests", str(root / "requests.jsonl"),
         "--out", str(out), *weights], stdout=logs[i].open("w"), stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[1],
        env=dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
                 JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
        for i in range(2)]
    codes = [p.wait(timeout=1200) for p in procs]
    assert codes == [0, 0], "\n\n".join(log.read_text()[-3000:] for log in logs)
    assert "7 images" in logs[0].read_text() and "sample-batch:" not in logs[1].read_text()  # one summary
    images = _snapshot(out)
    assert sorted(images) == [f"{n}.png" for n in NAMES]
    for name, (_, pixels) in runs["after_second"].items():
        assert np.array_equal(images[name][1], pixels), name
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in manifest) == NAMES
