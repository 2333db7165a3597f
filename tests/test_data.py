"""Training data: prepare-data on real photos (scikit-image), resume, and the grain input pipeline."""
import argparse
import hashlib
import json
import shutil

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from realisid_jax.commands import prepare_data as prepare_command
from realisid_jax.data import builder, prepare, sample_data
from realisid_jax.data.input_pipeline import make_train_iterator
from realisid_jax.face.image import load_image
from realisid_jax.face.preprocess import CLIP_MEAN, CLIP_STD
from realisid_jax.text.tokenizer import offline_clip_tokenizer
from realisid_jax.training.batches import host_batch

RESOLUTION = 128
N_FACES = 9  # astronaut + 8 LFW faces


def _run_cli(argv):
    parser = argparse.ArgumentParser()
    prepare_command.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    src, out = root / "src", root / "out"
    expected = sample_data.write_sample_source(src, N_FACES)
    shutil.copy(src / "lfw_000.png", src / "uncaptioned.png")  # a photo without caption
    # The astronaut's face is ~27 px at 128 px: keep it with a lower threshold than the default.
    rc = _run_cli(["prepare-data", "--src", str(src), "--out", str(out), "--resolution",
                   str(RESOLUTION), "--workers", "2", "--min-face-px", "16"])
    assert rc == 0
    summary = json.loads((out / prepare.SUMMARY_FILE).read_text())
    return src, out, expected, summary


def _records(out):
    source = tfds.data_source("realisid_faces", split="train", data_dir=str(out))
    return [source[i] for i in range(len(source))]


def test_prepare_counts_and_geometry(prepared):
    src, out, expected, summary = prepared
    records = _records(out)
    assert len(records) == N_FACES == summary["written"]
    assert summary["skipped"] == {"corrupt_image": 1, "no_caption": 1, "no_face": 1}
    assert summary["analysed"] == N_FACES + 2 and summary["cached"] == 0 and not summary["errors"]
    skipped = {json.loads(line)["file"]: json.loads(line)["reason"]
               for line in (out / prepare.SKIPPED_FILE).read_text().splitlines()}
    assert skipped == {"corrupt.jpg": "corrupt_image", "no_face.png": "no_face",
                       "uncaptioned.png": "no_caption"}
    assert sorted(r["source"].decode() for r in records) == sorted(expected["faces"])
    for r in records:
        name = r["source"].decode()
        assert r["caption"].decode() == (src / name).with_suffix(".txt").read_text().strip()
        assert r["image"].shape == (RESOLUTION, RESOLUTION, 3) and r["image"].dtype == np.uint8
        assert r["reference"].shape == (224, 224, 3)
        x0, y0, x1, y1 = r["face_box"]
        assert 0 <= x0 < x1 <= RESOLUTION and 0 <= y0 < y1 <= RESOLUTION, name
        assert abs((x1 - x0) - (y1 - y0)) < 1e-3, name
        assert x1 - x0 >= 16
        # The landmarks and the face mask lie (almost) inside the face box.
        marks = r["landmarks"]
        inside = ((marks >= [x0 - 2, y0 - 2]) & (marks <= [x1 + 2, y1 + 2])).all(1)
        assert inside.mean() > 0.95, name
        mask = r["face_mask"][..., 0] > 0
        rows, cols = np.nonzero(mask)
        assert mask.sum() > 0.2 * (x1 - x0) ** 2, name
        assert cols.min() >= x0 - 2 and cols.max() <= x1 + 2 and rows.min() >= y0 - 2, name
        # The reference crop is masked: black background around a face.
        ref = r["reference"]
        assert ref[0, 0].max() == 0 and ref[112, 112].max() > 0


def test_face_too_small_and_multiple_faces(prepared, tmp_path):
    import cv2

    from realisid_jax.face.analysis import FaceAnalyzer

    src = prepared[0]
    analyzer = FaceAnalyzer(policy="all", min_face_px=1.0)
    options = prepare.PrepareOptions(resolution=RESOLUTION, min_face_px=64)
    with pytest.raises(prepare.SkipSample) as err:
        prepare.prepare_sample(src / "astronaut.jpg", analyzer, options)
    assert err.value.reason == "face_too_small"
    # Two people of equal size side by side: not a single-person sample.
    face = cv2.imread(str(src / "lfw_000.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(tmp_path / "two.png"), np.concatenate([face, face], axis=1))
    with pytest.raises(prepare.SkipSample) as err:
        prepare.prepare_sample(tmp_path / "two.png", analyzer, options)
    assert err.value.reason == "multiple_faces"
    relaxed = prepare.PrepareOptions(resolution=RESOLUTION, max_other_face_ratio=1.5)
    sample = prepare.prepare_sample(tmp_path / "two.png", analyzer, relaxed)
    assert sample["face_box"].shape == (4,)


def test_resume_reuses_cached_results(prepared, tmp_path):
    src, out, _, _ = prepared
    original = _records(out)
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(builder.dataset_dir(copy))
    # An interrupted run: two results never got written.
    cached = sorted((copy / prepare.WORK_DIR).rglob("*.npz"))
    assert len(cached) == N_FACES + 2
    for file in cached[:2]:
        file.unlink()
    options = prepare.PrepareOptions(resolution=RESOLUTION, min_face_px=16)
    summary = prepare.prepare_dataset(src, copy, options=options, workers=0)
    assert (summary["analysed"], summary["cached"]) == (2, N_FACES)
    shutil.rmtree(builder.dataset_dir(copy))
    summary = prepare.prepare_dataset(src, copy, options=options, workers=0)
    assert (summary["analysed"], summary["cached"]) == (0, N_FACES + 2)
    assert summary["skipped"] == prepared[3]["skipped"]
    rebuilt = _records(copy)
    assert len(rebuilt) == len(original)
    for a, b in zip(original, rebuilt):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # Other options are another cache: nothing is reused.
    other = prepare.PrepareOptions(resolution=96, min_face_px=16)
    assert other.fingerprint() != options.fingerprint()


def test_captions_jsonl(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "b.txt").write_text("sidecar wins\n")
    lines = [{"file": "a.png", "text": " from jsonl "}, {"file": "b.png", "text": "not used"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    items = prepare.list_sources(tmp_path)
    assert [(i.name, i.caption) for i in items] == [("a.png", "from jsonl"),
                                                    ("b.png", "sidecar wins")]
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(ValueError, match="captions.jsonl:1"):
        prepare.list_sources(tmp_path)


def _ids(batch):
    return [hashlib.sha1(p.tobytes()).hexdigest() for p in batch["pixel_values"]]


def _iterator(out, **kwargs):
    args = dict(batch_size=3, seed=0, shard_index=0, shard_count=1, read_threads=2)
    return make_train_iterator(out, **{**args, **kwargs})


def test_batch_shapes_dtypes_ranges(prepared):
    out = prepared[1]
    batch = next(_iterator(out, batch_size=4))
    assert set(batch) == {"pixel_values", "input_text", "face_box", "landmarks", "reference", "original_size",
                          "crops_coords_top_left"}
    px = batch["pixel_values"]
    assert px.shape == (4, RESOLUTION, RESOLUTION, 3) and px.dtype == np.float32
    assert -1 <= px.min() < -0.5 and 0.5 < px.max() <= 1
    assert isinstance(batch["input_text"], list) and all(isinstance(t, str) and t
                                                        for t in batch["input_text"])
    box = batch["face_box"]
    assert box.shape == (4, 4) and box.dtype == np.float32
    assert (box >= 0).all() and (box <= 1).all() and (box[:, 2:] > box[:, :2]).all()
    np.testing.assert_allclose(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1], atol=1e-5)
    marks = batch["landmarks"]
    assert marks.shape == (4, 468, 2) and marks.dtype == np.float32
    assert np.mean((marks > -0.05) & (marks < 1.05)) > 0.95
    ref = batch["reference"]
    assert ref.shape == (4, 224, 224, 3) and ref.dtype == np.float32
    # Masked-out pixels are zero before normalisation: -mean/std after it.
    np.testing.assert_allclose(ref[:, 0, 0], np.broadcast_to(
        -np.asarray(CLIP_MEAN) / np.asarray(CLIP_STD), (4, 3)), rtol=1e-5)
    small = next(_iterator(out, batch_size=4, resolution=64))
    assert small["pixel_values"].shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(small["face_box"], box)


def _time_ids(batch):
    return host_batch(batch, [offline_clip_tokenizer()], 16)["time_ids"]


def test_photo_sizes_and_crop_offsets_become_the_time_ids(prepared):
    """SDXL micro-conditioning: each record carries its photo's (h, w) and the crop's (top, left) in the photo
    resized to R, the offset the stored frame was cut at; the batch's time ids are (h, w, top, left, R, R)."""
    src, out, _, _ = prepared
    records = _records(out)
    rows = set()
    for r in records:
        photo = load_image(src / r["source"].decode())
        (h, w), (top, left) = r["original_size"], r["crops_coords_top_left"]
        assert (h, w) == photo.shape[:2] and r["original_size"].dtype == np.int32
        scale = RESOLUTION / min(h, w)
        resized = cv2.resize(photo, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        offsets = [(y, x) for y in range(resized.shape[0] - RESOLUTION + 1)
                   for x in range(resized.shape[1] - RESOLUTION + 1)]
        error = [np.abs(resized[y:y + RESOLUTION, x:x + RESOLUTION] - r["image"].astype(np.float32)).mean()
                 for y, x in offsets]
        assert offsets[int(np.argmin(error))] == (top, left), r["source"]
        rows.add((h, w, top, left, RESOLUTION, RESOLUTION))
    assert {row[:2] for row in rows} == {(512, 512), (300, 240)} and len({row[2] for row in rows}) > 1
    batch = next(_iterator(out, batch_size=N_FACES, num_epochs=1))
    assert set(map(tuple, _time_ids(batch).astype(int).tolist())) == rows
    half = _time_ids(next(_iterator(out, batch_size=N_FACES, num_epochs=1, resolution=RESOLUTION // 2)))
    assert {tuple(row) for row in half.tolist()} == {(h, w, top / 2, left / 2, 64, 64) for h, w, top, left, *_ in rows}


def test_dataset_without_sizes_gives_the_fixed_time_ids(prepared, tmp_path, capsys):
    """A dataset prepared before the fields: (R, R, 0, 0, R, R) with one note."""
    old = tmp_path / "old"
    shutil.copytree(prepared[1], old)
    spec = builder.dataset_dir(old) / "features.json"
    features = json.loads(spec.read_text())
    for name in ("original_size", "crops_coords_top_left"):
        del features["featuresDict"]["features"][name]
    spec.write_text(json.dumps(features))
    time_ids = _time_ids(next(_iterator(old, batch_size=2)))
    np.testing.assert_array_equal(time_ids, [[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]] * 2)
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and note[0].startswith("note:") and "(R, R, 0, 0, R, R)" in note[0]


def test_seeded_order_epochs_and_state(prepared):
    out = prepared[1]
    run = [next(it) for it in [_iterator(out)] for _ in range(6)]  # 2 epochs of 9 (batch 3)
    again = [next(it) for it in [_iterator(out)] for _ in range(6)]
    assert [_ids(b) for b in run] == [_ids(b) for b in again]
    other = [next(it) for it in [_iterator(out, seed=1)] for _ in range(3)]
    epoch1 = sum((_ids(b) for b in run[:3]), [])
    epoch2 = sum((_ids(b) for b in run[3:]), [])
    assert len(set(epoch1)) == N_FACES and set(epoch1) == set(epoch2)
    assert epoch1 != epoch2  # re-shuffled each epoch
    assert sum((_ids(b) for b in other), []) != epoch1
    # Save after k batches, restore into a fresh iterator: the stream continues exactly.
    it = _iterator(out)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = _iterator(out)
    resumed.set_state(state)
    for expected in run[2:6]:
        got = next(resumed)
        assert _ids(got) == _ids(expected)
        assert got["input_text"] == expected["input_text"]
        np.testing.assert_array_equal(got["reference"], expected["reference"])


def test_host_sharding(prepared):
    out = prepared[1]
    shards = []
    for index in range(2):
        it = _iterator(out, batch_size=2, shard_index=index, shard_count=2, num_epochs=1)
        shards.append(sum((_ids(b) for b in it), []))
    assert sorted(map(len, shards)) == [4, 5]
    assert not set(shards[0]) & set(shards[1])
    everything = sum((_ids(b) for b in _iterator(out, batch_size=1, num_epochs=1)), [])
    assert set(shards[0]) | set(shards[1]) == set(everything) and len(everything) == N_FACES
    with pytest.raises(ValueError, match="divisible"):
        _iterator(out, batch_size=3, shard_index=0, shard_count=2)


@pytest.mark.parametrize("short", [561, 569, 644, 735])
def test_frame_of_a_short_side_scaled_to_the_resolution_has_no_border(short):
    """At r = 1024 these short sides scale to 1023.9999999999999 px: the offset stays 0, no dark rows/columns."""
    r, long = 1024, short * 3 // 2
    scale = r / short
    assert short * scale < r  # the float rounding the fix is about
    oy = prepare.crop_offset(short * scale, 0.1 * r, 0.4 * r, r)
    ox = prepare.crop_offset(long * scale, 0.0, 0.3 * r, r)
    assert oy == 0 and ox == 0
    assert prepare.crop_offset(long * scale, 1.4 * r, long * scale, r) == int(np.floor(long * scale + 1e-6)) - r
    photo = np.full((short, long, 3), 200, np.uint8)
    frame = prepare.frame_image(photo, np.array([[scale, 0, -ox], [0, scale, -oy]]), r)
    assert frame.shape == (r, r, 3) and frame.min() == 200 and frame.max() == 200
