"""``python -m bench.gpu_sampling`` on a CPU with the tiny config (the GPU bench's own test): the table has the
three contenders and a finite PyTorch / JAX ratio."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_sampling_bench_runs_on_cpu_with_the_tiny_config():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a one-GPU host
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_sampling", "--config", "configs/sdxl.py:tiny",
                           "--device", "cpu", "--steps", "2", "--size", "128", "--repeat", "1"],
                          cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("realisid-jax GPU sampling bench: configs/sdxl.py:tiny, 128² px, 2 steps")
    assert lines[1].split()[:2] == ["contender", "work"]
    rows = {cells[0]: cells for cells in (re.split(r"\s{2,}", line) for line in lines[3:-1])}
    assert set(rows) == {"jax", "torch", "diffusers"}
    for name, (_, _, cold, warm, peak, build, versus) in rows.items():
        assert float(cold) > 0 and float(warm) > 0 and float(build) > 0, name
        assert peak == "-"  # no device allocator on a CPU
        assert versus.endswith("x")
    ratio = float(re.fullmatch(r"ratio PyTorch / JAX, same work, warm s/img: (\S+)x", lines[-1]).group(1))
    assert math.isfinite(ratio) and ratio > 0
