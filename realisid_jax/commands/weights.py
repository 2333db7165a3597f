"""What every command that samples shares: the weight flags, the persistent compilation cache, and the one
pipeline builder (``sample``, ``app``, ``benchmark-prompts``; ``train`` takes the cache)."""

from __future__ import annotations

import argparse

from realisid_jax.commands.arguments import UsageError, lora_spec

RANDOM_WEIGHTS_NOTE = ("no --base given: using the config's RANDOM weights, which make noise, not faces. For real "
                       "images pass --base (a diffusers SDXL folder), --branches (trained RealisID weights, "
                       "`realisid train`) and --image-encoder (a CLIP ViT-H/14 vision folder).")
_MAX_RANDOM_UNET = 100_000_000  # above this, random weights are surely a mistake: ask for --base


def add_weight_arguments(p: argparse.ArgumentParser) -> None:
    """``--base``, ``--branches``, ``--image-encoder``, ``--variant`` and ``--lora`` (repeatable)."""
    p.add_argument("--base", default=None, help="real weights: a diffusers SDXL / SD1.5 pipeline folder, a Stability "
                                                "single .safetensors file or a `realisid convert` cache")
    p.add_argument("--branches", default=None, help="trained RealisID branches folder (realisid export)")
    p.add_argument("--image-encoder", default=None, help="CLIP vision model folder (transformers format)")
    p.add_argument("--variant", default=None,
                   help="weights variant, e.g. fp16 (model.fp16.safetensors); default: plain files, or the only one")
    p.add_argument("--lora", action="append", type=lora_spec, default=None, metavar="FILE[:SCALE]",
                   help="LoRA merged into the UNet / text encoders once at load (diffusers/peft or kohya "
                        ".safetensors), strength SCALE (default 1); repeatable")


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache under the project cache: a second run of the same shapes loads its
    programs instead of compiling them (minutes at SDXL size)."""
    import jax

    from realisid_jax.assets import cache_dir

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax_compilation_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def build_pipeline(config, args):
    """The ``RealisIDPipeline`` of ``args``' weight flags on the config's mesh (all devices; weights sharded,
    the batch split): real weights with ``--base``, else the config's random weights with a note.

    Raises:
      UsageError: ``--lora`` without ``--base``. SystemExit: a full-size config without ``--base``.
    """
    from realisid_jax.commands.info import parameter_counts
    from realisid_jax.realisid.pipeline import RealisIDPipeline
    from realisid_jax.sharding import make_mesh

    mesh = make_mesh(tuple(config.mesh.shape))
    if args.base is None:
        if getattr(args, "lora", None):
            raise UsageError("--lora needs --base: a LoRA is made for real weights")
        if parameter_counts(config)["unet"] > _MAX_RANDOM_UNET:
            raise SystemExit("error: this config is full size; random weights would only make noise slowly. "
                             "Pass --base DIFFUSERS_FOLDER (and --branches, --image-encoder).")
        print(f"note: {RANDOM_WEIGHTS_NOTE}")
        return RealisIDPipeline.from_config(config, seed=config.sampling.seed, mesh=mesh)
    pipeline = RealisIDPipeline.from_pretrained(config, args.base, branches=args.branches,
                                                image_encoder=args.image_encoder, variant=args.variant, mesh=mesh)
    for path, scale in args.lora or ():
        pipeline.load_lora(path, scale)
    return pipeline
