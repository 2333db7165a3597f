"""``realisid benchmark-prompts --out DIR``: generate the evaluation grid and the manifest ``evaluate`` reads.

Grid (paper's protocol: identities x prompts x images, at face sizes 1/4 … 1/7 of the image edge):
every identity photo x every prompt x every ``--face-sizes`` denominator x every ``--seeds`` seed, each cell
making ``--num-images`` images. The cells run as ``realisid sample-batch`` requests (one per cell): their images
share device batches of ``--batch-size``, split over the mesh axes that the config's rules give the batch
(``activation_batch``: ``data`` x ``fsdp`` of ``--config.mesh.shape``), so it must be a multiple of their size;
a re-run into the same folder makes only the images not there yet. ``--persons K`` > 1 puts K identities
(consecutive ones, cyclically) side by side in each image, the multi-person setting. Face boxes are squares of
side ``round(edge / d)`` (edge = the image's longer side), centred at 2/5 of the height, spread evenly across the
width. Bad input (batch size, sizes, boxes, photos without a usable face) is reported before any model is built
or file written.

Writes ``DIR/images/<id>.png`` (with their generation records), ``DIR/refs/<identity>.png`` (the identity
photos, so that the folder is self-contained) and ``DIR/manifest.json`` (``realisid_jax.eval.manifest``); then
run ``realisid evaluate --generated DIR --out REPORT``.

The paper's 40 CelebA-HQ identities and 35 prompts are not distributed with it: pass your identity photos
(``--identities``) and prompts (``--prompts FILE``, one per line). The built-in prompts below are this
project's, not the paper's; without ``--identities`` the astronaut photo of scikit-image is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from realisid_jax.commands.weights import add_weight_arguments, build_pipeline, enable_compilation_cache
from realisid_jax.sharding import batch_shards

DEFAULT_PROMPTS = (
    "a photo of a person, portrait, natural light",
    "a photo of a person standing on a beach at sunset",
    "a photo of a person wearing a suit in an office",
    "a photo of a person in a snowy forest, winter coat",
    "a photo of a person reading a book in a cafe",
    "a photo of a person riding a bicycle in a city street",
    "a photo of a person on a mountain summit, hiking gear",
    "a photo of a person cooking in a kitchen",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class GridCell:
    """One pipeline call: ``num_images`` images of ``prompt`` with ``identities`` at ``boxes``."""

    prompt_index: int
    prompt: str
    identities: tuple[str, ...]
    boxes: tuple[tuple[float, float, float, float], ...]
    denominator: int
    seed: int

    def image_id(self, index: int) -> str:
        return f"{'+'.join(self.identities)}-p{self.prompt_index:02d}-f{self.denominator}-s{self.seed}-{index}"


def face_boxes(denominator: int, persons: int, height: int, width: int) -> tuple[tuple[float, ...], ...]:
    """``persons`` square boxes of side ``round(max(height, width) / denominator)`` px, centres at 2/5 of
    the height and at ``width * (k + 1) / (persons + 1)``.

    Raises:
      ValueError: the boxes do not fit side by side in the image.
    """
    side = round(max(height, width) / denominator)
    if persons * side > width or side > height:
        raise ValueError(f"{persons} faces of 1/{denominator} of the edge ({side} px) do not fit in {width}x{height}")
    cy = min(max(0.4 * height, side / 2), height - side / 2)
    boxes = []
    for k in range(persons):
        cx = min(max(width * (k + 1) / (persons + 1), side / 2), width - side / 2)
        boxes.append((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    return tuple(boxes)


def plan_grid(identities: Sequence[str], prompts: Sequence[str], denominators: Sequence[int], seeds: Sequence[int],
              *, persons: int, height: int, width: int) -> list[GridCell]:
    """Every (identity group, prompt, face size, seed) cell. Identity groups: each identity alone for
    ``persons == 1``, else each identity with the next ``persons - 1`` (cyclically).

    Raises:
      ValueError: more persons per image than identities, or boxes that do not fit.
    """
    if not 1 <= persons <= len(identities):
        raise ValueError(f"--persons {persons} needs between 1 and {len(identities)} (the identities given)")
    groups = [tuple(identities[(i + k) % len(identities)] for k in range(persons)) for i in range(len(identities))]
    boxes = {d: face_boxes(d, persons, height, width) for d in denominators}
    return [GridCell(p, prompts[p], g, boxes[d], d, s)
            for g, p, d, s in itertools.product(groups, range(len(prompts)), denominators, seeds)]


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``benchmark-prompts`` subcommand; its handler is ``args.func(args) -> int``."""
    p = subparsers.add_parser("benchmark-prompts", help="generate the evaluation grid and its manifest",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/sdxl.py:tiny", help="config file (default: configs/sdxl.py:tiny)")
    p.add_argument("--out", required=True, type=Path, help="output folder (images/, refs/, manifest.json)")
    p.add_argument("--identities", nargs="+", type=Path, default=[],
                   help="identity photos, or folders of them (default: the scikit-image astronaut)")
    p.add_argument("--prompts", type=Path, default=None, help="text file, one prompt per line (default: built-in)")
    p.add_argument("--face-sizes", nargs="+", type=int, default=[4, 5, 6, 7],
                   help="face box side = image edge / D for each D (default: 4 5 6 7)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--num-images", type=int, default=2, help="images per cell (default: 2)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per device batch, a multiple of the mesh's batch shards (default: one per shard)")
    p.add_argument("--persons", type=int, default=1, help="persons per image (default: 1)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: config)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    add_weight_arguments(p)
    p.set_defaults(func=run)
    return p


def _identity_photos(paths: Sequence[Path]) -> dict[str, Path | np.ndarray]:
    """Identity name -> its photo file (names from file stems, made unique), or the astronaut array when
    ``paths`` is empty. Nothing is read or written yet."""
    if not paths:
        from skimage import data

        return {"astronaut": data.astronaut()}
    files = []
    for path in paths:
        files += sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    photos: dict[str, Path | np.ndarray] = {}
    for f in files:
        name, n = f.stem, 1
        while name in photos:
            name, n = f"{f.stem}-{n}", n + 1
        photos[name] = f
    if not photos:
        raise ValueError(f"no identity photo ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return photos


def grid_requests(config, cells: Sequence[GridCell], photos: dict[str, Path | np.ndarray], *, num_images: int,
                  height: int, width: int, steps: int | None) -> list:
    """One ``sample-batch`` request (``realisid.batch.SampleRequest``) per cell, id ``cell.image_id(0)`` without
    its ``-0`` (so image ``j`` is ``cell.image_id(j)``), the config's defaults filled in.

    Raises:
      ValueError: ``num_images`` below 1.
    """
    from realisid_jax.realisid.batch import SampleRequest
    from realisid_jax.realisid.conditions import Person

    if num_images < 1:
        raise ValueError(f"--num-images {num_images} must be at least 1")
    return [SampleRequest(id=cell.image_id(0)[:-2], prompt=cell.prompt, seed=cell.seed, height=height, width=width,
                          num_inference_steps=steps, num_images=num_images,
                          persons=tuple(Person(photos[n], box) for n, box in zip(cell.identities, cell.boxes)))
            .with_defaults(config.sampling) for cell in cells]


def _write_refs(photos: dict[str, Path | np.ndarray], refs: Path) -> dict[str, Path]:
    """Saves each identity photo as ``refs/<name>.png`` (a self-contained benchmark folder); name -> path."""
    from PIL import Image

    from realisid_jax.face.image import as_rgb8, load_image

    refs.mkdir(parents=True, exist_ok=True)
    paths = {name: refs / f"{name}.png" for name in photos}
    for name, photo in photos.items():
        Image.fromarray(as_rgb8(photo) if isinstance(photo, np.ndarray) else load_image(photo)).save(paths[name])
    return paths


def _prompts(path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompt")
    return prompts


def write_grid_manifest(cells: Sequence[GridCell], photos: dict[str, Path], out: Path, *, num_images: int) -> Path:
    """Writes ``out/manifest.json`` (``realisid_jax.eval.manifest``) for every image of ``cells``, references
    ``photos`` (under ``out``) given relative to ``out``; returns its path."""
    from realisid_jax.eval.manifest import ManifestEntry, ManifestPerson, write_manifest

    entries = [ManifestEntry(cell.image_id(j), f"images/{cell.image_id(j)}.png", cell.prompt, tuple(
        ManifestPerson(str(photos[n].relative_to(out)), box, identity=n)
        for n, box in zip(cell.identities, cell.boxes)), seed=cell.seed)
        for cell in cells for j in range(num_images)]
    return write_manifest(out, entries)


def run(args: argparse.Namespace) -> int:
    """Handler of ``realisid benchmark-prompts``: 0 (also when SIGTERM stopped it; a re-run finishes), or 2 for
    unusable arguments (reported before any model is built or file written)."""
    from realisid_jax.commands.sample_batch import Conditions, check_batch_size, generation_recorder, sample_requests
    from realisid_jax.config import load_config
    from realisid_jax.sharding import make_mesh

    config = load_config(args.config, args.config_overrides)
    height = args.height or config.sampling.height
    width = args.width or config.sampling.width
    try:
        mesh = make_mesh(tuple(config.mesh.shape))
        batch_size = check_batch_size(args.batch_size, mesh, config.mesh.rules)
        prompts = _prompts(args.prompts)
        photos = _identity_photos(args.identities)
        cells = plan_grid(list(photos), prompts, args.face_sizes, args.seeds, persons=args.persons,
                          height=height, width=width)
        requests = grid_requests(config, cells, photos, num_images=args.num_images, height=height, width=width,
                                 steps=args.steps)
        conditions = Conditions(config)
        conditions.check(requests)  # every identity photo and box before any model is built
    except (ValueError, OSError) as err:  # the face and condition errors are ValueErrors too
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"1/{d}" for d in args.face_sizes)
    print(f"{len(cells)} cells x {args.num_images} images = {len(cells) * args.num_images} images "
          f"({len(photos)} identities, {len(prompts)} prompts, face sizes {sizes}, seeds {args.seeds}; "
          f"batches of {batch_size}, batch split {batch_shards(mesh, config.mesh.rules)} ways)")
    out = args.out.resolve()
    refs = _write_refs(photos, out / "refs")
    enable_compilation_cache()
    pipeline = build_pipeline(config, args)
    summary = sample_requests(pipeline, requests, out, conditions=conditions, batch_size=batch_size,
                              record=generation_recorder(args, config))
    print(f"benchmark-prompts: {summary.line()}")
    if summary.stopped:
        print("stopped by SIGTERM after the current batch; re-run the same command to finish")
        return 0
    manifest = write_grid_manifest(cells, refs, out, num_images=args.num_images)
    print(f"wrote {manifest}; next: realisid evaluate --generated {out} --out REPORT_DIR")
    return 0
