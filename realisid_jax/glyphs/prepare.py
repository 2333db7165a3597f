"""``realisid glyphs prepare``: the glyph world's stage — training set, base models, scorer — in one run folder.

Layout of ``RUN``::

    data/                 the world's training set (project dataset format, ``glyphs.dataset``)
    base/                 a diffusers SDXL pipeline folder (``model_index.json``, ``unet/``, ``vae/``,
                          ``text_encoder(_2)/``, ``tokenizer(_2)/``, ``scheduler/``, ``image_encoder/``):
                          ``--base RUN/base``, ``--pretrained RUN/base``, ``--image-encoder RUN/base/image_encoder``
    scorer/               the independent glyph scorer (``glyphs.scorer``)
    base_scenes/          the base model's scenes for the world's requests, with ``manifest.jsonl``
    work/<part>/          each training's checkpoints (resumed when a run is interrupted)
    parts/<part>.json     a finished part's figures: a re-run skips it
    report.json, report.md

Every part is seeded from ``config.glyphs.seed``; its size (examples, steps, batches) comes from ``config.glyphs``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np

from realisid_jax.glyphs import dataset, manifest, report, world
from realisid_jax.loading import pipeline_writer
from realisid_jax.loading.branch_folders import export_module
from realisid_jax.loading.pretrained import from_pretrained
from realisid_jax.text.tokenizer import standard_tokenizers

PARTS = ("data", "vae", "image_encoder", "unet", "scorer", "base_scenes")


class Run:
    """A stage's run folder: paths, and the finished parts' figures (``parts/<part>.json``)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def figures(self, part: str) -> dict | None:
        path = self.root / "parts" / f"{part}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def finish(self, part: str, figures: dict) -> dict:
        path = self.root / "parts" / f"{part}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(figures, indent=2) + "\n")
        tmp.replace(path)  # atomic: a part is finished or not, never half-written
        return figures


def _text_encoders(run: Run, config) -> list:
    """The two CLIP text towers, random-initialised and frozen (the UNet learns to read them: the captions differ
    only in the background's name and the glyph count); those of an earlier run's ``RUN/base`` when it has them, so
    that a UNet trained further reads the towers it was trained with."""
    from realisid_jax.glyphs import text_to_image
    from realisid_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection

    folders = [run / "base" / name for name in ("text_encoder", "text_encoder_2")]
    if all(f.is_dir() for f in folders):
        return [from_pretrained(cls, f) for cls, f in zip((CLIPTextModel, CLIPTextModelWithProjection), folders)]
    return list(text_to_image.random_text_encoders(config, config.glyphs.seed))


def part_data(run: Run, config) -> dict:
    start = time.time()
    g = config.glyphs
    dataset.write_world_dataset(run / "data", seed=g.seed, count=g.data_count, size=config.train.resolution,
                                reference_size=config.model.image_encoder.image_size)
    return {"examples": g.data_count, "seconds": time.time() - start}


def part_vae(run: Run, config) -> dict:
    from realisid_jax.glyphs import autoencoder

    g = config.glyphs
    vae, metrics = autoencoder.train_vae(config, seed=g.seed, num_steps=g.vae_steps, batch_size=g.vae_batch_size,
                                         crop=g.vae_crop, learning_rate=g.vae_learning_rate,
                                         workdir=run / "work" / "vae")
    # Held-out scenes: another seed than training's pool.
    psnr = autoencoder.evaluate_vae(vae, autoencoder.render_scenes(g.seed + 1000, g.eval_scenes))
    export_module(vae, run / "base" / "vae", "AutoencoderKL")
    return {"psnr_db": psnr, "held_out_scenes": g.eval_scenes, "steps": g.vae_steps,
            "seconds": metrics["seconds"], "scaling_factor": metrics["scaling_factor"]}


def part_image_encoder(run: Run, config) -> dict:
    from realisid_jax.glyphs import identity_encoder

    g = config.glyphs
    encoder, metrics = identity_encoder.train_identity_encoder(
        config, seed=g.seed, num_steps=g.encoder_steps, batch_size=g.encoder_batch_size,
        options=identity_encoder.TrainOptions(learning_rate=g.encoder_learning_rate),
        workdir=run / "work" / "image_encoder")
    probe = identity_encoder.linear_probe_accuracy(encoder, seed=g.seed + 1)
    pipeline_writer.save_image_encoder(run / "base" / "image_encoder", encoder)
    return {**probe, "steps": g.encoder_steps, "seconds": metrics["seconds"]}


def part_unet(run: Run, config) -> dict:
    from realisid_jax.glyphs import text_to_image
    from realisid_jax.models.clip_vision import CLIPVisionModelWithProjection
    from realisid_jax.models.vae import AutoencoderKL

    g = config.glyphs
    vae = from_pretrained(AutoencoderKL, run / "base", subfolder="vae")
    text_encoders, tokenizers = _text_encoders(run, config), standard_tokenizers(2)
    unet, metrics = text_to_image.train_unet(config, vae, text_encoders, tokenizers, seed=g.seed,
                                             num_steps=g.unet_steps, batch_size=g.unet_batch_size,
                                             learning_rate=g.unet_learning_rate, pool_size=g.unet_pool,
                                             data=run / "data", workdir=run / "work" / "unet")
    image_encoder = from_pretrained(CLIPVisionModelWithProjection, run / "base" / "image_encoder")
    pipeline_writer.save_pipeline_folder(run / "base", unet=unet, vae=vae, text_encoder=text_encoders[0],
                                         text_encoder_2=text_encoders[1], tokenizer=tokenizers[0],
                                         tokenizer_2=tokenizers[1], image_encoder=image_encoder,
                                         scheduler_config=text_to_image.SCHEDULER_CONFIG)
    losses = metrics["losses"]
    return {"steps": g.unet_steps, "seconds": metrics["seconds"],
            "final_loss": float(np.mean(losses[-50:])) if len(losses) else None}


def part_scorer(run: Run, config) -> dict:
    from realisid_jax.glyphs import scorer

    g = config.glyphs
    model, metrics = scorer.train_scorer(seed=g.seed, num_steps=g.scorer_steps, workdir=run / "work" / "scorer")
    model.save(run / "scorer")
    return {**metrics, "steps": g.scorer_steps}


def request_specs(seed: int, count: int, *, size: int = 256) -> list[world.SceneSpec]:
    """The base model's check requests: 1 and 2 persons (alternating), every palette colour in turn."""
    specs = []
    for i in range(count):
        spec = world.sample_scene_spec(np.random.default_rng([seed, i]), size=size, num_persons=1 + i % 2,
                                       max_distractors=0)
        background = list(world.BACKGROUNDS)[i % len(world.BACKGROUNDS)]
        specs.append(world.SceneSpec(size=size, background=background, persons=spec.persons))
    return specs


def part_base_scenes(run: Run, config) -> dict:
    """The base model's scenes for requests it cannot follow (no branches): identity in the requested boxes must
    score at about chance, the captioned background colour at >= 95 %."""
    from PIL import Image

    from realisid_jax.glyphs import scorer, text_to_image
    from realisid_jax.loading.pipeline_folder import load_pipeline_folder

    g = config.glyphs
    base = load_pipeline_folder(run / "base", dtype=jnp.float32)
    specs = request_specs(g.seed + 2000, g.base_scenes, size=config.sampling.height)
    images = text_to_image.generate(config, base.unet, base.vae, list(base.text_encoders), list(base.tokenizers),
                                    [s.caption for s in specs], seed=g.seed,
                                    num_inference_steps=config.sampling.num_inference_steps,
                                    guidance_scale=config.sampling.text_guidance_scale)
    out = run / "base_scenes"
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (spec, image) in enumerate(zip(specs, images)):
        Image.fromarray(image).save(out / f"{i:04d}.png")
        records.append(manifest.record_of(spec, image=f"{i:04d}.png", variant="base"))
    manifest.write_manifest(out / "manifest.jsonl", records)
    Image.fromarray(report.manifest_sheet(out / "manifest.jsonl")).save(out / "sheet.png")
    summary = manifest.summarize(manifest.score_manifest(scorer.Scorer.load(run / "scorer"), out / "manifest.jsonl"))
    return {"images": len(specs), "chance": 1 / len(world.IDENTITIES), **summary}


PART_FUNCTIONS: dict[str, Callable[[Run, ml_collections.ConfigDict], dict]] = {
    "data": part_data, "vae": part_vae, "image_encoder": part_image_encoder, "unet": part_unet,
    "scorer": part_scorer, "base_scenes": part_base_scenes}


def prepare(out: str | os.PathLike, config: ml_collections.ConfigDict, *, parts=PARTS,
            log: Callable[[str], None] = print) -> dict:
    """Runs the stage's ``parts`` in order into ``out``, skipping the finished ones; returns part -> figures and
    writes ``report.json`` / ``report.md``.

    Raises:
      ValueError: an unknown part name, or a UNet pool larger than the training set (before anything runs).
    """
    unknown = [p for p in parts if p not in PART_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; the stage's parts are {', '.join(PARTS)}")
    if config.glyphs.unet_pool > config.glyphs.data_count:
        raise ValueError(f"config.glyphs.unet_pool ({config.glyphs.unet_pool}) exceeds the training set's "
                         f"data_count ({config.glyphs.data_count})")
    run = Run(out)
    run.root.mkdir(parents=True, exist_ok=True)
    figures = {}
    for part in parts:
        done = run.figures(part)
        if done is not None:
            log(f"{part}: finished before, skipped ({run / 'parts' / (part + '.json')})")
            figures[part] = done
            continue
        log(f"{part}: running")
        start = time.time()
        figures[part] = run.finish(part, {**PART_FUNCTIONS[part](run, config), "wall_seconds": time.time() - start})
    # The report covers every finished part, also those of earlier runs with other ``parts``.
    report.write(run.root, {p: f for p in PARTS if (f := figures.get(p) or run.figures(p)) is not None})
    return figures
