"""``realisid <command>``: one sub-command per module of ``realisid_jax.commands``.

Config fields are overridden with ``--config.a.b=value`` after the command's own arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("info", "faces", "sample", "prepare_data", "evaluate", "benchmark_prompts", "convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realisid", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"realisid_jax.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    args.config_overrides = rest
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
