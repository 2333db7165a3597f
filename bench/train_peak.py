"""Fits and checks ``training.peak_law``: the training step's per-chip peak from its parts, on TPU compiles of
SDXL's widths cut in depth and resolution (the full step does not compile within this host's 24 GiB).

    python -m bench.train_peak [--only NAME ...] [--results bench/train_peak.json]

Each point is compiled once (the TPU compiler, libtpu, on this host: 5-12 min and up to ~15 GiB each) and kept
in ``--results``; a re-run compiles only the points missing there. The law is fitted on the ``fit`` points and
its peak checked on the ``check`` points (compiles left out of the fit); then the estimate for the full SDXL
step on each topology of ``ESTIMATES``. Paste the printed ``PeakLaw`` into ``training/peak_law.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
GIB = 2**30
# SDXL's widths, trained from precomputed inputs; depth cut per point.
BASE = ["train.precomputed_inputs=True"]


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    role: str  # "fit", "check", or outside the law's domain
    layers_per_block: int
    transformer_layers: tuple[int, int, int]
    resolution: int
    topology: str = "v5e:2x4"
    chips: int = 8
    per_device_batch: int = 1

    def overrides(self) -> list[str]:
        return [*BASE, f"model.unet.layers_per_block={self.layers_per_block}",
                f"model.unet.transformer_layers_per_block={self.transformer_layers}"]


POINTS = [
    Point("depth1-256", "fit", 1, (0, 1, 1), 256),
    Point("depth1-384", "fit", 1, (0, 1, 1), 384),
    Point("stack2-256", "fit", 1, (0, 1, 2), 256),
    Point("stack4-256", "fit", 1, (0, 1, 4), 256),
    Point("stack2-256-4chips", "fit", 1, (0, 1, 2), 256, topology="v5e:2x2", chips=4),
    Point("layers2-stack4-320", "check", 2, (0, 2, 4), 320),
    # Outside the law's domain (batch 1 per chip): kept to show how far off it is at batch 2.
    Point("depth1-256-batch2", "batch 2", 1, (0, 1, 1), 256, per_device_batch=2),
]
ESTIMATES = ["v5e:2x4", "v4:2x2x1", "v5p:2x2x1", "v6e:2x4"]


def measure(point: Point) -> dict:
    """The compiled step's figures and its ``StepParts`` (bytes per chip)."""
    from realisid_jax.config import load_config
    from realisid_jax.training.aot import host_peak_rss_bytes, topology_devices
    from realisid_jax.training.memory import train_step_memory
    from realisid_jax.training.peak_law import residual_bytes_per_device, step_parts

    config = load_config(ROOT / "configs" / "sdxl.py", point.overrides())
    devices = topology_devices(point.topology)
    parts = step_parts(config, point.chips, per_device_batch=point.per_device_batch,
                       resolution=point.resolution, devices=devices)
    start = time.perf_counter()
    plan = train_step_memory(config, point.chips, per_device_batch=point.per_device_batch,
                             resolution=point.resolution, devices=devices)
    untiled = residual_bytes_per_device(config, point.chips, point.per_device_batch, point.resolution, tiled=False)
    return dict(parts=dataclasses.asdict(parts), untiled_residual_bytes=untiled,
                argument_bytes=plan.argument_bytes, temp_bytes=plan.temp_bytes,
                peak_bytes=plan.peak_bytes, compile_seconds=round(time.perf_counter() - start),
                host_gib=round(host_peak_rss_bytes() / GIB, 1))


def fit_and_check(results: dict):
    from realisid_jax.training.peak_law import PeakLaw, StepParts, fit_law

    fitted = [p for p in POINTS if p.role == "fit" and p.name in results]
    if len(fitted) < 4:
        print(f"{len(fitted)} of the fit points compiled; the law needs 4")
        return None
    law = PeakLaw(fit_law([StepParts(**results[p.name]["parts"]) for p in fitted],
                          [results[p.name]["temp_bytes"] for p in fitted]), float("nan"))
    errors = {}
    print(f"\n{'point':<20} {'role':<6} {'state':>8} {'resid.':>8} {'grads':>8} {'block':>8} {'temp':>8} "
          f"{'peak':>8} {'law':>8} {'error':>7} {'compile s':>9} {'host GiB':>8}   (MiB per chip)")
    for p in POINTS:
        if p.name not in results:
            continue
        r = results[p.name]
        parts = StepParts(**r["parts"])
        estimate = law.peak_bytes(parts)
        errors[p.name] = (estimate - r["peak_bytes"]) / r["peak_bytes"]
        print(f"{p.name:<20} {p.role:<6} {parts.state_bytes / MIB:8.1f} {parts.residual_bytes / MIB:8.1f} "
              f"{parts.gradient_bytes / MIB:8.1f} {parts.block_bytes / MIB:8.1f} {r['temp_bytes'] / MIB:8.1f} "
              f"{r['peak_bytes'] / MIB:8.1f} {estimate / MIB:8.1f} {100 * errors[p.name]:6.1f}% "
              f"{r['compile_seconds']:9d} {r['host_gib']:8.1f}")
    checked = [abs(errors[p.name]) for p in POINTS if p.role == "check" and p.name in errors]
    law = dataclasses.replace(law, check_error=max(checked) if checked else float("nan"))
    a, b, c, d = law.coefficients
    print(f"\nPeakLaw(coefficients=({a:.4f}, {b:.4f}, {c:.4f}, {d:.0f}), check_error={law.check_error:.4f})")
    return law


def estimate_sdxl(law) -> None:
    from realisid_jax.config import load_config
    from realisid_jax.training.aot import topology_devices
    from realisid_jax.training.peak_law import step_parts

    config = load_config(ROOT / "configs" / "sdxl.py", ["train.precomputed_inputs=True"])
    print(f"\nfull SDXL step, {config.train.resolution} px, batch 1 per chip, precomputed inputs (GiB per chip):")
    for topology in ESTIMATES:
        devices = topology_devices(topology)
        parts = step_parts(config, len(devices), devices=devices)
        print(f"{topology:>10} {len(devices):>2} devices: state {parts.state_bytes / GIB:.2f}, residuals "
              f"{parts.residual_bytes / GIB:.2f}, gradients {parts.gradient_bytes / GIB:.2f}, largest block "
              f"{parts.block_bytes / GIB:.2f}, estimated peak {law.peak_bytes(parts) / GIB:.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "train_peak.json")
    parser.add_argument("--only", nargs="+", help="compile only these points (names of POINTS)")
    parser.add_argument("--no-estimate", action="store_true", help="skip the full SDXL estimates")
    args = parser.parse_args(argv)

    from realisid_jax.cli import choose_platform

    choose_platform()
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    for point in POINTS:
        if point.name in results or (args.only and point.name not in args.only):
            continue
        print(f"compiling {point.name} ...", flush=True)
        results[point.name] = measure(point)
        args.results.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    law = fit_and_check(results)
    if law is not None and not args.no_estimate:
        estimate_sdxl(law)
    return 0


if __name__ == "__main__":
    sys.exit(main())
