"""ASP: LAION's aesthetic predictor in Flax NNX against the same MLP in torch (tiny random weights, float32),
loading from ``.pth`` and ``.safetensors``, mismatched checkpoints, and ``realisid evaluate --aesthetic``.

The real ``sac+logos+ava1-l14-linearMSE.pth`` (768 -> 1) was checked once by hand: loaded by
``AestheticPredictor.from_file``, it gives torch's scores exactly (max difference 0.0 on 5 unit vectors).
"""

import json

import numpy as np
import pytest
import safetensors.torch
import skimage.data
import torch
import transformers
from PIL import Image

from realisid_jax.cli import main
from realisid_jax.config import load_config
from realisid_jax.eval.aesthetic import AestheticPredictor, AestheticScorer
from realisid_jax.eval.clip_score import clip_image_input
from realisid_jax.eval.manifest import ManifestEntry, ManifestPerson, write_manifest
from realisid_jax.face.preprocess import normalize
from realisid_jax.loading.errors import CheckpointMismatchError

TINY_CLIP = load_config("configs/sdxl.py:tiny").model["image_encoder"]
WIDTH = TINY_CLIP["projection_dim"]  # 32: the tiny CLIP's image_embeds


class LaionMLP(torch.nn.Module):
    """The reference: LAION's ``MLP`` (improved-aesthetic-predictor, simple_inference.py) without Lightning."""

    def __init__(self, input_size):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def _laion(input_size=WIDTH, seed=0):
    torch.manual_seed(seed)
    return LaionMLP(input_size).eval()


def _save(net, path):
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _unit(n, width, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_parity_with_torch(tmp_path, suffix):
    net = _laion()
    model = AestheticPredictor.from_file(_save(net, tmp_path / f"aesthetic{suffix}"))
    assert model.input_size == WIDTH
    x = _unit(5, WIDTH)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    ours = np.asarray(model(x))
    assert ours.shape == (5, 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    scorer = AestheticScorer.from_file(tmp_path / f"aesthetic{suffix}")
    assert scorer.label == f"laion-aesthetic:aesthetic{suffix}"
    # The scorer L2-normalises its input, as LAION's inference does: the scale of the embedding is irrelevant.
    np.testing.assert_allclose(scorer.score(3.0 * x), ref[:, 0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=f"takes \\(N, {WIDTH}\\)"):
        scorer.score(_unit(2, WIDTH + 1))


def test_mismatched_checkpoint_lists_every_key(tmp_path):
    state = _laion().state_dict()
    state["layers.8.weight"] = state.pop("layers.7.weight")  # a layer at the wrong index
    state["layers.2.weight"] = torch.zeros(128, 1000)  # wrong shape
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        AestheticPredictor.from_file(tmp_path / "bad.pth")
    assert err.value.missing == ["layers.7.weight"] and err.value.unexpected == ["layers.8.weight"]
    assert err.value.wrong_shape == [("layers.2.weight", (128, 1000), (128, 1024))]
    assert "bad.pth does not match the model" in str(err.value)
    with pytest.raises(FileNotFoundError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        AestheticPredictor.from_file(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read PyTorch checkpoint"):
        AestheticPredictor.from_file(tmp_path / "junk.pth")


@pytest.fixture(scope="module")
def generated(tmp_path_factory, face_models):
    """A manifest of the astronaut (a face) and a face-free photo, one box for both; a tiny torch CLIP
    vision folder; returns (folder, clip folder, torch CLIP, {image id: uint8 image})."""
    root = tmp_path_factory.mktemp("asp")
    images = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee()}
    for name, image in images.items():
        Image.fromarray(image).save(root / f"{name}.png")
    person = (ManifestPerson("astronaut.png", (192.0, 64.0, 320.0, 192.0)),)
    write_manifest(root, [ManifestEntry(name, f"{name}.png", "a photo", person) for name in images])
    torch.manual_seed(0)
    clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY_CLIP)).eval()
    clip.save_pretrained(root / "clip")
    return root, root / "clip", clip, images


def _evaluate(root, clip_folder, out, *extra):
    return main(["evaluate", "--generated", str(root), "--out", str(out), "--clip-vision", str(clip_folder),
                 *map(str, extra)])


def test_evaluate_reports_asp_per_image_and_by_face_size(tmp_path, generated):
    root, clip_folder, clip, images = generated
    net = _laion(seed=1)
    assert _evaluate(root, clip_folder, tmp_path / "report", "--aesthetic",
                     _save(net, tmp_path / "aesthetic.safetensors")) == 0
    # Reference: torch CLIP on the CLIPImageProcessor-geometry pixels, L2-normalised, torch MLP.
    pixels = np.stack([normalize(clip_image_input(im, TINY_CLIP["image_size"])) for im in images.values()])
    with torch.no_grad():
        embeds = clip(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).image_embeds
        expected = net(torch.nn.functional.normalize(embeds, dim=-1))[:, 0].numpy()
    per_image = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [r["image_id"] for r in per_image] == ["astronaut", "coffee"]
    assert [r["face_found"] for r in per_image] == [True, False]  # ASP is of the whole image, face or not
    np.testing.assert_allclose([r["asp"] for r in per_image], expected, rtol=1e-4, atol=1e-5)
    assert all(r["aesthetic_predictor"] == "laion-aesthetic:aesthetic.safetensors" for r in per_image)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["aesthetic_predictor"] == "laion-aesthetic:aesthetic.safetensors" and not summary["asp_note"]
    assert summary["overall"]["asp"]["n"] == 2
    assert summary["overall"]["asp"]["mean"] == pytest.approx(float(expected.mean()), rel=1e-4, abs=1e-5)
    # The same 128 px box is 1/4 of the astronaut's 512 px edge and 1/4.7 of the coffee photo's 600 px one.
    by_size = {b: s["asp"] for b, s in summary["by_face_size"].items()}
    assert by_size["1/4"]["n"] == by_size["1/5"]["n"] == 1
    assert [by_size["1/4"]["mean"], by_size["1/5"]["mean"]] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)
    assert "asp" in (tmp_path / "report" / "results.csv").read_text().splitlines()[0].split(",")


def test_without_aesthetic_asp_is_absent_and_said_so(tmp_path, generated):
    root, clip_folder, _, _ = generated
    assert _evaluate(root, clip_folder, tmp_path / "report") == 0
    per_image = json.loads((tmp_path / "report" / "results.json").read_text())
    assert all(r["asp"] is None and r["aesthetic_predictor"] == "" for r in per_image)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["aesthetic_predictor"] is None and "asp not computed" in summary["asp_note"]
    assert summary["overall"]["asp"] == dict(mean=None, std=None, n=0)


def test_unusable_aesthetic_arguments_are_clear_errors(tmp_path, generated, capsys):
    root, clip_folder, _, _ = generated
    weights = _save(_laion(input_size=48), tmp_path / "aesthetic48.pth")
    assert _evaluate(root, clip_folder, tmp_path / "a", "--aesthetic", weights) == 2
    assert f"takes 48-d CLIP image embeddings but clip:clip gives {WIDTH}-d ones" in capsys.readouterr().err
    rc = main(["evaluate", "--generated", str(root), "--out", str(tmp_path / "b"), "--facenet", str(weights),
               "--aesthetic", str(weights)])
    assert rc == 2 and "--aesthetic needs --clip-vision" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
