"""The stage's report: ``report.json`` (every part's figures) and ``report.md`` (the figures against the budgets),
and the picture grids (the world; the base model's scenes)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from realisid_jax.glyphs import world

# (part, figure, label, target, higher is better): the budgets.
BUDGETS = (
    ("vae", "psnr_db", "VAE PSNR on held-out scenes (dB)", 28.0, True),
    ("image_encoder", "heldout_accuracy", "image encoder: linear probe, held-out styles", 0.95, True),
    ("scorer", "min_heldout_accuracy", "scorer: held-out-style renders, worst box size", 0.98, True),
    ("base_scenes", "background_accuracy", "base model: background colour as captioned", 0.95, True),
    ("base_scenes", "identity_accuracy", "base model: identity in the requested boxes (about chance)", None, None),
)


def _row(figures: Mapping, part: str, key: str, label: str, target, higher) -> str:
    value = figures.get(part, {}).get(key)
    shown = "not run" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
    if target is None:
        chance = figures.get(part, {}).get("chance")
        return f"| {label} | {shown} | chance {chance:.3f} |" if chance else f"| {label} | {shown} | |"
    met = value is not None and (value >= target if higher else value <= target)
    return f"| {label} | {shown} | {'≥' if higher else '≤'} {target} {'(met)' if met else '(missed)'} |"


def write(root: Path, figures: Mapping[str, Mapping]) -> None:
    """Writes ``root/report.json`` and ``root/report.md``."""
    (root / "report.json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = ["# Glyph world: the stage's figures", "", "| figure | value | target |", "|---|---|---|"]
    lines += [_row(figures, *budget) for budget in BUDGETS]
    walls = {part: f.get("wall_seconds") for part, f in figures.items()}
    total = sum(v for v in walls.values() if v)
    lines += ["", "| part | wall time (s) |", "|---|---|"]
    lines += [f"| {part} | {v:.0f} |" for part, v in walls.items() if v] + [f"| total | {total:.0f} |"]
    per_size = figures.get("scorer", {}).get("heldout_accuracy_by_size")
    if per_size:
        lines += ["", "Scorer accuracy on held-out-style renders by box edge (fraction of the image edge):", "",
                  "| " + " | ".join(per_size) + " |", "|" + "---|" * len(per_size),
                  "| " + " | ".join(f"{v:.3f}" for v in per_size.values()) + " |"]
    (root / "report.md").write_text("\n".join(lines) + "\n")


def grid(images: Sequence[np.ndarray], columns: int, *, pad: int = 4) -> np.ndarray:
    """Images of one size, row-major, into one uint8 (H', W', 3) grid on white."""
    h, w = images[0].shape[:2]
    rows = -(-len(images) // columns)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = image
    return out


def draw_boxes(image: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """A copy of ``image`` with each box outlined (white over black, visible on any background)."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for box in boxes:
        draw.rectangle([b - 0.5 for b in box], outline=(0, 0, 0), width=3)
        draw.rectangle([b - 0.5 for b in box], outline=(255, 255, 255), width=1)
    return np.asarray(canvas)


def world_sheet(seed: int = 0, count: int = 6) -> np.ndarray:
    """Rows of the world: a scene with its person boxes drawn, then per person its keypoint image (c_pe, the
    landmark image) and a reference in a held-out style, each at the scene's height."""
    tiles = []
    for i in range(count):
        scene = world.scene(seed, i, num_persons=1 + i % 2)
        tiles.append(draw_boxes(scene.image, [p.box for p in scene.spec.persons]))
        for k in range(2):
            if k < len(scene.spec.persons):
                person = scene.spec.persons[k]
                tiles.append(world.draw_keypoints(world.glyph_keypoints(person.rotation_deg), scene.spec.size))
                ref = world.reference(seed, i, person.identity, size=64, styles=world.HELDOUT_STYLES)
                tiles.append(np.asarray(Image.fromarray(ref.image).resize((scene.spec.size,) * 2, Image.NEAREST)))
            else:
                tiles += [np.full_like(scene.image, 255)] * 2
    return grid(tiles, 5)


def manifest_sheet(manifest_path: Path, count: int = 20, columns: int = 5) -> np.ndarray:
    """The first ``count`` images of a manifest with their requested boxes drawn, as one grid."""
    from realisid_jax.glyphs.manifest import read_manifest, resolve

    records = read_manifest(manifest_path)[:count]
    images = [np.asarray(Image.open(resolve(manifest_path, r.image)).convert("RGB")) for r in records]
    return grid([draw_boxes(image, [p.box for p in r.persons]) for image, r in zip(images, records)], columns)
