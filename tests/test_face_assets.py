"""Asset cache: extraction from a wheel, hash check, idempotence, atomicity, pip failures."""
import hashlib
import os
import sys
import zipfile

import pytest

from realisid_jax import assets

PAYLOAD = b"model bytes\n"


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake asset whose 'download' builds a local wheel; counts downloads."""
    monkeypatch.setenv("REALISID_CACHE", str(tmp_path / "cache"))
    asset = assets.Asset("model.bin", "fakepkg==1.0", "fakepkg/data/model.bin",
                         hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)
    calls = []

    def download(requirement, pip_args, dest):
        calls.append(requirement)
        wheel = dest / "fakepkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(asset.member, wheel_content[0])
        return wheel

    wheel_content = [PAYLOAD]
    monkeypatch.setattr(assets, "_download_wheel", download)
    return asset, calls, wheel_content


def test_extracts_once_and_leaves_no_temporaries(fake):
    asset, calls, _ = fake
    path = assets.asset_path(asset.name)
    assert path == assets.cache_dir() / "model.bin" and path.read_bytes() == PAYLOAD
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert assets.asset_path(asset.name) == path and assets.fetch([asset.name]) == {
        asset.name: path}
    assert calls == ["fakepkg==1.0"]  # cached: no second download
    assert sorted(os.listdir(assets.cache_dir())) == ["model.bin"]


def test_corrupt_cached_file_is_replaced(fake):
    asset, calls, _ = fake
    path = assets.asset_path(asset.name)
    path.write_bytes(b"truncated")
    assert assets.asset_path(asset.name).read_bytes() == PAYLOAD
    assert len(calls) == 2


def test_hash_mismatch_raises_and_writes_nothing(fake):
    asset, _, wheel_content = fake
    wheel_content[0] = b"tampered"
    with pytest.raises(assets.AssetError, match="sha256"):
        assets.asset_path(asset.name)
    assert not (assets.cache_dir() / asset.name).exists()
    assert os.listdir(assets.cache_dir()) == []


def test_pip_failure_is_a_clear_error(tmp_path):
    with pytest.raises(assets.AssetError, match="pip download of 'realisid-no-such-pkg==0.0.0'"):
        assets._download_wheel("realisid-no-such-pkg==0.0.0", ("--no-index",), tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("REALISID_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "realisid_jax"


def test_cli_rejects_unknown_name(capsys):
    with pytest.raises(SystemExit) as info:
        assets.main(["no-such-asset"])
    assert info.value.code == 2 and "no-such-asset" in capsys.readouterr().err


def test_real_assets_verified():
    """The real pinned wheels (network or a local wheelhouse needed the first time)."""
    try:
        paths = assets.fetch()
    except assets.AssetError as err:
        pytest.skip(f"wheels unavailable: {err}")
    assert set(paths) == {"face_detection_short_range.tflite", "face_landmark.tflite",
                          "bpe_simple_vocab_16e6.txt.gz"}
    assert assets.clip_bpe_file().read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert assets.face_landmark_model().stat().st_size == 1242398
    assert "mediapipe" not in sys.modules and "open_clip" not in sys.modules
