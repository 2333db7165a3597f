"""Smoke test of ``python -m bench.run``: the tiny config, one repetition, prints the table (no timings checked)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_run_tiny_prints_table():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # One step size (K = 1) keeps this under a minute on 2 shared cores; the step section also builds both
    # frameworks' models, checks JAX against PyTorch and counts recompilations.
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--config", "tiny", "--only", "step",
                           "--persons", "1", "--repeat", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("realisid-jax bench, config tiny")
    assert lines[1].split()[:3] == ["section", "measurement", "unit"]
    rows = {cells[1]: cells for cells in (re.split(r"\s{2,}", line) for line in lines[3:])}
    assert set(rows) == {"denoising step, K=1", "recompiles (new latents/timestep/boxes)"}
    _, _, unit, jax_s, torch_s, _, note = rows["denoising step, K=1"]
    assert unit == "s" and float(jax_s) > 0 and float(torch_s) > 0
    error = float(note.split("max(1,max|torch|)=")[1].split(";")[0])
    assert error < 1e-4  # the two frameworks computed the same step
