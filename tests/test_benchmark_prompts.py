"""``realisid benchmark-prompts`` through the real CLI and the real sampling pipeline (tiny config, random
weights) on the 8 simulated devices, then ``realisid evaluate`` on its output; and its early errors.

The random weights come as a tiny diffusers SDXL folder (``tiny_sdxl``, ``--base``) as in test_pipeline.py:
torch initialises them in a second, where the config's own random init (no ``--base``, covered by
test_pipeline's CLI test) costs a minute of one-op-at-a-time XLA compiles on this machine. They make
noise: the evaluation must report every generated face as missing, not crash.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sdxl import build_tiny_sdxl

from realisid_jax.cli import main
from realisid_jax.config import load_config
from realisid_jax.realisid.batch import BatchSampler
from realisid_jax.realisid.pipeline import RealisIDPipeline

pytestmark = pytest.mark.usefixtures("face_models")

TINY = load_config("configs/sdxl.py:tiny").model
MESH = "--config.mesh.shape=(2,1,4)"  # data=2: a batch of 2 would be split in two
SIZE = ["--height", "128", "--width", "128"]


@pytest.fixture
def no_model_build(monkeypatch):
    """Fails the test if a pipeline is built: bad input must be reported before that."""
    def fail(*args, **kwargs):
        raise AssertionError("the pipeline was built before the bad input was reported")

    monkeypatch.setattr(RealisIDPipeline, "from_config", fail)
    monkeypatch.setattr(RealisIDPipeline, "from_pretrained", fail)


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "2"], "--batch-size 2 must be a positive multiple of 8, the mesh's batch shards; pass "
                            "--batch-size 8"),
    (["--batch-size", "3", MESH], "multiple of 2"),
    (["--num-images", "2", MESH, "--identities", "GREY"], "no face found in"),
    (["--num-images", "2", MESH, "--persons", "2"], "--persons 2 needs between 1 and 1"),
])
def test_bad_input_fails_before_the_model_build(tmp_path, capsys, no_model_build, extra, message):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(grey)
    out = tmp_path / "grid"
    args = ["benchmark-prompts", "--config", "configs/sdxl.py:tiny", "--out", str(out), *SIZE]
    rc = main(args + [str(grey) if a == "GREY" else a for a in extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not out.exists()


def _tiny_aesthetic(path, width):
    """LAION's MLP layout (``realisid_jax.eval.aesthetic``) on ``width``-d embeddings, random weights."""
    torch.manual_seed(1)
    widths = (width, 1024, 128, 64, 16)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        layers += [torch.nn.Linear(n_in, n_out)] + ([torch.nn.Dropout(0.1)] if i < 3 else [])
    net = torch.nn.Sequential(*layers, torch.nn.Linear(16, 1))
    torch.save({f"layers.{k}": v for k, v in net.state_dict().items()}, path)
    return path


def test_grid_on_the_sharded_pipeline_then_evaluate(tmp_path, capsys, monkeypatch):
    batch_specs = []
    place = BatchSampler.place

    def spy(self, host):
        placed = place(self, host)
        batch_specs.append(placed.latents.sharding.spec)
        return placed

    monkeypatch.setattr(BatchSampler, "place", spy)
    base, clip_vision, _, _ = build_tiny_sdxl(tmp_path / "sdxl")  # clip_vision: transformers save_pretrained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a person in a garden\n")
    out = tmp_path / "grid"
    # The default mesh (-1, 1, 1): data=8, so 8 images, one per device (a tensor axis costs compile time).
    rc = main(["benchmark-prompts", "--config", "configs/sdxl.py:tiny", "--out", str(out), *SIZE, "--steps", "2",
               "--num-images", "8", "--face-sizes", "4", "--seeds", "0", "--prompts", str(prompts),
               "--base", str(base), "--image-encoder", str(clip_vision)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "batch split 8 ways" in printed.out
    assert batch_specs and all(spec[0] == "data" for spec in batch_specs)  # the batch really is sharded

    manifest = json.loads((out / "manifest.json").read_text())
    ids = [f"astronaut-p00-f4-s0-{i}" for i in range(8)]
    assert [e["id"] for e in manifest["images"]] == ids
    entry = manifest["images"][0]
    assert entry["prompt"] == "a photo of a person in a garden" and entry["seed"] == 0
    assert entry["persons"] == [dict(identity="astronaut", reference="refs/astronaut.png",
                                     box=[48.0, 35.2, 80.0, 67.2], pose=None)]  # 32 px = 1/4 of 128
    images = [np.asarray(Image.open(out / "images" / f"{i}.png")) for i in ids]
    assert all(im.shape == (128, 128, 3) and im.dtype == np.uint8 for im in images)
    assert np.abs(images[0].astype(int) - images[7].astype(int)).max() > 0  # distinct noise draws, not one copy
    assert Image.open(out / "refs" / "astronaut.png").size == (512, 512)

    report = tmp_path / "report"
    aesthetic = _tiny_aesthetic(tmp_path / "aesthetic.pth", TINY["image_encoder"]["projection_dim"])
    rc = main(["evaluate", "--generated", str(out), "--out", str(report), "--clip-vision", str(clip_vision),
               "--aesthetic", str(aesthetic)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((report / "summary.json").read_text())
    assert summary["counts"] == dict(images=8, images_without_face=8, persons=8, matched=0, unmatched_persons=8,
                                     extra_faces=0, errors=0)
    assert summary["by_face_size"]["1/4"]["match_rate"] == 0.0
    assert summary["overall"]["identity_similarity"]["n"] == 0
    # ASP scores the whole image, face or not.
    assert summary["aesthetic_predictor"] == "laion-aesthetic:aesthetic.pth"
    assert summary["overall"]["asp"]["n"] == 8 and summary["by_face_size"]["1/4"]["asp"]["n"] == 8
    per_image = json.loads((report / "results.json").read_text())
    assert [r["face_found"] for r in per_image] == [False] * 8
    assert all(np.isfinite(r["asp"]) for r in per_image)
