"""``realisid glyphs``: the glyph world, a synthetic identity world to train and score RealisID in.

- ``glyphs prepare --out RUN``: the stage — its training set, its own base models (VAE, SDXL-architecture UNet,
  CLIP image encoder, as a diffusers pipeline folder ``RUN/base``) and the independent scorer — with the figures
  in ``RUN/report.md``. A re-run skips the finished parts and resumes an interrupted training from its
  checkpoint. Sizes and steps: ``configs/sdxl.py:glyphs``, section ``glyphs``.
- ``glyphs make-data --out DATA``: the world's training set in the project's dataset format, for
  ``realisid train --config configs/sdxl.py:glyphs --data DATA``.
- ``glyphs evaluate --run RUN --branches BRANCHES --out REPORT``: the benchmark of RealisID variants (base only,
  local only, global only, both, no delayed ID, plain CFG) on a fixed request set, scored per box size, in
  ``REPORT/report.md``; resumable (``realisid_jax.glyphs.benchmark``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from realisid_jax.commands.arguments import UsageError, check_output_folder, non_negative_int, positive_int

DEFAULT_CONFIG = "configs/sdxl.py:glyphs"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``glyphs`` subcommand (``glyphs prepare``, ``make-data``, ``evaluate``) to ``subparsers``."""
    p = subparsers.add_parser("glyphs", help="the glyph world: a synthetic identity world to train and score in",
                              description=__doc__)
    actions = p.add_subparsers(dest="action", required=True)
    prepare = actions.add_parser("prepare", help="training set, base models and scorer of the glyph world",
                                 description=__doc__)
    prepare.add_argument("--out", required=True, type=Path, help="run folder (created; a re-run resumes it)")
    prepare.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file[:variant] (default {DEFAULT_CONFIG})")
    prepare.add_argument("--parts", default=None,
                         help="comma-separated parts to run, in the stage's order (default: all): "
                              "data,vae,image_encoder,unet,scorer,base_scenes")
    prepare.set_defaults(func=run_prepare)
    _register_make_data(actions)
    _register_evaluate(actions)
    return p


def _register_make_data(actions) -> None:
    p = actions.add_parser("make-data", help="the world's training set, for `realisid train --data`",
                           description="Writes N scenes of the glyph world (training styles; 1 or 2 glyphs; the "
                                       "first glyph is the subject, another appearance of it the reference) as the "
                                       "project's TFDS dataset under OUT (replacing one there), at the config's "
                                       "train.resolution with references at model.image_encoder.image_size.")
    p.add_argument("--out", required=True, type=Path, help="dataset folder (`realisid train --data OUT`)")
    p.add_argument("--count", type=positive_int, default=None, help="scenes (default: config glyphs.data_count)")
    p.add_argument("--seed", type=non_negative_int, default=None, help="world seed (default: config glyphs.seed)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file[:variant] (default {DEFAULT_CONFIG})")
    g = p.add_argument_group("precomputed training inputs (train.precomputed_inputs), as `realisid prepare-data`")
    g.add_argument("--precompute", action="store_true",
                   help="also store the frozen encoders' outputs (VAE posterior, text and image features)")
    g.add_argument("--base", type=Path, default=None, help="the base pipeline folder, e.g. RUN/base (--precompute)")
    g.add_argument("--image-encoder", type=Path, default=None,
                   help="image encoder folder (default: the base's image_encoder/)")
    g.add_argument("--precompute-dtype", choices=("float16", "float32"), default="float16",
                   help="storage of the precomputed tensors (default float16)")
    p.set_defaults(func=run_make_data)


def _register_evaluate(actions) -> None:
    p = actions.add_parser("evaluate", help="benchmark RealisID variants in the glyph world, per box size",
                           description="Samples a fixed request set (held-out-style references, 1 and 2 persons, "
                                       "box edges 1/2 to 1/10 of the image, rotations, every palette colour) "
                                       "with each variant through the RealisID pipeline (RUN/base, BRANCHES, "
                                       "RUN/base/image_encoder), scores it with RUN/scorer and writes "
                                       "REPORT/report.md, report.json, identity_vs_box.png and grid.png. A re-run "
                                       "skips finished variants and images already written.")
    p.add_argument("--run", required=True, type=Path, help="a `realisid glyphs prepare` folder (base/, scorer/)")
    p.add_argument("--branches", type=Path, default=None,
                   help="trained branches (`realisid export`); needed by every variant but base")
    p.add_argument("--out", required=True, type=Path, help="report folder (created; a re-run resumes it)")
    p.add_argument("--variants", default=None,
                   help="comma-separated variants, in the report's order (default: all: base,local,global,"
                        "realisid,no_delay,plain_cfg)")
    p.add_argument("--per-cell", type=positive_int, default=4,
                   help="requests per (person count, box size) cell; 12 cells (default 4)")
    p.add_argument("--images-per-request", type=positive_int, default=1,
                   help="images per request, sampled as one batch (default 1)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="denoising steps (default: config sampling.num_inference_steps)")
    p.add_argument("--seed", type=non_negative_int, default=None,
                   help="request set seed (default: benchmark.DEFAULT_SEED)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file[:variant] (default {DEFAULT_CONFIG})")
    p.set_defaults(func=run_evaluate)


def run_prepare(args: argparse.Namespace) -> int:
    """Handler: 0 when every asked part is finished."""
    from realisid_jax.config import load_config
    from realisid_jax.glyphs import prepare

    config = load_config(args.config, args.config_overrides)
    if "glyphs" not in config:
        raise UsageError(f"--config {args.config} has no glyphs section; use {DEFAULT_CONFIG}")
    parts = prepare.PARTS if args.parts is None else tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = [p for p in parts if p not in prepare.PARTS]
    if unknown:
        raise UsageError(f"--parts: unknown {', '.join(unknown)}; the parts are {', '.join(prepare.PARTS)}")
    prepare.prepare(args.out, config, parts=parts)
    print(f"glyph world ready in {args.out}: base pipeline {args.out / 'base'}, scorer {args.out / 'scorer'}, "
          f"figures {args.out / 'report.md'}")
    return 0


def _glyph_config(args):
    from realisid_jax.config import load_config

    config = load_config(args.config, args.config_overrides)
    if "glyphs" not in config:
        raise UsageError(f"--config {args.config} has no glyphs section; use {DEFAULT_CONFIG}")
    return config


def run_make_data(args: argparse.Namespace) -> int:
    """Handler: 0 when the dataset is written."""
    from realisid_jax.glyphs import dataset

    config = _glyph_config(args)
    if args.precompute != (args.base is not None):
        raise UsageError("--precompute and --base go together: the base holds the encoders whose outputs are stored")
    if args.image_encoder is not None and not args.precompute:
        raise UsageError("--image-encoder is only read with --precompute")
    out = check_output_folder(args.out)
    count = config.glyphs.data_count if args.count is None else args.count
    seed = config.glyphs.seed if args.seed is None else args.seed
    encoder = None
    if args.precompute:
        from realisid_jax.data.precompute import load_input_encoder

        image_encoder = args.image_encoder or args.base / "image_encoder"
        encoder = load_input_encoder(config, args.base, image_encoder=image_encoder, dtype=args.precompute_dtype)
    dataset.write_world_dataset(out, seed=seed, count=count, size=config.train.resolution,
                                reference_size=config.model.image_encoder.image_size, encoder=encoder)
    print(f"wrote {count} glyph-world examples (seed {seed}) to {out}: "
          f"realisid train --config {args.config} --data {out} ...")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Handler: 0 when every asked variant is sampled, scored and reported."""
    from realisid_jax.commands.weights import enable_compilation_cache
    from realisid_jax.glyphs import benchmark

    config = _glyph_config(args)
    variants = benchmark.VARIANTS if args.variants is None else tuple(
        v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in benchmark.VARIANTS]
    if unknown or not variants:
        raise UsageError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; the variants are "
                         f"{', '.join(benchmark.VARIANTS)}")
    if args.branches is None and any(v != "base" for v in variants):
        raise UsageError("--branches is needed for every variant but base (`realisid export` writes them)")
    out = check_output_folder(args.out)
    enable_compilation_cache()
    try:
        benchmark.evaluate(args.run, args.branches, out, config, variants=variants, per_cell=args.per_cell,
                           seed=benchmark.DEFAULT_SEED if args.seed is None else args.seed,
                           num_inference_steps=args.steps,
                           images_per_request=args.images_per_request)
    except benchmark.SettingsMismatchError as err:
        raise UsageError(str(err)) from None
    print(f"benchmark of {', '.join(variants)} in {out}: {out / 'report.md'}, {out / 'identity_vs_box.png'}")
    return 0
