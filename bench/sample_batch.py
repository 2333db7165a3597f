"""``realisid sample-batch`` over N one-image requests against N separate ``realisid sample`` runs of the same
requests, each timed from the command's start to its exit (start-up, model building, compiling, sampling,
writing), in one run; prints images/s of both and their ratio.

    python -m bench.sample_batch [--count 24] [--config configs/sdxl.py:tiny] [--batch-size 8] [--out DIR]
                                 [--config.a.b=value ...]

Random weights (no ``--base``), one person per request: the astronaut photo shipped with scikit-image.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOX = (40, 30, 88, 78)  # the face of skimage.data.astronaut(), 512² photo


def write_requests(folder: Path, count: int) -> Path:
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    path = folder / "requests.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i:02d}", "prompt": f"a photo of a person, number {i}", "seed": i,
                                        "persons": [{"photo": "astronaut.png", "box": list(BOX)}]}) + "\n"
                            for i in range(count)))
    return path


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--config", default="configs/sdxl.py:tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, help="keep the images here (default: a temporary folder)")
    args, overrides = parser.parse_known_args(argv)
    realisid = [sys.executable, "-m", "realisid_jax.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        requests = write_requests(out, args.count)
        batched = timed([*realisid, "sample-batch", "--config", args.config, *overrides, "--requests", str(requests),
                         "--out", str(out / "batch"), "--batch-size", str(args.batch_size)])
        separate = sum(timed([*realisid, "sample", "--config", args.config, *overrides, "--face",
                              str(out / "astronaut.png"), "--box", ",".join(map(str, BOX)), "--seed", str(i),
                              "--prompt", f"a photo of a person, number {i}", "--out", str(out / f"single{i:02d}")])
                       for i in range(args.count))
    print(f"{args.count} images, {args.config} {' '.join(overrides)}")
    print(f"sample-batch (--batch-size {args.batch_size}): {batched:.1f} s, {args.count / batched:.3f} images/s")
    print(f"{args.count} x sample: {separate:.1f} s, {args.count / separate:.3f} images/s")
    print(f"ratio: {separate / batched:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
