"""``realisid prepare-data``: captioned photos -> the TFDS training dataset (``realisid_jax.data``)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from realisid_jax.commands.arguments import finite_float, image_size, non_negative_float, non_negative_int, positive_int

_DEFAULT_RESOLUTION = 1024
_DEFAULT_REFERENCE_SIZE = 224


def register(subparsers) -> None:
    """Add the ``prepare-data`` sub-command to an ``argparse`` sub-parser set."""
    p = subparsers.add_parser(
        "prepare-data", help="build the training dataset from captioned photos",
        description="Detect, square-crop and mask the subject's face in each photo (single-person "
                    "photos only), resize and crop the photo to the training resolution, and write "
                    "a TFDS array_record dataset to OUT/realisid_faces. Interrupted runs resume: "
                    "per-photo results are cached in OUT/_work. A summary with skip counts goes "
                    "to OUT/prepare_summary.json, the skipped files to OUT/skipped.jsonl.")
    p.add_argument("--src", required=True, metavar="FOLDER",
                   help="photos with a sidecar NAME.txt caption each, or a captions.jsonl "
                        '({"file": ..., "text": ...} per line) in their folder')
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="config file: --resolution defaults to train.resolution and "
                        "--reference-size to model.image_encoder.image_size")
    p.add_argument("--resolution", type=image_size, default=None, metavar="N",
                   help=f"training image side (default: config, else {_DEFAULT_RESOLUTION})")
    p.add_argument("--reference-size", type=positive_int, default=None, metavar="S",
                   help=f"CLIP reference crop side (default: config, else {_DEFAULT_REFERENCE_SIZE})")
    p.add_argument("--workers", type=non_negative_int, default=os.cpu_count() or 1, metavar="W",
                   help="face-analysis processes; 0 analyses in this process (default: CPU count)")
    p.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg",
                   help="encoding of the stored training image (default jpeg)")
    p.add_argument("--min-face-px", type=non_negative_float, default=32.0,
                   help="smallest square face box side at the training resolution (default 32)")
    p.add_argument("--max-other-face-ratio", type=finite_float, default=0.5,
                   help="skip photos whose second face is at least this fraction of the largest "
                        "(default 0.5)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Handler: prepares the dataset, prints the summary JSON; 2 on an input error."""
    from realisid_jax.data.prepare import PrepareOptions, prepare_dataset

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    resolution, reference_size = args.resolution, args.reference_size
    if args.config is not None:
        from realisid_jax.config import load_config

        config = load_config(args.config, getattr(args, "config_overrides", ()))
        resolution = resolution or config.train.resolution
        reference_size = reference_size or config.model.image_encoder.image_size
    try:
        options = PrepareOptions(
            resolution=resolution or _DEFAULT_RESOLUTION,
            reference_size=reference_size or _DEFAULT_REFERENCE_SIZE,
            image_format=args.image_format, min_face_px=args.min_face_px,
            max_other_face_ratio=args.max_other_face_ratio)
        summary = prepare_dataset(args.src, args.out, options=options, workers=args.workers)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
