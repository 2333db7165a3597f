"""``realisid <command>``: one sub-command per module of ``realisid_jax.commands``.

Config fields are overridden with ``--config.a.b=value`` after the command's own arguments.
Exit codes: 0 done; 2 bad input (one ``error:`` line on stderr, nothing written); 1 a failure of the run itself
(e.g. a non-finite training loss).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.metadata
import importlib.util
import os
import sys

from realisid_jax.errors import one_line

COMMANDS = ("info", "faces", "sample", "app", "prepare_data", "train", "export", "evaluate", "benchmark_prompts",
            "convert", "glyphs", "sample_batch", "tune_cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realisid", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"realisid_jax.commands.{name}").register(subparsers)
    return parser


def choose_platform() -> None:
    """On a host with no TPU chip: JAX on the CPU when nothing else could run it, and a quiet libtpu.

    There ``JAX_PLATFORMS`` is set to ``cpu``, unless the user set it or a PJRT plugin for another accelerator
    (a GPU) is installed: JAX would otherwise load libtpu (the ``tpu`` extra, 0.7 GB) to try a TPU runtime
    that cannot start. libtpu still loads where a TPU-topology plan is compiled (``realisid info --topology``);
    it is given the worker list and host bounds of a one-host slice (each unless set), the values a TPU VM
    reads from its metadata server, without which it prints start-up errors (``E0000 ...
    TPU_WORKER_HOSTNAMES``). A TPU VM is left as it is.
    """
    import jax

    if _tpu_attached():
        return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
    other_plugins = (importlib.util.find_spec("jax_plugins") is not None
                     or bool(importlib.metadata.entry_points(group="jax_plugins")))
    if "JAX_PLATFORMS" not in os.environ and not other_plugins:
        os.environ["JAX_PLATFORMS"] = "cpu"  # for child processes (e.g. the spawned data-preparation workers)
        jax.config.update("jax_platforms", "cpu")  # this process read the variable when it imported JAX


def _tpu_attached() -> bool:
    # TPU chips on the PCI bus, by the check JAX's own TPU set-up uses; or, where a container hides the bus, the
    # device files libtpu opens: /dev/accel* (TPU v2-v4, v5p) or VFIO groups (v5e and later).
    from jax._src import hardware_utils

    return (hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
            or bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))


def main(argv: list[str] | None = None) -> int:
    choose_platform()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    args.config_overrides = rest
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        # Bad input is reported as one clear message, not a traceback.
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from realisid_jax.assets import AssetError
    from realisid_jax.commands.arguments import UsageError
    from realisid_jax.config import ConfigError
    from realisid_jax.data.builder import DatasetReadError
    from realisid_jax.realisid.conditions import BoxError, SizeError, TooManyPersonsError
    from realisid_jax.app.metadata import MetadataError
    from realisid_jax.face.errors import FaceError
    from realisid_jax.text.tokenizer import TokenizerError
    from realisid_jax.loading.errors import CheckpointMismatchError, LoraError
    from realisid_jax.training.checkpoint import CheckpointError
    from realisid_jax.training.workdir_lock import WorkdirLockedError

    return (FileNotFoundError, NotADirectoryError, UsageError, ConfigError, AssetError, BoxError, SizeError,
            TooManyPersonsError, FaceError, TokenizerError, CheckpointMismatchError, CheckpointError,
            WorkdirLockedError, MetadataError, LoraError, DatasetReadError)


if __name__ == "__main__":
    sys.exit(main())
