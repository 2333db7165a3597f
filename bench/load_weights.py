"""Loading one component from the orbax cache vs from a diffusers safetensors folder.

    python bench/load_weights.py --config configs/sd15.py --component unet [--mesh 2,4,1] [--devices 8]

Writes a randomly initialised component both ways into a temporary folder, then times (best of ``--repeat``)
``from_pretrained(folder)`` and ``load_converted(cache)`` until every array is ready on its devices. Both
files are read from the page cache after being written (warm); with ``--mesh`` each parameter goes to its
logical-axis sharding (``--devices N`` simulates N CPU devices).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from realisid_jax.loading.pretrained import from_pretrained


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/sdxl.py:tiny")
    p.add_argument("--component", default="unet", choices=["unet", "vae"])
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes, e.g. 2,4,1")
    p.add_argument("--devices", type=int, default=None, help="simulated CPU devices")
    p.add_argument("--repeat", type=int, default=3)
    return p.parse_args()


def _ready(model):
    import jax
    from flax import nnx

    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        _ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    args = _parse()
    if args.devices:
        import jax

        jax.config.update("jax_num_cpu_devices", args.devices)
    import jax
    from flax import nnx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from realisid_jax.config import load_config
    from realisid_jax.models.registry import FROZEN, dtypes
    from realisid_jax.models.modeling_utils import count_params
    from realisid_jax.sharding import make_mesh
    from realisid_jax.loading.branch_folders import export_module
    from realisid_jax.loading.orbax_cache import load_converted, save_converted

    config = load_config(args.config)
    cls, config_class = FROZEN[args.component]
    model_config = config_class.from_dict(dict(config.model[args.component]))
    mesh = make_mesh(tuple(int(s) for s in args.mesh.split(","))) if args.mesh else None
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        start = time.perf_counter()
        model = cls(model_config, rngs=nnx.Rngs(0), **dtypes(config))
        n = count_params(model)
        folder = export_module(model, Path(tmp) / "diffusers", cls.__name__)
        cache = save_converted(Path(tmp) / "orbax", {args.component: model}, config)
        del model
        size = (folder / "diffusion_pytorch_model.safetensors").stat().st_size
        print(f"{args.config} {args.component}: {n:,} parameters, {size / 2**20:,.0f} MiB safetensors; "
              f"written in {time.perf_counter() - start:.1f} s; {len(jax.devices())} devices, mesh {args.mesh}")
        from_safetensors = _best(lambda: from_pretrained(cls, folder, mesh=mesh, **dtypes(config)), args.repeat)
        from_orbax = _best(lambda: load_converted(cache, config, mesh=mesh)[args.component], args.repeat)
    print(f"from_pretrained (safetensors): {from_safetensors:8.2f} s")
    print(f"load_converted (orbax):        {from_orbax:8.2f} s   ({from_safetensors / from_orbax:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
