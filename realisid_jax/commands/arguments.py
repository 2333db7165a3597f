"""Argument checks shared by the commands: ``argparse`` ``type=`` functions with ranges, an output-folder check,
and :class:`UsageError`.

A bad value is refused by ``argparse`` itself (one ``usage:`` line plus ``error: argument --x: ...``, exit code 2)
before anything is imported or loaded, so a typo costs nothing and is never replaced by a default.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


class UsageError(ValueError):
    """Bad input found after parsing (a pairing of arguments, an unusable output folder): ``realisid`` prints
    the message as one line and exits with code 2."""


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, image counts, batch sizes)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds, worker counts)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def seed(text: str) -> int:
    """A random seed: an integer from 0 to 2**63 - 1, the range ``jax.random.key`` takes."""
    value = non_negative_int(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"must be below 2**63, got {value}")
    return value


def image_size(text: str) -> int:
    """An image side in pixels: a positive multiple of 64 (the VAE's factor 8 times the UNet's three 2x
    down-samplings)."""
    value = _int(text)
    if value < 64 or value % 64:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 64 pixels, got {value}")
    return value


def finite_float(text: str) -> float:
    """A finite float (guidance scales, ratios); ``nan`` and ``inf`` are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def lora_spec(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` (``--lora``): a LoRA file and its strength (diffusers' ``lora_scale``,
    default 1.0). A tail after the last ``:`` that is not a number is part of the file name."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return path, finite_float(scale)
        except argparse.ArgumentTypeError:
            pass
    return text, 1.0


def non_negative_float(text: str) -> float:
    """A finite float >= 0 (pixel sizes)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def check_output_folder(path: str | os.PathLike, *, flag: str = "--out") -> Path:
    """Checks that ``path`` can become an output folder: not an existing file, and the folder (or its nearest
    existing parent, where it will be created) is writable. Call it before loading any model.

    Raises:
      UsageError: ``path`` is a file, or it cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is an existing file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} is not writable ({existing} does not allow it)")
    return path


def check_fresh_folder(path: Path, *, overwrite: bool, pattern: str = "*", flag: str = "--out") -> None:
    """Refuses an existing ``path`` holding files that match ``pattern`` (an earlier run's output) unless
    ``overwrite``, so two runs' outputs are never mixed.

    Raises:
      UsageError: ``path`` holds such files and ``overwrite`` is false.
    """
    earlier = sorted(path.glob(pattern)) if path.is_dir() else []
    if earlier and not overwrite:
        raise UsageError(f"{flag} {path} already holds {len(earlier)} file(s) of an earlier run ({earlier[0].name}, "
                         "...); choose a new folder or pass --overwrite")
