"""``realisid prepare-data``: captioned photos -> the TFDS training dataset (``realisid_jax.data``)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from realisid_jax.commands.arguments import (UsageError, check_output_folder, finite_float, image_size,
                                             non_negative_float, non_negative_int, positive_int)

# data.precomputed.STORAGE_DTYPES (not imported here: registering the command stays light)
_STORAGE_DTYPES = ("float16", "float32")

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
                    "to OUT/prepare_summary.json; every source file that is not in the dataset "
                    "(skipped photo, caption without a photo, other file) is listed with its reason "
                    "in OUT/skipped.jsonl. Captions that are not UTF-8 are read as Windows-1252 or "
                    "Latin-1 and named in the summary. With --precompute, the frozen encoders' outputs are "
                    "stored too, for train.precomputed_inputs (training then loads no VAE, text or image "
                    "encoder).")
    p.add_argument("--src", required=True, metavar="FOLDER",
                   help="photos with a sidecar NAME.txt caption each, or a captions.jsonl "
                        '({"file": ..., "text": ...} per line) in their folder')
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output folder; one that holds a finished dataset or other files is refused "
                        "unless --overwrite (an interrupted run's folder is resumed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the dataset in --out (its cached per-photo results are reused; "
                        "other files there are kept)")
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
    g = p.add_argument_group("precomputed training inputs (train.precomputed_inputs)")
    g.add_argument("--precompute", action="store_true",
                   help="also store each example's VAE latent distribution, text embeddings and CLIP image "
                        "features, and the empty prompt's embeddings once; needs --config and --base")
    g.add_argument("--base", default=None,
                   help="the frozen encoders: a diffusers SDXL / SD1.5 folder, a Stability single .safetensors "
                        "file or a `realisid convert` cache (the base `train --pretrained` will use)")
    g.add_argument("--image-encoder", default=None,
                   help="CLIP vision model folder (transformers format); default the base's image_encoder/")
    g.add_argument("--variant", default=None, help="weights variant of a folder base, e.g. fp16")
    g.add_argument("--precompute-dtype", choices=_STORAGE_DTYPES, default="float16",
                   help="storage of the precomputed tensors (default float16; ~1.2 MB per example at SDXL 1024 px)")
    g.add_argument("--precompute-batch-size", type=positive_int, default=8, metavar="B",
                   help="examples per encoder call (default 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Handler: prepares the dataset, prints the summary JSON; 2 on an input error, 1 when the disk fills up (no
    part of the dataset is kept)."""
    from realisid_jax.data.builder import DatasetWriteError
    from realisid_jax.data.prepare import PrepareOptions, prepare_dataset

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _check_out(args.out, args.overwrite)
    _check_precompute(args)
    resolution, reference_size = args.resolution, args.reference_size
    config = None
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
        encoder = None
        if args.precompute:  # loaded before the long analysis: bad weights stop the run at once
            from realisid_jax.data.precompute import load_input_encoder

            encoder = load_input_encoder(config, args.base, image_encoder=args.image_encoder, variant=args.variant,
                                         dtype=args.precompute_dtype, batch_size=args.precompute_batch_size)
        summary = prepare_dataset(args.src, args.out, options=options, workers=args.workers, encoder=encoder)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DatasetWriteError as err:  # a full disk, a quota: the run failed, not its input
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


def _check_precompute(args: argparse.Namespace) -> None:
    """``--precompute`` comes with ``--config`` and ``--base``; the weight flags only with ``--precompute``.

    Raises:
      UsageError: naming the missing or the stray flag.
    """
    weights = [flag for flag, value in (("--base", args.base), ("--image-encoder", args.image_encoder),
                                        ("--variant", args.variant)) if value is not None]
    if not args.precompute:
        if weights:
            raise UsageError(f"{weights[0]} is only read with --precompute (the frozen encoders' outputs)")
        return
    missing = [flag for flag, value in (("--config", args.config), ("--base", args.base)) if value is None]
    if missing:
        raise UsageError(f"--precompute needs {' and '.join(missing)}: the config describes the encoders, the base "
                         f"holds their weights")


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuses an ``--out`` holding a finished dataset or files that ``prepare-data`` does not write, unless
    ``overwrite``; a folder with only an interrupted run's cache and partial dataset is resumed.

    Raises:
      UsageError: such a folder without ``overwrite``, or an ``--out`` that is a file or not writable.
    """
    from realisid_jax.data.builder import DATASET_NAME
    from realisid_jax.data.prepare import SUMMARY_FILE, WORK_DIR

    check_output_folder(out)
    if overwrite or not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if SUMMARY_FILE in entries:
        raise UsageError(f"--out {out} already holds a prepared dataset ({SUMMARY_FILE}); choose a new folder "
                         f"or pass --overwrite (its cached per-photo results in {WORK_DIR}/ are reused)")
    foreign = [name for name in entries if name not in (WORK_DIR, DATASET_NAME)]
    if foreign:
        raise UsageError(f"--out {out} is not empty and not an interrupted prepare-data run ({len(foreign)} "
                         f"other entries, e.g. {foreign[0]}); choose a new folder or pass --overwrite")
