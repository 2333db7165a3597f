"""``python -m bench.gpu_sampling`` on a CPU with the tiny config (the GPU bench's own test): the table has the
three contenders and a finite PyTorch / JAX ratio; its PyTorch contender's bf16 autocast setting of
``bench.sampling.torch_sampler``."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from bench.models import build_models, make_inputs
from bench.run import load
from bench.sampling import make_sampling_inputs, torch_sampler

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


def test_torch_sampler_under_bf16_autocast_is_the_float32_loop_within_bf16_error():
    """The GPU bench's setting of ``bench.sampling.torch_sampler`` (bf16 autocast, residuals cast to bf16), on a
    CPU: float32 latents near the float32 loop's, not equal to them (autocast took effect). 5 steps: one before the
    ID starts (two predictions), four after (three)."""
    config = load("configs/sdxl.py:tiny")
    models = build_models(config, frameworks=("torch",))
    inputs = make_sampling_inputs(config, make_inputs(config, models.realisid_config, batch=1, persons=1), 5)
    reference = torch_sampler(models, inputs)()
    out = torch_sampler(models, inputs, "cpu", torch.bfloat16)()
    assert out.dtype == torch.float32 and out.shape == reference.shape == (1, 4, 32, 32)
    error = float((out - reference).abs().max()) / max(1.0, float(reference.abs().max()))
    assert 0 < error < 0.1
