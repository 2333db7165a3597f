"""``realisid faces PHOTO... --out DIR``: run face analysis on photos, write JSON and previews.

For each photo ``<stem>.json`` (image size, and per face its box, scores and 468 landmarks, all in
image pixels, largest face first) and ``<stem>.png`` (the photo with masks, boxes and landmarks
drawn) are written to ``--out``. A photo that cannot be read or holds no usable face is reported on
stderr and skipped; the others are still processed, and the exit code is then 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from realisid_jax.face.analysis import POLICIES, Face, FaceAnalyzer
from realisid_jax.face.draw import annotate
from realisid_jax.face.errors import FaceError
from realisid_jax.face.image import load_image


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``faces`` subcommand to ``subparsers``; its handler is ``args.func(args) -> int``."""
    parser = subparsers.add_parser(
        "faces", help="detect faces and landmarks in photos; write JSON and annotated PNGs",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", nargs="+", type=Path, metavar="PHOTO")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--policy", choices=POLICIES, default="all",
                        help="faces kept per photo (default: all, largest first)")
    parser.add_argument("--min-face-px", type=float, default=32.0,
                        help="smallest face kept, longer box side in pixels (default: 32)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Handler of ``realisid faces``; returns 0 if every photo succeeded, else 1."""
    analyzer = FaceAnalyzer(policy=args.policy, min_face_px=args.min_face_px)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    used_stems: set[str] = set()
    for path in args.photos:
        stem = _unique_stem(path.stem, used_stems)
        try:
            image = load_image(path)
            faces = analyzer.analyze(image, source=path)
        except FaceError as err:
            print(f"error: {err}", file=sys.stderr)
            failed.append(path)
            continue
        (args.out / f"{stem}.json").write_text(json.dumps(_record(path, image.shape, faces)))
        preview = annotate(image, [f.box for f in faces], landmarks=[f.landmarks for f in faces],
                           masks=[f.mask for f in faces], scores=[f.score for f in faces])
        Image.fromarray(preview).save(args.out / f"{stem}.png", compress_level=1)  # previews: speed over size
        print(f"{path}: {len(faces)} face(s) -> {args.out / stem}.{{json,png}}")
    if failed:
        print(f"{len(failed)} of {len(args.photos)} photo(s) failed: "
              f"{', '.join(map(str, failed))}", file=sys.stderr)
    return 1 if failed else 0


def _record(path: Path, shape: tuple[int, ...], faces: list[Face]) -> dict:
    return {
        "source": str(path),
        "width": int(shape[1]),
        "height": int(shape[0]),
        "faces": [
            {
                "box": [float(v) for v in f.box],
                "score": f.score,
                "landmark_score": f.landmark_score,
                "detection_box": [float(v) for v in f.detection_box],
                "landmarks": np.round(f.landmarks.astype(np.float64), 3).tolist(),
            }
            for f in faces
        ],
    }


def _unique_stem(stem: str, used: set[str]) -> str:
    """Photos with the same name from different folders must not overwrite each other's output."""
    candidate, n = stem, 1
    while candidate in used:
        candidate, n = f"{stem}-{n}", n + 1
    used.add(candidate)
    return candidate
