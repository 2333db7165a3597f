"""``realisid faces``: a batch with one bad file writes the rest and exits non-zero."""
import argparse
import json

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from realisid_jax.commands import faces as faces_command

pytestmark = pytest.mark.usefixtures("face_models")


def _run(argv):
    parser = argparse.ArgumentParser(prog="realisid")
    faces_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_batch_with_bad_files(tmp_path, capsys):
    astronaut = skimage.data.astronaut()
    Image.fromarray(astronaut).save(tmp_path / "astronaut.png", compress_level=1)
    two = np.full((600, 1100, 3), 128, np.uint8)
    two[40:552, 20:532] = astronaut
    two[300:556, 700:956] = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    Image.fromarray(two).save(tmp_path / "two.jpg", quality=95)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.full((300, 300), 90, np.uint8)).save(tmp_path / "grey.png")
    out = tmp_path / "out"
    photos = ["astronaut.png", "corrupt.png", "two.jpg", "grey.png"]
    code = _run(["faces", *[str(tmp_path / p) for p in photos], "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert "corrupt.png" in err and "grey.png" in err and "2 of 4" in err
    assert sorted(p.name for p in out.iterdir()) == [
        "astronaut.json", "astronaut.png", "two.json", "two.png"]

    record = json.loads((out / "two.json").read_text())
    assert (record["width"], record["height"]) == (1100, 600)
    assert len(record["faces"]) == 2
    big, small = record["faces"]
    assert big["box"][2] - big["box"][0] > small["box"][2] - small["box"][0]
    assert np.array(big["landmarks"]).shape == (468, 2)
    assert 0 < big["score"] <= 1
    preview = np.asarray(Image.open(out / "two.png"))
    assert preview.shape == (600, 1100, 3) and not np.array_equal(preview, two)


def test_policy_and_success_exit_code(tmp_path):
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "a.png", compress_level=1)
    (tmp_path / "sub").mkdir()
    Image.fromarray(skimage.data.astronaut()).save(tmp_path / "sub" / "a.png", compress_level=1)
    out = tmp_path / "out"
    code = _run(["faces", str(tmp_path / "a.png"), str(tmp_path / "sub" / "a.png"), "--out",
                 str(out), "--policy", "largest"])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"a.json", "a.png", "a-1.json", "a-1.png"}
    assert len(json.loads((out / "a-1.json").read_text())["faces"]) == 1
