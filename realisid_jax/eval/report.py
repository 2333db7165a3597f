"""Evaluation outputs: per-row CSV and per-image JSON, a summary JSON by face size, and a plot.

Face size (paper): the longer side of a face box over the image edge (here the image's longer edge).
Buckets are the paper's settings 1/4, 1/5, 1/6, 1/7, each covering the sizes nearest to it: a fraction f
is in bucket 1/d when ``d - 0.5 <= 1/f < d + 0.5``; larger faces are "> 1/4", smaller ones "< 1/7".
Small face (paper): longer side under 1/6 of the edge. Boxes are whole pixels, so a box meant to be
exactly 1/6 may come out a pixel short: a face is small when ``f < (1/6) * (1 - SMALL_TOLERANCE)``.

Means skip undefined values (NaN: unmatched persons, images without a face); ``match_rate`` says how many
persons were found, so that a method that loses faces cannot look better by it.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BUCKETS: tuple[int, ...] = (4, 5, 6, 7)  # face size = 1/d of the image edge
SMALL_FACE_FRACTION = 1 / 6
SMALL_TOLERANCE = 0.02
METRICS: tuple[str, ...] = ("identity_similarity", "clip_i", "clip_t", "asp", "pose_error", "expression_error",
                            "yaw_error", "pitch_error", "roll_error")
CSV_NAME, JSON_NAME, SUMMARY_NAME, PLOT_NAME = "results.csv", "results.json", "summary.json", "face_size.png"


def face_size_bucket(fraction: float) -> str:
    """``"1/4"`` … ``"1/7"``, ``"> 1/4"`` or ``"< 1/7"`` for a face-size fraction in (0, inf)."""
    if not fraction > 0:
        raise ValueError(f"face-size fraction must be positive, got {fraction}")
    inverse = 1.0 / fraction
    for d in BUCKETS:
        if d - 0.5 <= inverse < d + 0.5:
            return f"1/{d}"
    return f"> 1/{BUCKETS[0]}" if inverse < BUCKETS[0] else f"< 1/{BUCKETS[-1]}"


def is_small_face(fraction: float) -> bool:
    """The paper's small-face setting: longer side under 1/6 of the image edge (see ``SMALL_TOLERANCE``)."""
    return fraction < SMALL_FACE_FRACTION * (1 - SMALL_TOLERANCE)


PER_IMAGE_METRICS: tuple[str, ...] = ("clip_t", "asp")  # of the whole image: repeated on each person's row


def _mean(rows: Sequence[dict], metric: str) -> dict:
    values = [r[metric] for r in rows if r.get(metric) is not None and not math.isnan(r[metric])]
    return {"mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values)) if values else None, "n": len(values)}


def _stats(rows: Sequence[dict]) -> dict:
    out = {"persons": len(rows), "matched": sum(bool(r["matched"]) for r in rows)}
    out["match_rate"] = out["matched"] / len(rows) if rows else None
    out.update({m: _mean(rows, m) for m in METRICS})
    return out


def summarize(rows: Sequence[dict]) -> dict:
    """Summary of report rows (``PersonResult.as_dict()``): counts, overall means, by face-size bucket,
    small vs not small. CLIP-T and ASP overall are averaged over images (they are per image); by bucket over
    rows. ``aesthetic_predictor`` names the ASP model, or is None with ``asp_note`` saying ASP was not computed."""
    embedders = sorted({r["identity_embedder"] for r in rows})
    predictors = sorted({r.get("aesthetic_predictor") or "" for r in rows} - {""})
    images: dict[str, dict] = {}
    for r in rows:
        images.setdefault(r["image_id"], r)
    overall = _stats(rows)
    overall.update({m: _mean(list(images.values()), m) for m in PER_IMAGE_METRICS})
    buckets = [f"> 1/{BUCKETS[0]}", *(f"1/{d}" for d in BUCKETS), f"< 1/{BUCKETS[-1]}"]
    by_bucket = {b: _stats([r for r in rows if r["bucket"] == b]) for b in buckets}
    fallback = any(r["identity_is_fallback"] for r in rows)
    return {
        "identity_embedder": embedders[0] if len(embedders) == 1 else embedders,
        "identity_is_fallback": fallback,
        "identity_note": ("identity_similarity is CLIP image-embedding cosine (fallback), NOT FaceNet: not "
                          "comparable with the paper's FaceNet numbers") if fallback else "",
        "aesthetic_predictor": (predictors[0] if len(predictors) == 1 else predictors) if predictors else None,
        "asp_note": "" if predictors else "asp not computed: no aesthetic predictor given (realisid evaluate "
                                          "--aesthetic FILE, with --clip-vision ViT-L/14)",
        "counts": {
            "images": len(images),
            "images_without_face": sum(not r["face_found"] for r in images.values()),
            "persons": len(rows),
            "matched": overall["matched"],
            "unmatched_persons": sum(not r["matched"] for r in rows if r["person"] >= 0),
            "extra_faces": int(sum(r["extra_faces"] for r in images.values())),
            "errors": sum(bool(r["error"]) for r in rows),
        },
        "overall": overall,
        "by_face_size": {b: s for b, s in by_bucket.items() if s["persons"]},
        "small_face": {"small": _stats([r for r in rows if r["small_face"] is True]),
                       "not_small": _stats([r for r in rows if r["small_face"] is False]),
                       "definition": f"box longer side < 1/6 of the image edge (tolerance {SMALL_TOLERANCE:.0%})"},
    }


def write_report(rows: Sequence[dict], out: str | os.PathLike) -> dict[str, Path]:
    """Writes ``results.csv`` (one row per image x person), ``results.json`` (per image: its fields and its
    persons), ``summary.json`` and ``face_size.png`` into ``out`` (created); returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in (CSV_NAME, JSON_NAME, SUMMARY_NAME, PLOT_NAME)}
    _write_csv(rows, paths[CSV_NAME])
    paths[JSON_NAME].write_text(json.dumps(_per_image(rows), indent=1))
    summary = summarize(rows)
    paths[SUMMARY_NAME].write_text(json.dumps(summary, indent=1))
    plot_face_sizes(summary, paths[PLOT_NAME])
    return paths


def _write_csv(rows: Sequence[dict], path: Path) -> None:
    fields = list(rows[0]) if rows else []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (" ".join(f"{x:.2f}" for x in v) if isinstance(v, (tuple, list)) else v)
                             for k, v in r.items()})


_IMAGE_FIELDS = ("image_id", "image", "prompt", "seed", "clip_t", "asp", "aesthetic_predictor", "face_found",
                 "faces_in_image", "extra_faces", "identity_embedder", "identity_is_fallback")


def _per_image(rows: Sequence[dict]) -> list[dict]:
    images: dict[str, dict] = {}
    for r in rows:
        record = images.setdefault(r["image_id"], {**{k: r[k] for k in _IMAGE_FIELDS}, "persons": []})
        record["persons"].append({k: v for k, v in r.items() if k not in _IMAGE_FIELDS})
    return list(images.values())


def plot_face_sizes(summary: dict, path: str | os.PathLike) -> None:
    """Identity similarity and CLIP-I (means) and match rate against face size, one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    labels = [f"1/{d}" for d in BUCKETS]
    stats = [summary["by_face_size"].get(b) for b in labels]

    def series(metric):
        return [np.nan if s is None or s[metric]["mean"] is None else s[metric]["mean"] for s in stats]

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    x = np.arange(len(labels))
    embedder = summary["identity_embedder"]
    name = "identity (CLIP fallback, not FaceNet)" if summary["identity_is_fallback"] else f"identity ({embedder})"
    ax.plot(x, series("identity_similarity"), "o-", label=name)
    ax.plot(x, series("clip_i"), "s--", label="CLIP-I")
    ax.plot(x, [np.nan if s is None else s["match_rate"] for s in stats], "^:", label="match rate")
    ax.set_xticks(x, labels)
    ax.set_xlabel("face size (box longer side / image edge)")
    ax.set_ylabel("cosine similarity / rate")
    ax.axvspan(2.5, 3.5, color="0.9", zorder=0, label="small face (< 1/6)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
