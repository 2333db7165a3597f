"""Peak memory per chip of the FSDP training step against the number of chips, with and without gathering each
layer's weights before use (``mesh.gather_weights``): the TPU compiler's own figures, compiled on this host.

    python -m bench.fsdp_peak [--config configs/sdxl.py:micro] [--topology v5e:2x4] [--chips 1 2 4 8]
                              [--gather-weights False True] [--per-device-batch 1] [--resolution 64]
                              [--dump DIR] [--config.a.b=value ...]

Per-chip batch fixed, so an ideal FSDP keeps the activations' share constant and divides the state by the chips.
``--dump DIR`` also writes the compiler's buffer assignment per program (``XLA_FLAGS=--xla_dump_to``) and prints
its largest temporaries: where a peak goes.
"""

from __future__ import annotations

import os

import argparse  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def compile_figures(config, chips: int, devices, per_device_batch: int, resolution: int) -> dict:
    from realisid_jax.training.memory import executable_figures, lower_train_step

    lowered = lower_train_step(config, chips, per_device_batch=per_device_batch, resolution=resolution,
                               devices=devices)
    start = time.perf_counter()
    compiled = lowered.lowered.compile()
    return dict(executable_figures(compiled, time.perf_counter() - start), state_bytes=lowered.state_bytes)


def largest_temporaries(dump: Path, count: int = 6) -> list[str]:
    """The ``count`` largest buffers in HBM ("default" memory space) of the newest training-step dump."""
    reports = sorted(dump.glob("*jit_step*memory-usage-report.txt"), key=lambda p: p.stat().st_mtime)
    if not reports:
        return []
    text = reports[-1].read_text().split("Memory Space: ")
    default = next((part for part in text if part.startswith("default")), "")
    rows = [line.split(";") for line in default.splitlines() if line.count(";") >= 4]
    sized = [(_bytes(r[1]), r[4].strip()) for r in rows if _bytes(r[1]) is not None]
    return [f"{size / MIB:.2f} MiB {shapes[:100]}" for size, shapes in sorted(sized, reverse=True)[:count]]


def _bytes(text: str) -> float | None:
    found = re.fullmatch(r"\s*([\d.]+)(B|KiB|MiB|GiB)\s*", text)
    if not found:
        return None
    return float(found.group(1)) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[found.group(2)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "sdxl.py") + ":micro")
    parser.add_argument("--topology", default="v5e:2x4")
    parser.add_argument("--chips", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--per-device-batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--gather-weights", nargs="+", default=["False", "True"], choices=["False", "True"])
    parser.add_argument("--dump", type=Path, help="write the compiler's buffer assignments here")
    args, overrides = parser.parse_known_args(argv)
    if args.dump:  # read by the compiler when JAX first initialises
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_dump_to={args.dump} --xla_dump_hlo_pass_re=NONE").strip()

    from realisid_jax.cli import choose_platform
    from realisid_jax.config import load_config
    from realisid_jax.training.aot import topology_devices

    choose_platform()  # as `realisid info --topology`: libtpu compiles, with no TPU-runtime start-up text
    devices = topology_devices(args.topology)
    print(f"{args.config} {' '.join(overrides)}, {args.topology} ({devices[0].device_kind}), per-chip batch {args.per_device_batch}, "
          f"{args.resolution} px; MiB per chip")
    print(f"{'gather_weights':>14} {'chips':>5} {'state':>8} {'temp':>8} {'peak':>8} {'GFLOP':>8} {'compile s':>9}")
    for gather in args.gather_weights:
        config = load_config(args.config, [*overrides, f"mesh.gather_weights={gather}"])
        for chips in args.chips:
            f = compile_figures(config, chips, devices, args.per_device_batch, args.resolution)
            print(f"{gather:>14} {chips:>5} {f['state_bytes'] / MIB:8.2f} {f['temp_bytes'] / MIB:8.2f} "
                  f"{f['peak_bytes'] / MIB:8.2f} {f['flops'] / 1e9:8.3f} {f['compile_seconds']:9.0f}", flush=True)
            for line in largest_temporaries(args.dump) if args.dump else []:
                print(f"{'':>16}{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
