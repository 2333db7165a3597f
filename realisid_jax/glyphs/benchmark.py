"""The glyph world's benchmark of RealisID variants (``realisid glyphs evaluate``): a fixed request set sampled
through the real pipeline for each variant, scored by the independent scorer, reported per box size.

The request set (``request_set``) is seeded and independent of the training data: per person count (1, 2) and
box edge of ``scorer.BOX_FRACTIONS`` (1/2 .. 1/10 of the image edge) a *cell* of ``per_cell`` requests, each
with distinct identities, references rendered in ``world.HELDOUT_STYLES`` (styles never trained on), rotations
uniform in ``world.ROTATION_RANGE`` and a background that steps through the palette (named in the world's
caption); request ``j`` of a cell is the same whatever ``per_cell``, and every variant uses its seed.

Variants (``VARIANTS``) are config overrides of one pipeline (``variant_overrides``):

===========  ==================================================================================================
base         no branches (fresh zero-output copies, both scales 0) and no ID guidance (λ_i = 0)
local        the local branch only (``realisid.global_scale`` 0)
global       the global branch only (``realisid.local_scale`` 0)
realisid     both branches, paper Eq. 8, delayed ID (the config's settings)
no_delay     as realisid, the ID from the first step (``sampling.id_start_fraction`` 0)
plain_cfg    classifier-free guidance with text and ID as the one condition, ε_none + λ_t (ε_t&i − ε_none):
             Eq. 8 with λ_i = λ_t is exactly this (the ε_t terms cancel), so ``id_guidance_scale`` := λ_t
===========  ==================================================================================================

Layout of ``REPORT``::

    settings.json             what the images depend on (seed, size, steps, guidance, weights); a re-run with
                              other settings is refused
    references/NAME-K.png     request NAME's K-th reference
    variants/VARIANT/         images/NAME.png (written atomically), manifest.jsonl (``glyphs.manifest``, written
                              once every image is there: a variant with a complete manifest is skipped),
                              variant.json (overrides, sampling time)
    report.json, report.md    figures per variant and box size
    identity_vs_box.png       identity accuracy against box size, one line per variant, chance dashed
    grid.png                  the first request of each cell (as the world renders it) and every variant's output,
                              boxes drawn
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from realisid_jax.face.draw import square_keypoints
from realisid_jax.glyphs import manifest, report, world
from realisid_jax.glyphs.scorer import BOX_FRACTIONS, Scorer
from realisid_jax.realisid.conditions import Person
from realisid_jax.realisid.pipeline import RealisIDPipeline

DEFAULT_SEED = 20240  # the request set's; far from the stage's seeds (0, 1000, 2000)
VARIANTS = ("base", "local", "global", "realisid", "no_delay", "plain_cfg")
PERSON_COUNTS = (1, 2)
BUCKETS = tuple(f"1/{round(1 / f)}" for f in BOX_FRACTIONS)
REFERENCE_SIZE = 128  # px of a reference picture (the analysis crops its subject to the encoder's size)
CHANCE = 1 / len(world.IDENTITIES)


class SettingsMismatchError(ValueError):
    """``REPORT`` holds images made with other settings (seed, size, steps, guidance, weights)."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One benchmark request.

    Attributes:
      name: file stem, ``"{persons}p-1_{N}-{j:03d}"`` (e.g. ``2p-1_8-000``): stable across ``per_cell``.
      spec: what is asked: ``background`` (named in ``spec.caption``, the prompt), per person ``identity``,
        ``box`` (x0, y0, x1, y1 px, square), ``rotation_deg``; each person's ``style`` is its reference's and
        ``ink`` one that contrasts with the background (used only to draw the request, ``render_request``).
      references: per person a held-out-style picture of the identity (``world.Reference``).
      seed: the pipeline's noise seed (the same for every variant).
    """

    name: str
    spec: world.SceneSpec
    references: tuple[world.Reference, ...]
    seed: int

    @property
    def bucket(self) -> str:
        """The box size, "1/2" .. "1/10" (every person of a request has the same)."""
        return manifest.box_bucket(self.spec.persons[0].box, self.spec.size, self.spec.size)


def _boxes(rng: np.random.Generator, count: int, edge: int, size: int) -> list[tuple[float, ...]]:
    """``count`` (1 or 2) square boxes of ``edge`` px inside the image, not overlapping: two persons take one half
    each (left/right or top/bottom, at random), so even 1/2-edge boxes always fit."""
    if count == 1:
        return [world.random_box(rng, size, edge)]
    vertical = bool(rng.integers(2))
    boxes = []
    for k in range(count):
        along = int(rng.integers(k * size // 2, (k + 1) * size // 2 - edge + 1))
        across = int(rng.integers(0, size - edge + 1))
        x0, y0 = (across, along) if vertical else (along, across)
        boxes.append((float(x0), float(y0), float(x0 + edge), float(y0 + edge)))
    return boxes


def make_request(seed: int, persons: int, fraction_index: int, j: int, *, size: int = 256,
                 reference_size: int = REFERENCE_SIZE) -> Request:
    """Request ``j`` of the cell (``persons``, ``BOX_FRACTIONS[fraction_index]``); deterministic."""
    rng = np.random.default_rng([seed, persons, fraction_index, j])
    fraction = BOX_FRACTIONS[fraction_index]
    palette = list(world.BACKGROUNDS)
    # Each cell starts at its own palette colour, so every colour is asked for even at one request per cell.
    background = palette[(j + fraction_index + len(BOX_FRACTIONS) * (persons - 1)) % len(palette)]
    identities = [world.IDENTITIES[i] for i in rng.choice(len(world.IDENTITIES), persons, replace=False)]
    boxes = _boxes(rng, persons, round(fraction * size), size)
    specs, references = [], []
    for k, (identity, box) in enumerate(zip(identities, boxes)):
        ref = world.render_reference(np.random.default_rng([seed, persons, fraction_index, j, k]), identity,
                                     size=reference_size, styles=world.HELDOUT_STYLES)
        rotation = round(float(rng.uniform(*world.ROTATION_RANGE)), 1)
        specs.append(world.PersonSpec(identity, ref.style, str(rng.choice(world.inks_for(background))), 0, box,
                                      rotation))
        references.append(ref)
    name = f"{persons}p-1_{round(1 / fraction)}-{j:03d}"
    return Request(name, world.SceneSpec(size, background, tuple(specs)), tuple(references),
                   int(rng.integers(2 ** 31)))


def request_set(seed: int = DEFAULT_SEED, per_cell: int = 4, *, size: int = 256,
                reference_size: int = REFERENCE_SIZE) -> list[Request]:
    """The benchmark's requests: ``per_cell`` per (person count, box size) cell, 12 cells, ordered round by
    round (request 0 of every cell, then request 1, ...) so an interrupted run has covered every cell.

    Raises:
      ValueError: ``per_cell`` < 1.
    """
    if per_cell < 1:
        raise ValueError(f"per_cell must be >= 1, got {per_cell}")
    return [make_request(seed, persons, f, j, size=size, reference_size=reference_size)
            for j in range(per_cell) for persons in PERSON_COUNTS for f in range(len(BOX_FRACTIONS))]


def render_request(request: Request) -> np.ndarray:
    """(S, S, 3) uint8: the request as the world would render it (reference styles, requested boxes and
    rotations), boxes drawn: the grid's first column."""
    return report.draw_boxes(world.render_scene(request.spec).image, [p.box for p in request.spec.persons])


# ---------------------------------------------------------------------------------------------------- variants


def variant_overrides(name: str, config: ml_collections.ConfigDict) -> dict[str, float]:
    """The config fields (``section.field`` -> value) that make variant ``name`` (module docstring).

    Raises:
      ValueError: an unknown variant.
    """
    table = {
        "base": {"realisid.local_scale": 0.0, "realisid.global_scale": 0.0, "sampling.id_guidance_scale": 0.0},
        "local": {"realisid.global_scale": 0.0},
        "global": {"realisid.local_scale": 0.0},
        "realisid": {},
        "no_delay": {"sampling.id_start_fraction": 0.0},
        "plain_cfg": {"sampling.id_guidance_scale": float(config.sampling.text_guidance_scale)},
    }
    if name not in table:
        raise ValueError(f"unknown variant {name!r}; the variants are {', '.join(VARIANTS)}")
    return table[name]


def variant_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """A copy of ``config`` with variant ``name``'s overrides."""
    out = ml_collections.ConfigDict(config.to_dict())
    for key, value in variant_overrides(name, config).items():
        section, field = key.split(".")
        out[section][field] = value
    return out


def _settings(config, run: Path, branches: Path | None, seed: int, steps: int, images_per_request: int) -> dict:
    s = config.sampling
    return {"seed": seed, "size": int(s.height), "steps": steps, "images_per_request": images_per_request,
            "scheduler": s.scheduler, "text_guidance_scale": float(s.text_guidance_scale),
            "id_guidance_scale": float(s.id_guidance_scale), "id_start_fraction": float(s.id_start_fraction),
            "local_scale": float(config.realisid.local_scale), "global_scale": float(config.realisid.global_scale),
            "reference_size": REFERENCE_SIZE, "run": str(run.resolve()),
            "branches": None if branches is None else str(branches.resolve())}


def _check_settings(out: Path, settings: dict) -> None:
    path = out / "settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            what = "; ".join(f"{k}: {a!r} before, {b!r} now" for k, (a, b) in changed.items())
            raise SettingsMismatchError(f"{out} holds a benchmark made with other settings ({what}); "
                                        f"use another --out")
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _save_png(image: np.ndarray, path: Path) -> None:
    """Writes a PNG atomically: a file is either whole or absent, so a resumed run never reads half an image."""
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    tmp.replace(path)


def write_references(requests: Sequence[Request], out: Path) -> dict[str, list[Path]]:
    """Saves every reference as ``out/references/NAME-K.png`` (skipping existing files); returns name -> paths."""
    folder = out / "references"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for request in requests:
        paths[request.name] = [folder / f"{request.name}-{k}.png" for k in range(len(request.references))]
        for ref, path in zip(request.references, paths[request.name]):
            if not path.is_file():
                _save_png(ref.image, path)
    return paths


def _image_names(request: Request, images_per_request: int) -> list[str]:
    if images_per_request == 1:
        return [f"images/{request.name}.png"]
    return [f"images/{request.name}-{m}.png" for m in range(images_per_request)]


def _records(requests, references, folder: Path, variant: str, images_per_request: int) -> list[manifest.Record]:
    return [manifest.record_of(r.spec, image=name, variant=variant,
                               references=[os.path.relpath(p, folder) for p in references[r.name]])
            for r in requests for name in _image_names(r, images_per_request)]


def manifest_complete(folder: Path, records: Sequence[manifest.Record]) -> bool:
    """True when ``folder/manifest.jsonl`` lists exactly ``records`` and every image is there."""
    path = folder / manifest.MANIFEST_NAME
    if not path.is_file():
        return False
    try:
        written = manifest.read_manifest(path)
    except manifest.ManifestError:
        return False
    return written == list(records) and all((folder / r.image).is_file() for r in written)


def guidance(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The pipeline call's guidance arguments from ``config.sampling`` (λ_t, λ_i, delayed-ID fraction)."""
    s = config.sampling
    return {"text_guidance_scale": float(s.text_guidance_scale), "id_guidance_scale": float(s.id_guidance_scale),
            "id_start_fraction": float(s.id_start_fraction)}


def sample_variant(make_pipeline: Callable[[], object], requests: Sequence[Request],
                   references: dict[str, list[Path]], folder: Path, *, variant: str, steps: int,
                   guidance_args: dict[str, float], images_per_request: int = 1, progress: bool = True) -> dict:
    """Samples variant ``variant``'s missing images into ``folder/images`` (one pipeline call per request, its
    ``images_per_request`` images in one batch), then writes ``folder/manifest.jsonl``.

    ``make_pipeline`` returns the ``RealisIDPipeline`` (called only when an image is missing);
    ``guidance_args`` (``guidance``) are passed to every call. Returns ``{"sampled_images", "seconds"}`` of
    this call (model loading and compilation included).
    """
    start = time.time()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pipeline, sampled = None, 0
    for request in tqdm(requests, desc=variant, disable=not progress):
        names = _image_names(request, images_per_request)
        if all((folder / n).is_file() for n in names):
            continue
        pipeline = pipeline or make_pipeline()
        persons = [Person(str(path), p.box, landmarks=square_keypoints(p.rotation_deg))
                   for p, path in zip(request.spec.persons, references[request.name])]
        out = pipeline(request.spec.caption, persons, height=request.spec.size, width=request.spec.size,
                       num_inference_steps=steps, num_images=images_per_request, seed=request.seed, progress=False,
                       **guidance_args)
        for name, image in zip(names, out.images):
            _save_png(image, folder / name)
        sampled += len(names)
    records = _records(requests, references, folder, variant, images_per_request)
    tmp = manifest.write_manifest(folder / (manifest.MANIFEST_NAME + ".tmp"), records)
    tmp.replace(folder / manifest.MANIFEST_NAME)
    return {"sampled_images": sampled, "seconds": time.time() - start}


# ---------------------------------------------------------------------------------------------------- figures


def _cell(rows: list[dict]) -> dict:
    """The figures of a set of ``score_manifest`` rows (``manifest.summarize``'s, without its breakdowns)."""
    figures = manifest.summarize(rows)
    return {k: v for k, v in figures.items() if k not in ("buckets", "variants")}


def figures(rows: list[dict]) -> dict:
    """Per variant of ``score_manifest``'s rows: ``{"all": figures, "buckets": {"1/2": figures, ...}}``, figures
    being ``images``, ``identity_accuracy``, ``median_iou``, ``median_rotation_error_deg``,
    ``background_accuracy``, ``two_person_images``, ``two_person_both_correct`` (both identities right, hence
    unswapped), ``two_person_swapped`` (``None`` where nothing to measure)."""
    out = {}
    for variant in dict.fromkeys(row["variant"] for row in rows):
        mine = [row for row in rows if row["variant"] == variant]
        buckets = {b: [row for row in mine if row["persons"][0]["bucket"] == b] for b in BUCKETS}
        out[variant] = {"all": _cell(mine), "buckets": {b: _cell(group) for b, group in buckets.items() if group}}
    return out


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# (label, figure of the realisid variant, bucket or "all", target, higher is better): the targets.
TARGETS = tuple(
    [(f"identity accuracy at {b}", "identity_accuracy", b, 0.9, True) for b in ("1/2", "1/3", "1/4")]
    + [("identity accuracy at 1/8", "identity_accuracy", "1/8", 0.7, True),
       ("location IoU median", "median_iou", "all", 0.7, True),
       ("rotation error median (°)", "median_rotation_error_deg", "all", 10.0, False),
       ("background accuracy", "background_accuracy", "all", 0.95, True),
       ("two persons both right, unswapped, at 1/4", "two_person_both_correct", "1/4", 0.8, True)])


def _target_lines(variant: dict | None) -> list[str]:
    if variant is None:
        return []
    lines = ["## Targets (realisid variant)", "", "| figure | value | target |", "|---|---|---|"]
    for label, key, where, target, higher in TARGETS:
        cell = variant["all"] if where == "all" else variant["buckets"].get(where, {})
        value = cell.get(key)
        met = value is not None and (value >= target if higher else value <= target)
        state = "not measured" if value is None else "met" if met else "missed"
        lines.append(f"| {label} | {_fmt(value)} | {'≥' if higher else '≤'} {target} ({state}) |")
    return lines + [""]


def write_report(out: Path, result: dict) -> None:
    """``out/report.json`` (``result``) and ``out/report.md`` (the tables)."""
    _atomic_write_text(out / "report.json", json.dumps(result, indent=2) + "\n")
    variants, s = result["variants"], result["settings"]
    lines = ["# Glyph world: RealisID variants", "",
             f"{result['requests']} requests ({result['per_cell']} per cell of person count x box size; references "
             f"in held-out styles), {s['images_per_request']} image(s) each, {s['size']} px, {s['steps']} "
             f"{s['scheduler']} steps, λ_t {s['text_guidance_scale']}, request seed {s['seed']}. Identity chance "
             f"{CHANCE:.3f}. Scored by the glyph scorer (`realisid_jax/glyphs/scorer.py`).", "",
             "## Identity accuracy by box edge (fraction of the image edge)", "",
             "| variant | " + " | ".join(BUCKETS) + " | all |", "|---|" + "---|" * (len(BUCKETS) + 1)]
    for name, v in variants.items():
        cells = [_fmt(v["buckets"].get(b, {}).get("identity_accuracy")) for b in BUCKETS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(v['all']['identity_accuracy'])} |")
    lines += ["", "## Location, pose, text, two persons (all box sizes)", "",
              "| variant | location IoU median | rotation error median (°) | background accuracy | two persons both "
              "right | both right at 1/4 | swapped | sampling (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, v in variants.items():
        a = v["all"]
        at4 = v["buckets"].get("1/4", {}).get("two_person_both_correct")
        lines.append(f"| {name} | {_fmt(a['median_iou'])} | {_fmt(a['median_rotation_error_deg'], 1)} | "
                     f"{_fmt(a['background_accuracy'])} | {_fmt(a['two_person_both_correct'])} | {_fmt(at4)} | "
                     f"{_fmt(a['two_person_swapped'])} | {_fmt(v.get('seconds'), 0)} |")
    lines += [""] + _target_lines(variants.get("realisid"))
    lines += ["## Per variant and box size", ""]
    for name, v in variants.items():
        lines += [f"### {name}", "", f"Overrides: `{json.dumps(v.get('overrides', {}))}`", "",
                  "| box | persons | identity | IoU median | rotation error median (°) | background | two persons "
                  "both right |", "|---|---|---|---|---|---|---|"]
        for b, c in v["buckets"].items():
            persons = c["images"] + c["two_person_images"]  # one per image, two per two-person image
            lines.append(f"| {b} | {persons} | {_fmt(c['identity_accuracy'])} | {_fmt(c['median_iou'])} | "
                         f"{_fmt(c['median_rotation_error_deg'], 1)} | {_fmt(c['background_accuracy'])} | "
                         f"{_fmt(c['two_person_both_correct'])} |")
        lines.append("")
    lines += ["![identity accuracy against box size](identity_vs_box.png)", "",
              "![requests and outputs](grid.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


def plot_identity_vs_box(variants: dict, path: Path) -> Path:
    """The scale-robustness plot: identity accuracy against box edge (log axis, large to small), one line per
    variant, chance dashed. Returns ``path``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.subplots()
    for name, v in variants.items():
        points = [(f, v["buckets"][b]["identity_accuracy"]) for f, b in zip(BOX_FRACTIONS, BUCKETS)
                  if b in v["buckets"]]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name,
                linewidth=2.5 if name == "realisid" else 1.5)
    ax.axhline(CHANCE, color="gray", linestyle="--", label=f"chance (1/{len(world.IDENTITIES)})")
    ax.set_xscale("log")
    ax.set_xticks(BOX_FRACTIONS, BUCKETS)
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("box edge / image edge")
    ax.set_ylabel("identity accuracy")
    ax.set_title("Glyph world: identity against box size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def request_grid(requests: Sequence[Request], out: Path, variants: Sequence[str], *, tile: int = 128) -> np.ndarray:
    """(H, W, 3) uint8: one row per request (the first of each cell), its rendering then each variant's first
    image, boxes drawn, ``tile`` px each, under a header naming the columns."""
    rows = [r for r in requests if r.name.endswith("-000")]
    tiles = []
    for request in rows:
        boxes = [p.box for p in request.spec.persons]
        first = _image_names(request, 1)[0]
        images = [render_request(request)]
        for variant in variants:
            folder = out / "variants" / variant
            path = next(iter(sorted((folder / "images").glob(Path(first).stem + "*.png"))), None)
            image = np.asarray(Image.open(path).convert("RGB")) if path else np.full_like(images[0], 255)
            images.append(report.draw_boxes(image, boxes))
        small = [Image.fromarray(i).resize((tile, tile), Image.Resampling.LANCZOS) for i in images]
        ImageDraw.Draw(small[0]).text((3, 2), f"{len(boxes)}p {request.bucket}", fill="white", stroke_width=2,
                                      stroke_fill="black")
        tiles += [np.asarray(i) for i in small]
    body = report.grid(tiles, 1 + len(variants))
    header = Image.new("RGB", (body.shape[1], 18), "white")
    draw = ImageDraw.Draw(header)
    for c, name in enumerate(("request", *variants)):
        draw.text((4 + c * (tile + 4) + 2, 3), name, fill="black")
    return np.concatenate([np.asarray(header), body])


# ---------------------------------------------------------------------------------------------------- run


def evaluate(run: str | os.PathLike, branches: str | os.PathLike | None, out: str | os.PathLike,
             config: ml_collections.ConfigDict, *, variants: Sequence[str] = VARIANTS, per_cell: int = 4,
             seed: int = DEFAULT_SEED, num_inference_steps: int | None = None, images_per_request: int = 1,
             progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Samples, scores and reports every variant (module docstring); resumable.

    Args:
      run: a ``realisid glyphs prepare`` folder: ``base/`` (diffusers pipeline folder with ``image_encoder/``)
        and ``scorer/``.
      branches: trained branches (``realisid export``); ``None`` only when ``variants`` is just ``("base",)``.
      out: the report folder (created; a re-run skips the finished variants and the images already written).
      config: the glyph config (``configs/sdxl.py:glyphs``); ``sampling`` gives size, scheduler and guidance.
      variants: names of ``VARIANTS``, in the report's order.
      per_cell: requests per (person count, box size) cell.
      seed: the request set's seed (``request_set``).
      num_inference_steps: default ``config.sampling.num_inference_steps``.
      images_per_request: images per request, one pipeline batch (seeds of one key).

    Returns:
      The ``report.json`` contents: ``settings``, ``requests``, ``per_cell``, ``chance`` and per variant
      ``figures``' entry plus ``overrides``, ``seconds`` (sampling wall time of the run that finished it).

    Raises:
      ValueError: an unknown variant, ``branches`` missing for a variant that needs it.
      SettingsMismatchError: ``out`` was made with other settings.
      FileNotFoundError: no ``run/scorer`` or ``run/base``.
    """
    run, out = Path(run), Path(out)
    for name in variants:
        variant_overrides(name, config)
    if branches is None and any(v != "base" for v in variants):
        raise ValueError("branches are needed for every variant but base")
    for needed in (run / "scorer", run / "base" / "image_encoder"):
        if not needed.is_dir():
            raise FileNotFoundError(f"{needed} not found: make RUN with `realisid glyphs prepare --out {run}`")
    branches = None if branches is None else Path(branches)
    steps = num_inference_steps or int(config.sampling.num_inference_steps)
    _check_settings(out, _settings(config, run, branches, seed, steps, images_per_request))
    requests = request_set(seed, per_cell, size=int(config.sampling.height))
    references = write_references(requests, out)
    scorer = Scorer.load(run / "scorer")
    # Variants that differ only in guidance share one loaded pipeline (and its compiled programs): the guidance
    # is passed per call. Base loads no branches.
    loaded: dict[tuple, RealisIDPipeline] = {}

    def load(vconfig, with_branches: bool) -> RealisIDPipeline:
        key = (with_branches, float(vconfig.realisid.local_scale), float(vconfig.realisid.global_scale))
        if key not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[key] = RealisIDPipeline.from_pretrained(
                vconfig, str(run / "base"), branches=str(branches) if with_branches else None,
                image_encoder=str(run / "base" / "image_encoder"))
        return loaded[key]

    rows, results = [], {}
    for name in variants:
        folder = out / "variants" / name
        overrides = variant_overrides(name, config)
        records = _records(requests, references, folder, name, images_per_request)
        info_path = folder / "variant.json"
        if manifest_complete(folder, records) and info_path.is_file():
            log(f"{name}: finished before, skipped ({folder / manifest.MANIFEST_NAME})")
            info = json.loads(info_path.read_text())
        else:
            log(f"{name}: sampling {len(records)} images ({overrides or 'the config as it is'})")
            vconfig = variant_config(config, name)
            timing = sample_variant(functools.partial(load, vconfig, name != "base"), requests, references, folder,
                                    variant=name, steps=steps, guidance_args=guidance(vconfig),
                                    images_per_request=images_per_request, progress=progress)
            info = {"overrides": overrides, **timing}
            _atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
        rows += manifest.score_manifest(scorer, folder / manifest.MANIFEST_NAME)
        results[name] = info
    table = figures(rows)
    result = {"settings": json.loads((out / "settings.json").read_text()), "requests": len(requests),
              "per_cell": per_cell, "chance": CHANCE,
              "variants": {name: {**table[name], **results[name]} for name in variants}}
    write_report(out, result)
    plot_identity_vs_box(result["variants"], out / "identity_vs_box.png")
    Image.fromarray(request_grid(requests, out, variants)).save(out / "grid.png")
    return result
