"""``realisid train --config FILE --workdir DIR --data DIR``: train RealisID's branches on a prepared dataset.

Resumes from the newest checkpoint in ``DIR/checkpoints`` when there is one. SIGTERM (e.g. a TPU
preemption) writes a checkpoint and exits 0; a NaN/inf loss stops with exit code 1 and leaves the last good
checkpoint in place. Multi-host: see ``realisid_jax.training.distributed`` and ``launch/README.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``subparsers``; its handler is ``args.func(args) -> int``."""
    parser = subparsers.add_parser(
        "train", help="train the local/global branches and the ID projection",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="config file, e.g. configs/sdxl.py")
    parser.add_argument("--workdir", required=True, help="checkpoints/ and tensorboard/ are written here")
    parser.add_argument("--data", required=True, type=Path,
                        help="dataset folder written by `realisid prepare-data`")
    parser.add_argument("--pretrained", type=Path, default=None,
                        help="diffusers SDXL/SD1.5 folder (unet/, vae/, text_encoder/, ...) for the frozen base; "
                             "default: random weights (smoke tests)")
    parser.add_argument("--image-encoder", type=Path, default=None,
                        help="transformers CLIPVisionModelWithProjection folder; default: random weights")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Handler of ``realisid train``: 0 when finished or stopped by SIGTERM, 1 on a non-finite loss."""
    # distributed start-up must precede any JAX backend use, hence the imports here.
    from realisid_jax.training import distributed

    distributed.maybe_initialize()
    from realisid_jax.config import load_config
    from realisid_jax.training.trainer import train
    from realisid_jax.training.loop import NonFiniteLossError

    config = load_config(args.config, args.config_overrides)
    try:
        result = train(config, args.workdir, data_dir=args.data, pretrained=args.pretrained,
                       image_encoder=args.image_encoder)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    status = "stopped by SIGTERM" if result.preempted else "finished"
    print(f"{status} at step {result.step}; checkpoints in {Path(args.workdir) / 'checkpoints'}")
    return 0
