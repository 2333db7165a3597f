"""``realisid convert``: PyTorch weights -> one orbax checkpoint that later runs restore straight onto shardings.

    realisid convert --config configs/sdxl.py --base sd_xl_base_1.0.safetensors --out weights/sdxl
    realisid convert --config configs/sdxl.py --base SDXL_PIPELINE_FOLDER --branches EXPORTED --out DIR

``--base`` is a diffusers pipeline folder (``unet/``, ``vae/``, ``text_encoder/``, ...) or an original-layout
single ``.safetensors`` file. The branches come from ``--branches`` (an ``export_branches`` folder), or are
initialised from the UNet (ControlNet ``from_unet``) with a fresh ID projection. Load the result with
``realisid_jax.loading.orbax_cache.load_converted``, or pass it as ``--base`` to ``sample`` / ``train``: it
records the source's tokenizer pad tokens and scheduler config, so it gives the source's images.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from realisid_jax.config import load_config
from realisid_jax.models.modeling_utils import count_params

if TYPE_CHECKING:
    from flax import nnx


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert PyTorch weights into an orbax checkpoint (fast sharded loads)")
    p.add_argument("--config", required=True, help="config file, e.g. configs/sdxl.py")
    p.add_argument("--base", required=True, help="diffusers pipeline folder or single-file .safetensors checkpoint")
    p.add_argument("--branches", help="folder written by export_branches (local_branch/, global_branch/, "
                                      "id_projection/); default: branches initialised from the UNet")
    p.add_argument("--image-encoder", help="CLIP vision encoder folder, in place of --base's image_encoder/ "
                                           "(single files hold none)")
    p.add_argument("--out", required=True, help="new output directory")
    p.set_defaults(func=run)


def load_base(base: str, config, *, image_encoder: str | None = None) -> dict[str, nnx.Module]:
    """The frozen models of ``--base`` (``load_single_file`` for a ``.safetensors`` file, ``load_model_folders``
    for a folder; the config decides what is loaded) and of ``--image-encoder``.

    Raises:
      HubIdError / FileNotFoundError: a source is no local file or folder. ValueError / CheckpointMismatchError:
      as the two loaders.
    """
    from realisid_jax.loading.pipeline_folder import load_model_folders
    from realisid_jax.loading.single_file import load_single_file

    if Path(base).is_file():
        return {**load_single_file(base, config), **load_model_folders(None, config, image_encoder=image_encoder)}
    return load_model_folders(base, config, image_encoder=image_encoder)


def convert(config, base: str, out: str, *, branches: str | None = None, image_encoder: str | None = None,
            log=print) -> dict[str, int]:
    """Loads every component, writes the orbax cache to ``out``; returns name -> parameter count.

    Raises:
      FileNotFoundError / HubIdError: a source missing. ValueError: ``out`` exists, or a source's
      ``config.json`` differs from the config. CheckpointMismatchError: weights that do not fit the config.
    """
    from realisid_jax.models.registry import dtypes
    from realisid_jax.realisid.branches import RealisID, RealisIDConfig
    from realisid_jax.realisid.components import (abstract_branches, base_scheduler_config, base_tokenizers,
                                                  load_branches)
    from realisid_jax.loading.orbax_cache import save_converted

    start = time.perf_counter()
    models = load_base(base, config, image_encoder=image_encoder)
    if "unet" not in models:
        raise FileNotFoundError(f"{base} holds no UNet")
    realisid_config = RealisIDConfig.from_config(config)
    if branches is not None:
        models["realisid"] = load_branches(branches, realisid=abstract_branches(config), **dtypes(config))
    else:
        models["realisid"] = RealisID.from_unet(models["unet"], realisid_config)
    log(f"loaded {', '.join(models)} in {time.perf_counter() - start:.1f} s")
    absent = [n for n in ("text_encoder", "text_encoder_2", "image_encoder", "vae")
              if n not in models and config.model.get(n) is not None]
    if absent:
        log(f"not in the sources (load them separately): {', '.join(absent)}")
    start = time.perf_counter()
    path = save_converted(out, models, config, pad_tokens=[t.pad_token for t in base_tokenizers(base, config)],
                          scheduler_config=base_scheduler_config(base))
    log(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    return {name: count_params(model) for name, model in models.items()}


def run(args) -> int:
    config = load_config(args.config, args.config_overrides)
    counts = convert(config, args.base, args.out, branches=args.branches, image_encoder=args.image_encoder)
    width = max(map(len, counts))
    for name, n in counts.items():
        print(f"{name:<{width}}  {n:>15,}")
    return 0
