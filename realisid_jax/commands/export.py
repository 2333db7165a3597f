"""``realisid export --workdir DIR --out FOLDER [--step N]``: a training checkpoint's branches as diffusers
folders (``local_branch/``, ``global_branch/``, ``id_projection/``, ``realisid.json``), the ``--branches``
input of ``realisid sample``. The run's config is read from the checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from realisid_jax.commands.arguments import UsageError, check_output_folder, non_negative_int


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``subparsers``; its handler is ``args.func(args) -> int``."""
    p = subparsers.add_parser("export", help="write a training checkpoint's branches as diffusers folders",
                              description=__doc__)
    p.add_argument("--workdir", required=True, type=Path, help="the run's work directory (holds checkpoints/)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--step", type=non_negative_int, default=None,
                   help="checkpoint step (default: the newest finished one that restores; a newer corrupt "
                        "one is skipped with a one-line warning, as `realisid train` resumes)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handler: 0; a missing checkpoint raises FileNotFoundError (``cli`` prints it, exit code 2)."""
    from realisid_jax.training.checkpoint_export import export_checkpoint

    if not (args.workdir / "checkpoints").is_dir():
        raise UsageError(f"--workdir {args.workdir} holds no checkpoints/ folder (not a `realisid train` work "
                         "directory)")
    check_output_folder(args.out)
    step = export_checkpoint(args.workdir, args.out, args.step)
    print(f"exported step {step} of {args.workdir} to {args.out}; use: realisid sample --branches {args.out}")
    return 0
