"""Bucketed persons: one person's guided denoising step under ``max_persons`` 4 and 1 (issue 15).

The pipeline cuts the persons to ``person_bucket`` slots, so a one-person request should cost the same
whatever ``max_persons`` is. Prints XLA's cost-analysis FLOPs of one step (``_denoise`` with one step,
lowered with the arguments the pipeline passed) and the wall time per step, for 1 person at K = 4,
1 person at K = 1 and 4 persons at K = 4 (what every request cost before the buckets).

    HF_HUB_OFFLINE=1 python -m bench.persons --config configs/sdxl.py:tiny [--steps 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from realisid_jax.config import load_config
from realisid_jax.models.vae import VAE_SCALE_FACTOR
from realisid_jax.realisid import pipeline as pipeline_module
from realisid_jax.realisid.conditions import PersonConditions


def _conditions(config, persons: int, max_persons: int) -> PersonConditions:
    """Synthetic conditions (no face analysis): ``persons`` valid slots of ``max_persons``."""
    rng = np.random.default_rng(0)
    clip = config.model.image_encoder["image_size"]
    px = VAE_SCALE_FACTOR * config.realisid.local_latent_size
    boxes = np.tile(np.array([[0.1, 0.1, 0.3, 0.3]], np.float32), (max_persons, 1))
    return PersonConditions(rng.standard_normal((max_persons, clip, clip, 3), np.float32),
                            rng.uniform(0, 1, (max_persons, px, px, 3)).astype(np.float32), boxes,
                            np.arange(max_persons) < persons, ())


def measure(config_path: str, persons: int, max_persons: int, steps: int) -> tuple[float, float]:
    """(FLOPs of one denoising step, seconds per step after compilation)."""
    config = load_config(config_path)
    config.realisid.max_persons = max_persons
    config.realisid.persons_per_pass = 0  # one pass: XLA's cost analysis counts a scan's body once
    pipe = pipeline_module.RealisIDPipeline.from_config(config)
    conditions = _conditions(config, persons, max_persons)
    size = dict(height=config.sampling.height, width=config.sampling.width)
    denoise, calls = pipeline_module._denoise, []
    # Records the pipeline's arguments (one step: the ID from the start, three predictions).
    pipeline_module._denoise = lambda *a, **kw: calls.append((a, kw)) or denoise(*a, **kw)
    try:
        pipe("a photo", conditions, num_inference_steps=1, progress=False, **size)
    finally:
        pipeline_module._denoise = denoise
    cost = denoise.lower(*calls[0][0], **calls[0][1]).compile().cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    pipe("a photo", conditions, num_inference_steps=steps, progress=False, **size)  # compiles the decode too
    start = time.perf_counter()
    pipe("a photo", conditions, num_inference_steps=steps, progress=False, seed=1, **size)
    return flops, (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sdxl.py:tiny")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    rows = [(1, 4), (1, 1), (4, 4)]
    results = {row: measure(args.config, *row, args.steps) for row in rows}
    base = results[(1, 1)][0]
    print(f"{args.config}: one guided step (3 predictions), {args.steps} steps timed (incl. VAE decode)")
    for (persons, k), (flops, seconds) in results.items():
        print(f"  {persons} person(s), max_persons={k}: {flops / 1e9:10.2f} GFLOP  ({flops / base:.3f}x)  "
              f"{seconds * 1e3:8.1f} ms/step")


if __name__ == "__main__":
    main()
