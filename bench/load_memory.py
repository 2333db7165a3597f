"""Peak host memory and time of ``from_pretrained`` on a full-size SDXL UNet (fp32 safetensors, ~10.3 GB).

    python bench/load_memory.py [--config configs/sdxl.py] [--tmp DIR]

Writes a UNet of the config's shapes (``UNet2DConditionModel.abstract``, no parameters built) with random fp32
values, in PyTorch names and layouts, one tensor at a time into a temporary folder (the safetensors format by
hand: 8-byte little-endian header length, JSON header, then each tensor's bytes), so writing never holds the
model. A fresh subprocess then loads it with ``from_pretrained(UNet2DConditionModel, folder)`` (float32) and
reports the load time and its peak RSS (``ru_maxrss``), absolute and above the RSS before loading, against the
file size; the loader should hold the placed model plus about one tensor, not a second full copy. The parent
kills the child if the machine's available memory drops under 3 GB. The folder is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_FLOOR_BYTES = 3 * 2**30


def _unet(config_path: str):
    from realisid_jax.config import load_config
    from realisid_jax.models.registry import frozen_configs

    cls, cfg = frozen_configs(load_config(config_path))["unet"]
    return cls, cfg


def _torch_tensors(cls, cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(PyTorch key, PyTorch-layout shape) of every parameter, from the abstract model."""
    from flax import nnx

    from realisid_jax.loading.torch_state import to_torch_layout

    out = []
    for path, variable in nnx.to_flat_state(nnx.state(cls.abstract(cfg, dtype=np.float32))):
        # A zero-stride view: the layout's shape without allocating the tensor.
        shape = to_torch_layout(str(path[-1]), np.broadcast_to(np.float32(0), variable.shape)).shape
        out.append((cls.torch_key(path), tuple(shape)))
    return out


def write_unet(folder: Path, config_path: str) -> int:
    """Writes ``config.json`` and ``diffusion_pytorch_model.safetensors``; returns the weights file's size."""
    cls, cfg = _unet(config_path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    tensors = _torch_tensors(cls, cfg)
    header, offset = {}, 0
    for key, shape in tensors:
        size = 4 * int(np.prod(shape))
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data start to 8 bytes
    rng = np.random.default_rng(0)
    path = folder / "diffusion_pytorch_model.safetensors"
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for _, shape in tensors:
            f.write((rng.standard_normal(int(np.prod(shape)), dtype=np.float32) * 0.02).tobytes())
    return path.stat().st_size


def _proc_bytes(path: str, field: str) -> int:
    """A ``kB`` field of a /proc file (``/proc/self/status`` VmRSS, ``/proc/meminfo`` MemAvailable) in bytes."""
    with open(path) as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in {path}")


def _rss_bytes() -> int:
    return _proc_bytes("/proc/self/status", "VmRSS")


def load_unet(folder: Path) -> dict:
    """In this (fresh) process: loads the UNet and returns seconds and RSS figures in bytes."""
    import jax
    from flax import nnx

    from realisid_jax.loading.pretrained import from_pretrained
    from realisid_jax.models.unet_2d_condition import UNet2DConditionModel

    before = _rss_bytes()
    start = time.perf_counter()
    model = from_pretrained(UNet2DConditionModel, folder)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"seconds": seconds, "rss_before": before, "peak_rss": peak, "rss_after": _rss_bytes()}


def _available_bytes() -> int:
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def _watch(child: subprocess.Popen, tripped: list) -> None:
    """Kills ``child`` when the machine's available memory drops under the floor."""
    while child.poll() is None:
        if _available_bytes() < _FLOOR_BYTES:
            tripped.append(True)
            child.kill()
            return
        time.sleep(0.2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/sdxl.py")
    p.add_argument("--tmp", default=os.environ.get("BENCH_TMP"), help="folder for the temporary UNet")
    p.add_argument("--load", type=Path, help=argparse.SUPPRESS)  # the child process's mode
    args = p.parse_args()
    if args.load:
        print(json.dumps(load_unet(args.load)))
        return 0
    tmp = Path(tempfile.mkdtemp(dir=args.tmp, prefix="load_memory_"))
    try:
        start = time.perf_counter()
        size = write_unet(tmp / "unet", args.config)
        print(f"wrote {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s")
        child = subprocess.Popen([sys.executable, __file__, "--load", str(tmp / "unet")], stdout=subprocess.PIPE,
                                 text=True)
        tripped: list = []
        watcher = threading.Thread(target=_watch, args=(child, tripped), daemon=True)
        watcher.start()
        out, _ = child.communicate()
        watcher.join()
        if tripped:
            print("aborted: available memory fell under 3 GB", file=sys.stderr)
            return 1
        if child.returncode:
            return child.returncode
        r = json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    grown = r["peak_rss"] - r["rss_before"]
    print(f"load {r['seconds']:.1f} s; RSS before {r['rss_before'] / 1e9:.2f} GB, peak {r['peak_rss'] / 1e9:.2f} GB "
          f"({r['peak_rss'] / size:.2f}x the file), peak above before {grown / 1e9:.2f} GB ({grown / size:.2f}x), "
          f"after {r['rss_after'] / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
