"""Evaluation harness on constructed cases with real face analysis (MediaPipe, astronaut photo).

Identity embedders: a deterministic stand-in defined here (grey-level square face crop, mean-centred; it
tells crops apart but is no face recogniser), the tiny random Flax CLIP fallback, and the FaceNet slot with
a tiny TorchScript model. Pose numbers measured here: the astronaut rotated by 15° about its face centre
gives a roll error of 15.12° (yaw 0.22°, pitch 0.53°) against the derived canonical face
(eval/canonical_face.py; 15.13°, 0.23°, 0.58° against MediaPipe's canonical face it replaced).
"""

import argparse
import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch
import transformers
from flax import nnx
from PIL import Image

from realisid_jax.commands import evaluate as evaluate_command
from realisid_jax.config import load_config
from realisid_jax.eval.harness import Evaluator
from realisid_jax.eval.identity import CLIPFaceEmbedder, FaceNetEmbedder, square_face_crop, unit_rows
from realisid_jax.eval.manifest import ManifestEntry, ManifestPerson, read_manifest, write_manifest
from realisid_jax.eval.matching import match_faces
from realisid_jax.eval.pose import estimate_head_pose, expression_error
from realisid_jax.eval.report import face_size_bucket, is_small_face, summarize
from realisid_jax.face.analysis import FaceAnalyzer
from realisid_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection

TINY = load_config("configs/sdxl.py:tiny").model
ROLL_DEG = 15.0


class GreyCropEmbedder:
    """Stand-in identity embedder: the 24x24 grey square face crop, mean-centred, as a unit vector."""

    label = "test-grey-crop"

    def embed(self, image, faces):
        crops = [square_face_crop(image, f, 24).astype(np.float32).mean(-1).ravel() for f in faces]
        return unit_rows(np.stack([c - c.mean() for c in crops]))


@pytest.fixture(scope="module")
def analyzer(face_models):
    return FaceAnalyzer(policy="all")


def _rotate_about_face(image, analyzer, degrees):
    x0, y0, x1, y1 = analyzer.analyze(image)[0].box
    m = cv2.getRotationMatrix2D((float(x0 + x1) / 2, float(y0 + y1) / 2), degrees, 1.0)
    return cv2.warpAffine(image, m, image.shape[1::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, analyzer):
    """Files: the astronaut, it flipped, it rotated by 15° and 35°, a two-person collage (1024x1024), a face-free
    image."""
    folder = tmp_path_factory.mktemp("photos")
    astronaut = skimage.data.astronaut()
    images = {
        "astronaut": astronaut,
        "flipped": astronaut[:, ::-1],
        "rolled": _rotate_about_face(astronaut, analyzer, ROLL_DEG),
        "rolled35": _rotate_about_face(astronaut, analyzer, 35.0),
        # Side by side on a square canvas: on the bare 1024x512 strip BlazeFace also fires on the left glove.
        "collage": np.pad(np.concatenate([astronaut, astronaut[:, ::-1]], axis=1), ((256, 256), (0, 0), (0, 0))),
        "no_face": np.asarray(Image.fromarray(skimage.data.coffee()).resize((512, 384))),
    }
    paths = {}
    for name, image in images.items():
        paths[name] = str(folder / f"{name}.png")
        Image.fromarray(np.ascontiguousarray(image)).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def tiny_clip_vision():
    config = CLIPVisionConfig.from_dict(dict(TINY["image_encoder"]))
    return CLIPVisionModelWithProjection(config, rngs=nnx.Rngs(0))


def _entry(image, *refs, boxes=None, pose=None, id_="img"):
    boxes = boxes or [None] * len(refs)
    return ManifestEntry(id_, image, "a photo of a person", tuple(
        ManifestPerson(r, box=b, pose=pose) for r, b in zip(refs, boxes)))


@pytest.mark.parametrize("embedder", ["stand-in", "clip-fallback"])
def test_same_image_is_identity_one_and_zero_errors(embedder, photos, analyzer, tiny_clip_vision):
    emb = GreyCropEmbedder() if embedder == "stand-in" else CLIPFaceEmbedder(tiny_clip_vision, source="tiny-random")
    (row,) = Evaluator(emb, analyzer=analyzer).evaluate(_entry(photos["astronaut"], photos["astronaut"]))
    assert row.face_found and row.matched and not row.error
    assert row.identity_similarity == pytest.approx(1.0, abs=1e-5)
    assert row.pose_error == 0.0 and row.roll_error == 0.0
    assert row.expression_error == pytest.approx(0.0, abs=1e-9)
    assert row.identity_is_fallback == (embedder == "clip-fallback")
    assert row.identity_embedder == emb.label


def test_in_plane_rotation_is_roll_error(photos, analyzer):
    (row,) = Evaluator(GreyCropEmbedder(), analyzer=analyzer).evaluate(_entry(photos["rolled"], photos["astronaut"]))
    print(f"roll {row.roll_error:.2f} yaw {row.yaw_error:.2f} pitch {row.pitch_error:.2f} "
          f"expression {row.expression_error:.4f} identity {row.identity_similarity:.3f}")
    assert row.roll_error == pytest.approx(ROLL_DEG, abs=1.0)
    assert row.yaw_error < 1.5 and row.pitch_error < 1.5
    assert row.pose_error == pytest.approx((row.roll_error + row.yaw_error + row.pitch_error) / 3)
    # A rigid in-plane rotation is removed by the similarity alignment: expression stays near the noise.
    assert row.expression_error < 0.005
    assert row.identity_similarity < 0.99


def test_expression_error_sees_an_open_mouth(photos, analyzer):
    marks = analyzer.analyze(skimage.data.astronaut())[0].landmarks
    opened = marks.copy()
    from realisid_jax.face import mesh

    lower = [i for i in set(mesh.LIPS_OUTER) | set(mesh.LIPS_INNER) if marks[i, 1] > marks[mesh.UPPER_LIP, 1] + 1]
    opened[lower, 1] += 8.0  # jaw drop of 8 px on a ~107 px face
    err = expression_error(opened, marks)
    n_expr = len(set(mesh.LIPS_OUTER + mesh.LIPS_INNER + mesh.RIGHT_EYE + mesh.LEFT_EYE
                     + sum(mesh.RIGHT_EYEBROW + mesh.LEFT_EYEBROW, ())))
    face = float(np.ptp(marks, axis=0).max())
    assert err == pytest.approx(8.0 * len(lower) / (2 * n_expr) / face, rel=0.25)
    assert estimate_head_pose(opened).roll == pytest.approx(estimate_head_pose(marks).roll, abs=1.0)


def test_no_face_image_gives_a_row(photos, analyzer):
    (row,) = Evaluator(GreyCropEmbedder(), analyzer=analyzer).evaluate(_entry(photos["no_face"], photos["astronaut"]))
    assert row.face_found is False and row.matched is False and row.faces_in_image == 0
    assert np.isnan(row.identity_similarity) and np.isnan(row.pose_error)
    assert row.as_dict()["identity_similarity"] is None


def test_two_person_collage_matches_and_counts_the_extra_reference(photos, analyzer):
    refs = [photos["flipped"], photos["rolled35"], photos["astronaut"]]
    rows = Evaluator(GreyCropEmbedder(), analyzer=analyzer).evaluate(_entry(photos["collage"], *refs))
    by_ref = {r.identity: r for r in rows}
    assert all(r.faces_in_image == 2 and r.extra_faces == 0 for r in rows)
    assert by_ref["astronaut"].matched and by_ref["flipped"].matched and not by_ref["rolled35"].matched
    assert by_ref["astronaut"].identity_similarity > 0.95 and by_ref["flipped"].identity_similarity > 0.95
    # The astronaut's face is the collage's left half, the flipped one's the right half.
    assert by_ref["astronaut"].generated_box[2] < 512 < by_ref["flipped"].generated_box[0]
    summary = summarize([r.as_dict() for r in rows])
    assert summary["counts"]["unmatched_persons"] == 1 and summary["counts"]["matched"] == 2


def test_greedy_matching():
    s = np.array([[0.9, 0.8, 0.1],
                  [0.85, 0.2, 0.3]])  # greedy takes (0,0) first, so face 1 gets reference 2, not 0
    m = match_faces(s)
    assert m.pairs == ((0, 0), (1, 2)) and m.unmatched_references == (1,) and m.unmatched_generated == ()
    m = match_faces(s, min_similarity=0.5)
    assert m.pairs == ((0, 0),) and m.unmatched_references == (1, 2) and m.unmatched_generated == (1,)
    assert match_faces(np.zeros((0, 2))).unmatched_references == (0, 1)


@pytest.mark.parametrize("edge", [1024, 512, 768])
def test_face_size_buckets_and_small_split(edge):
    rows = []
    for d in (4, 5, 6, 7):
        side = round(edge / d)  # whole pixels, as a user box would be
        fraction = side / edge
        assert face_size_bucket(fraction) == f"1/{d}"
        assert is_small_face(fraction) == (d == 7), (d, side)
        rows.append(dict(image_id=f"i{d}", person=0, matched=True, face_found=True, extra_faces=0, error="",
                         identity_embedder="x", identity_is_fallback=False, bucket=face_size_bucket(fraction),
                         small_face=is_small_face(fraction), identity_similarity=d / 10, clip_t=None))
    assert face_size_bucket(1 / 3) == "> 1/4" and face_size_bucket(1 / 9) == "< 1/7"
    assert face_size_bucket(1 / 4.6) == "1/5" and is_small_face(1 / 6.2)
    summary = summarize(rows)
    assert summary["by_face_size"]["1/6"]["identity_similarity"]["mean"] == pytest.approx(0.6)
    assert summary["small_face"]["small"]["persons"] == 1
    assert summary["small_face"]["small"]["identity_similarity"]["mean"] == pytest.approx(0.7)
    assert summary["small_face"]["not_small"]["identity_similarity"]["mean"] == pytest.approx(0.5)


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_facenet_slot_loads_exported_models(fmt, tmp_path, photos, analyzer):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, stride=4), torch.nn.Flatten(), torch.nn.Linear(4 * 39 * 39, 16))
    net.eval()
    if fmt == "pt2":
        path = tmp_path / "facenet.pt2"
        batch = torch.export.Dim("n", min=1)
        torch.export.save(torch.export.export(net, (torch.zeros(2, 3, 160, 160),), dynamic_shapes=({0: batch},)),
                          str(path))
    else:
        path = tmp_path / "facenet.pt"
        with pytest.warns(DeprecationWarning):
            torch.jit.script(net).save(str(path))
    emb = FaceNetEmbedder(path)
    assert emb.label == f"facenet:{path.name}"
    (row,) = Evaluator(emb, analyzer=analyzer).evaluate(_entry(photos["astronaut"], photos["astronaut"]))
    assert row.identity_similarity == pytest.approx(1.0, abs=1e-5) and not row.identity_is_fallback
    flipped = Evaluator(emb, analyzer=analyzer).evaluate(_entry(photos["flipped"], photos["astronaut"]))[0]
    assert flipped.identity_similarity < 0.999
    with pytest.raises(FileNotFoundError):
        FaceNetEmbedder(tmp_path / "missing.pt2")


def _save_tiny_clip(folder):
    torch.manual_seed(0)
    vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY["image_encoder"]))
    text = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TINY["text_encoder_2"]))
    vision.save_pretrained(folder / "vision")
    text.save_pretrained(folder / "text")
    return folder / "vision", folder / "text"


def test_evaluate_command_end_to_end(tmp_path, photos):
    generated = tmp_path / "generated"
    generated.mkdir()
    for name in ("astronaut", "collage", "no_face"):
        Image.open(photos[name]).save(generated / f"{name}.png")
    refs = tmp_path / "refs"
    refs.mkdir()
    for name in ("astronaut", "flipped"):
        Image.open(photos[name]).save(refs / f"{name}.png")
    box = [192.0, 64.0, 320.0, 192.0]  # 128 px of 512: 1/4
    write_manifest(generated, [
        ManifestEntry("one", "astronaut.png", "an astronaut", (ManifestPerson("astronaut.png", box),), seed=0),
        ManifestEntry("two", "collage.png", "two astronauts", (
            ManifestPerson("astronaut.png", (160, 60, 260, 160)), ManifestPerson("flipped.png", (700, 60, 800, 160)))),
        ManifestEntry("none", "no_face.png", "a cup of coffee", (ManifestPerson("astronaut.png", box),)),
    ])
    assert [e.persons[0].reference for e in read_manifest(generated, refs)][0] == str(refs / "astronaut.png")
    vision, text = _save_tiny_clip(tmp_path / "clip")
    parser = argparse.ArgumentParser()
    evaluate_command.register(parser.add_subparsers())
    out = tmp_path / "report"
    args = parser.parse_args(["evaluate", "--generated", str(generated), "--refs", str(refs), "--out", str(out),
                              "--clip-vision", str(vision), "--clip-text", str(text)])
    assert args.func(args) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["image_id"], r["matched"]) for r in rows] == [
        ("one", "True"), ("two", "True"), ("two", "True"), ("none", "False")]
    assert all(r["identity_embedder"] == "clip-vision-fallback:vision" for r in rows)
    per_image = json.loads((out / "results.json").read_text())
    assert [len(r["persons"]) for r in per_image] == [1, 2, 1] and per_image[2]["face_found"] is False
    summary = json.loads((out / "summary.json").read_text())
    assert summary["identity_is_fallback"] and "NOT FaceNet" in summary["identity_note"]
    assert summary["counts"] == dict(images=3, images_without_face=1, persons=4, matched=3, unmatched_persons=1,
                                     extra_faces=0, errors=0)
    assert summary["overall"]["clip_t"]["n"] == 3 and summary["overall"]["clip_i"]["n"] == 3
    assert summary["by_face_size"]["1/4"]["persons"] == 2 and summary["small_face"]["small"]["persons"] == 2
    assert Image.open(out / "face_size.png").size[0] > 100
    bad = parser.parse_args(["evaluate", "--generated", str(generated), "--out", str(out)])
    assert bad.func(bad) == 2  # no identity embedder


class PasteFacePipeline:
    """Stand-in for ``RealisIDPipeline``: pastes each person's reference photo around the face, scaled and
    moved so that its face's square box lands on the person's box, onto a grey canvas: real faces at the
    asked sizes."""

    def __init__(self, analyzer):
        self.analyzer = analyzer
        self.calls = []

    def __call__(self, prompt, persons, *, num_images, seed, height, width, num_inference_steps, progress):
        from realisid_jax.face.image import load_image
        from realisid_jax.face.preprocess import square_box

        self.calls.append((prompt, seed, num_images))
        canvas = np.full((height, width, 3), 128, np.uint8)
        for person in persons:
            photo = load_image(person.reference)
            sx0, sy0, sx1, sy1 = square_box(self.analyzer.analyze(photo)[0].box)
            x0, y0, x1, y1 = person.box
            s = (x1 - x0) / (sx1 - sx0)
            m = np.array([[s, 0, x0 - s * sx0], [0, s, y0 - s * sy0]])
            warped = cv2.warpAffine(photo, m, (width, height), flags=cv2.INTER_AREA)
            inside = np.zeros((height, width), bool)  # the box grown by 30% a side: faces must not overlap
            grow = 0.3 * (x1 - x0)
            inside[max(0, int(y0 - grow)):int(y1 + grow), max(0, int(x0 - grow)):int(x1 + grow)] = True
            canvas[inside] = warped[inside]
        return argparse.Namespace(images=np.stack([canvas] * num_images))


def _paste_grid(pipeline, cells, photos, out, *, num_images, height, width, steps):
    """The grid's images from the stand-in pipeline, one call per cell, with the command's manifest."""
    from PIL import Image

    from realisid_jax.commands.benchmark_prompts import write_grid_manifest
    from realisid_jax.realisid.conditions import Person

    (out / "images").mkdir(parents=True, exist_ok=True)
    for cell in cells:
        persons = [Person(str(photos[name]), box) for name, box in zip(cell.identities, cell.boxes)]
        result = pipeline(cell.prompt, persons, num_images=num_images, seed=cell.seed, height=height, width=width,
                          num_inference_steps=steps, progress=False)
        for j, image in enumerate(np.asarray(result.images)):
            Image.fromarray(image).save(out / f"images/{cell.image_id(j)}.png")
    return write_grid_manifest(cells, photos, out, num_images=num_images)


def test_benchmark_grid_then_evaluate(tmp_path, photos, analyzer):
    from realisid_jax.commands import benchmark_prompts as bp

    assert bp.face_boxes(4, 1, 512, 512) == ((192.0, 140.8, 320.0, 268.8),)
    with pytest.raises(ValueError):
        bp.face_boxes(4, 5, 512, 512)  # five 128 px faces do not fit in 512 px
    out = tmp_path / "bench"
    identities = bp._write_refs(bp._identity_photos([Path(photos["astronaut"]), Path(photos["flipped"])]), out / "refs")
    cells = bp.plan_grid(list(identities), ["a", "b"], [4, 7], [0, 1], persons=1, height=512, width=512)
    assert len(cells) == 2 * 2 * 2 * 2 and len({c.image_id(0) for c in cells}) == 16
    cells = bp.plan_grid(list(identities), ["a"], [4, 7], [3], persons=2, height=512, width=512)
    assert [c.identities for c in cells[::2]] == [("astronaut", "flipped"), ("flipped", "astronaut")]
    pipeline = PasteFacePipeline(analyzer)
    manifest = _paste_grid(pipeline, cells, identities, out, num_images=2, height=512, width=512, steps=2)
    assert pipeline.calls == [("a", 3, 2)] * 4
    entries = read_manifest(out)
    assert len(entries) == 8 and manifest == out / "manifest.json"
    rows = [r.as_dict() for r in Evaluator(GreyCropEmbedder(), analyzer=analyzer).evaluate_all(entries)]
    assert all(r["matched"] for r in rows), [(r["image_id"], r["identity"]) for r in rows if not r["matched"]]
    from realisid_jax.face.detect import box_iou

    assert min(float(box_iou(np.array(r["generated_box"]), np.array(r["requested_box"]))[0, 0]) for r in rows) > 0.5
    summary = summarize(rows)
    assert summary["by_face_size"]["1/4"]["persons"] == 8 and summary["by_face_size"]["1/7"]["persons"] == 8
    assert summary["small_face"]["small"]["persons"] == 8
    print({b: round(s["identity_similarity"]["mean"], 3) for b, s in summary["by_face_size"].items()})
    assert summary["overall"]["identity_similarity"]["mean"] > 0.8
