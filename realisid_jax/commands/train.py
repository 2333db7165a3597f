"""``realisid train --config FILE --workdir DIR --data DIR``: train RealisID's branches on a prepared dataset.

Resumes from the newest checkpoint in ``DIR/checkpoints`` that restores (a newer corrupt one is skipped with a
warning; ``--resume-step N`` picks one), and says so in one line at start: ``resuming from step N
(DIR/checkpoints/N), data position restored`` (naming newer steps passed over) or ``starting a new run in DIR``.
One run per work directory: a second one stops at once, naming the holder (``realisid_jax.training.workdir_lock``).
SIGTERM (e.g. a TPU preemption) writes a checkpoint and exits 0; a NaN/inf loss or a checkpoint that cannot be
written (a full disk) stops with exit code 1 and leaves the last good checkpoint in place. Multi-host: see
``realisid_jax.training.distributed`` and ``launch/README.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from realisid_jax.commands.arguments import UsageError, check_output_folder, lora_spec, non_negative_int


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``subparsers``; its handler is ``args.func(args) -> int``."""
    parser = subparsers.add_parser(
        "train", help="train the local/global branches and the ID projection",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="config file, e.g. configs/sdxl.py")
    parser.add_argument("--resume-step", type=non_negative_int, default=None, metavar="N",
                        help="resume from checkpoint N instead of the newest one that restores")
    parser.add_argument("--workdir", required=True, help="checkpoints/ and tensorboard/ are written here")
    parser.add_argument("--data", required=True, type=Path,
                        help="dataset folder written by `realisid prepare-data`")
    parser.add_argument("--pretrained", type=Path, default=None,
                        help="the frozen base: a diffusers SDXL/SD1.5 folder (unet/, vae/, text_encoder/, ...), a "
                             "Stability single .safetensors file or a `realisid convert` cache; default: random "
                             "weights (smoke tests)")
    parser.add_argument("--variant", default=None,
                        help="weights variant of a folder base, e.g. fp16; default: plain files, or the only one")
    parser.add_argument("--lora", action="append", type=lora_spec, default=None, metavar="FILE[:SCALE]",
                        help="LoRA merged into the frozen UNet / text encoders before the branches are copied from "
                             "the UNet (as realisid sample); repeatable")
    parser.add_argument("--image-encoder", type=Path, default=None,
                        help="transformers CLIPVisionModelWithProjection folder; default: random weights")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Handler of ``realisid train``: 0 when finished or stopped by SIGTERM, 1 on a non-finite loss or a checkpoint
    that could not be written (the previous one is kept)."""
    # distributed start-up must precede any JAX backend use, hence the imports here.
    from realisid_jax.training import distributed

    distributed.maybe_initialize()
    from realisid_jax.commands.weights import enable_compilation_cache
    from realisid_jax.config import load_config

    # A restarted or resumed run (preemption) reuses the step's executable instead of compiling it again.
    enable_compilation_cache()

    config = load_config(args.config, args.config_overrides)
    _check_counts(config.train)
    _check_data(args.data, int(config.train.batch_size))
    if args.lora and args.pretrained is None:
        raise UsageError("--lora needs --pretrained: a LoRA is made for real weights")
    if "://" not in args.workdir:
        check_output_folder(args.workdir, flag="--workdir")
    from realisid_jax.training.checkpoint import CheckpointWriteError
    from realisid_jax.training.loop import NonFiniteLossError
    from realisid_jax.training.trainer import train

    try:
        result = train(config, args.workdir, data_dir=args.data, pretrained=args.pretrained,
                       image_encoder=args.image_encoder, variant=args.variant, loras=args.lora or (),
                       resume_step=args.resume_step)
    except (NonFiniteLossError, CheckpointWriteError) as err:  # a failed run, not bad input: exit 1
        print(f"error: {err}", file=sys.stderr)
        return 1
    status = "stopped by SIGTERM" if result.preempted else "finished"
    print(f"{status} at step {result.step}; checkpoints in {Path(args.workdir) / 'checkpoints'}")
    return 0


def _check_counts(train) -> None:
    """The step loop batches by ``batch_size`` and checkpoints at multiples of ``checkpoint_every``: both must be
    at least 1, found here rather than after minutes of model building.

    Raises:
      UsageError: naming the field.
    """
    for field in ("batch_size", "checkpoint_every"):
        if not isinstance(train[field], int) or train[field] < 1:  # None passes the config's type check
            raise UsageError(f"--config.train.{field} must be at least 1, got {train[field]}")


def _check_data(data: Path, batch_size: int) -> None:
    """Checks ``--data`` before any model is built: a prepared dataset with at least one batch per process, whose
    shard files open and hold the examples its info file lists.

    Raises:
      UsageError: missing, not written by ``realisid prepare-data``, its info file unreadable, or too small.
      DatasetReadError: a shard file missing, cut short or damaged, named.
    """
    import jax

    from realisid_jax.data.builder import check_shards, dataset_dir

    hint = f"prepare one with `realisid prepare-data --src PHOTOS --out {data}`"
    if not data.is_dir():
        raise UsageError(f"--data {data} does not exist; {hint}")
    info = dataset_dir(data) / "dataset_info.json"
    if not info.is_file():
        raise UsageError(f"--data {data} is not a prepared dataset (no {info.relative_to(data)}); {hint}")
    try:
        splits = {s["name"]: s for s in json.loads(info.read_text())["splits"]}
        shard_lengths = [int(n) for n in splits.get("train", {}).get("shardLengths", [])]
    except (ValueError, KeyError, TypeError) as err:  # a file cut short or edited: JSONDecodeError is a ValueError
        raise UsageError(f"--data {data}: {info.relative_to(data)} does not read ({type(err).__name__}: {err}); "
                         f"prepare the dataset again with `realisid prepare-data --overwrite`") from None
    # A shard cut short (an interrupted copy) is found in milliseconds here, not after minutes of model building.
    check_shards(data, "train", shard_lengths)
    examples, processes = sum(shard_lengths), jax.process_count()
    if examples // processes < batch_size // processes:
        raise UsageError(f"--data {data} holds {examples} examples: fewer than one batch of "
                         f"{batch_size // processes} per process ({processes} process(es)); add photos or lower "
                         "--config.train.batch_size")
