"""Python config files (big_vision style): ``get_config()`` returns an ``ml_collections.ConfigDict``.

Model sections hold the diffusers/transformers ``config.json`` keys verbatim, so a config and a checkpoint
folder describe a model the same way. Any field is overridable from the command line: ``--config.a.b=value``.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from realisid_jax.errors import first_line
from realisid_jax.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
    """Fields common to every model size: RealisID defaults (method notes), sampling, training, mesh."""
    c = ml_collections.ConfigDict()
    c.dtype = "float32"  # computation dtype: float32 | bfloat16
    c.param_dtype = "float32"  # storage of the trainable branches (master weights; AdamW moments follow)
    c.frozen_param_dtype = "float32"  # storage of the frozen UNet, VAE, text and image encoders
    # Kernels, chosen here and never by backend: attention xla | splash (TPU Pallas kernel) | cudnn (GPU) |
    # chunked (XLA:CPU) | None (JAX picks); convolutions xla | im2col (XLA:CPU, small maps as one matmul).
    c.attention_impl = "xla"
    c.conv_impl = "xla"
    # gather_weights: each conv / linear layer all-gathers its FSDP-sharded kernel just before use (ZeRO-3,
    # models.layers.GatheredKernel) instead of the SPMD partitioner's own choice; it pays at tiny widths only
    # (docs/training.md, "FSDP and the peak per chip").
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules=DEFAULT_RULES, gather_weights=False))
    c.realisid = ml_collections.ConfigDict(dict(
        max_persons=4,            # K, static: persons are padded with a validity mask
        local_scale=1.0,          # conditioning_scale of the local branch
        global_scale=1.0,         # conditioning_scale of the global branch
        local_latent_size=64,     # crop up-sampled to this many latent cells (local branch input)
        persons_per_pass=0,       # persons per branch pass, the passes in sequence (0: all max_persons at once)
        landmark_layout="face_mesh",  # how c_pe is drawn (face.draw.LANDMARK_LAYOUTS): face_mesh | square (glyphs)
        reference_analysis="face",    # reference / pose photo analysis: face | plain_background (glyph pictures)
        # "No text", one definition for training's text dropout and sampling's ε_none (paper Eq. 8) when the
        # negative prompt is empty: "empty_prompt" encodes "" (what the trained branches saw); "zeros" is
        # all-zero context and pooled embeds, diffusers' SDXL default (force_zeros_for_empty_prompt), kept for
        # parity with diffusers' pipelines; branches trained with "empty_prompt" never saw zeros.
        no_text="empty_prompt",
        # The class of the trainable part, as an import path, so that a subclass (another branch, another
        # relocation) is built by the components, the trainer and the pipeline alike, from the command line too:
        # --config.realisid.branches_class=my_package.heads:HeadBranchRealisID (realisid.branches.branches_class).
        branches_class="realisid_jax.realisid.branches:RealisID",
    ))
    c.sampling = ml_collections.ConfigDict(dict(
        height=1024, width=1024, num_inference_steps=30, scheduler="ddim",
        text_guidance_scale=7.5,   # lambda_t, paper Eq. 8
        id_guidance_scale=5.0,     # lambda_i, paper Eq. 8
        id_start_fraction=0.2,     # delayed subject conditioning: ID off for the first 20% of steps
        num_images_per_prompt=1, seed=0,
        negative_prompt="",
        # Storage of the branches when sampling, cast once at load: "" = the compute dtype (``dtype``; bf16 on
        # accelerators: what makes SDXL sampling fit one 16 GiB v5e chip, docs/sampling.md). Training keeps its
        # fp32 masters and exported branches their dtype.
        param_dtype="",
    ))
    c.train = ml_collections.ConfigDict(dict(
        resolution=1024, batch_size=16, learning_rate=1e-5, weight_decay=1e-2, warmup_steps=1000,
        max_grad_norm=1.0, num_steps=100_000, face_loss_weight=1.0,  # lambda, paper Eq. 7
        drop_id_prob=0.05, drop_text_prob=0.05, drop_both_prob=0.05,
        checkpoint_every=1000, keep_checkpoints=3, log_every=10, seed=0, remat=True,
        remat_policy="nothing_saveable",  # jax.checkpoint_policies entry for every remat block
        # Rows of identical layers (SDXL's 10-deep transformer stacks) as one lax.scan in the step (maxtext's
        # scan_layers): its program holds one layer's code instead of each layer's, for a stacked copy of those
        # weights while it runs (models/layer_scan.py). Sampling keeps the layers unrolled.
        scan_layers=False,
        # Train from the frozen encoders' outputs stored by `prepare-data --precompute` (VAE latent distribution,
        # text embeddings, CLIP image features): the VAE, text and image encoders are neither loaded nor in the
        # step; training samples (sample_every) need them and are refused.
        precomputed_inputs=False,
        # Sample images (``workdir/samples/``); 0 turns them off. Reference: a photo path, "" = the astronaut.
        sample_every=5000, sample_prompt="a photo of a person, portrait", sample_reference="",
    ))
    return c


class ConfigError(ValueError):
    """An override that names no field, has no ``=value``, or a value of the wrong type (one-line message)."""


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Runs ``get_config()`` of a config file (``get_config(variant)`` for ``FILE:variant``, big_vision's
    spelling, e.g. ``configs/sdxl.py:tiny``), then applies ``a.b=value`` overrides (values parsed as Python
    literals when they are, else kept as strings; ConfigDict keeps each field's type).

    Raises:
      FileNotFoundError: no such config file. ConfigError: a file that is not a Python config (it does not
      run, has no ``get_config``, or that refuses the variant), an override that names no field, lacks
      ``=value``, or whose value does not fit the field's type (e.g. ``num_inference_steps=abc``).
    """
    path, _, variant = str(path).partition(":")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"_realisid_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config(variant) if variant else module.get_config()
    except (SyntaxError, ValueError, TypeError, KeyError, AttributeError, NameError, UnicodeDecodeError) as err:
        # A text file given as the config, a typo in a variant: the user's input, so one line, not a traceback.
        raise ConfigError(f"config {path}{':' * bool(variant)}{variant} does not load: {type(err).__name__}: "
                          f"{first_line(err)}") from err
    for item in overrides:
        _override(config, item.removeprefix("--config."))
    return config


def _override(config: ml_collections.ConfigDict, item: str) -> None:
    key, equals, raw = item.partition("=")
    if not equals:
        raise ConfigError(f"--config.{item}: give a value, --config.{key}=VALUE")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    parent = config
    *parents, leaf = key.split(".")
    for depth, name in enumerate(parents):
        parent = parent.get(name) if isinstance(parent, ml_collections.ConfigDict) else None
        if not isinstance(parent, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key}: config has no section {'.'.join(parents[:depth + 1])!r}")
    if leaf not in parent:
        close = ", ".join(sorted(parent.keys()))
        raise ConfigError(f"--config.{key}: config has no field {key!r} (fields here: {close})")
    try:
        parent[leaf] = value
    except (TypeError, ValueError):
        raise ConfigError(f"--config.{key}={raw}: expected {type(parent[leaf]).__name__}, "
                          f"got {type(value).__name__}") from None
