"""``realisid evaluate --generated DIR --out DIR``: score generated images with the paper's metrics.

Reads ``DIR/manifest.json`` (format: ``realisid_jax.eval.manifest``; written by ``realisid
benchmark-prompts``), and writes to ``--out``: ``results.csv`` (one row per image x person),
``results.json`` (per image), ``summary.json`` (means overall, per face size 1/4 … 1/7, small vs not small)
and ``face_size.png``.

Identity similarity uses FaceNet when ``--facenet`` gives its weights (TorchScript; see
``realisid_jax.eval.identity``), else the CLIP image encoder of ``--clip-vision`` as a fallback, labelled
as such in every output. CLIP-I needs ``--clip-vision``, CLIP-T also ``--clip-text`` (same CLIP model;
tokenizer: ``--tokenizer`` folder, default the offline CLIP vocabulary). ASP (aesthetic score) needs
``--aesthetic`` (LAION's improved aesthetic predictor, ``realisid_jax.eval.aesthetic``) and ``--clip-vision``
(OpenAI CLIP ViT-L/14 for LAION's weights), whose embedding of the whole image it scores; without it the
``asp`` column is empty and the summary says so. Exit code 0, or 2 when an input is unusable (no manifest,
no embedder, weights that do not fit).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand to ``subparsers``; its handler is ``args.func(args) -> int``."""
    p = subparsers.add_parser("evaluate", help="score generated images: identity, CLIP-T/I, pose, expression",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generated", required=True, type=Path, help="folder with manifest.json and the images")
    p.add_argument("--refs", type=Path, default=None,
                   help="folder that relative reference/pose paths of the manifest are relative to "
                        "(default: --generated)")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--facenet", type=Path, default=None, help="FaceNet TorchScript file (identity metric)")
    p.add_argument("--clip-vision", type=Path, default=None,
                   help="transformers CLIPVisionModelWithProjection folder (CLIP-I; identity fallback)")
    p.add_argument("--clip-text", type=Path, default=None,
                   help="transformers CLIPTextModelWithProjection folder of the same CLIP model (CLIP-T)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="CLIP tokenizer folder for --clip-text (default: the offline CLIP vocabulary)")
    p.add_argument("--aesthetic", type=Path, default=None,
                   help="LAION aesthetic predictor weights, sac+logos+ava1-l14-linearMSE.pth or .safetensors "
                        "(ASP; needs --clip-vision ViT-L/14)")
    p.add_argument("--min-similarity", type=float, default=None,
                   help="identity similarity below which a face is not matched to a person (default: none)")
    p.set_defaults(func=run)
    return p


def build_evaluator(args: argparse.Namespace):
    """The ``Evaluator`` the arguments ask for.

    Raises:
      ValueError: no identity embedder is possible, a model lacks the one it needs, or weights do not fit
        (``CheckpointMismatchError``). FileNotFoundError: a weights file or folder is missing.
    """
    from realisid_jax.eval.aesthetic import AestheticScorer
    from realisid_jax.eval.clip_score import ClipScorer
    from realisid_jax.eval.harness import Evaluator
    from realisid_jax.eval.identity import CLIPFaceEmbedder, FaceNetEmbedder

    if args.facenet is None and args.clip_vision is None:
        raise ValueError("identity similarity needs --facenet (FaceNet weights) or --clip-vision (CLIP fallback)")
    if args.clip_text is not None and args.clip_vision is None:
        raise ValueError("--clip-text needs --clip-vision (CLIP-T compares text and image embeddings)")
    if args.aesthetic is not None and args.clip_vision is None:
        raise ValueError("--aesthetic needs --clip-vision (the aesthetic predictor scores CLIP ViT-L/14 image "
                         "embeddings of the whole image)")
    aesthetic = AestheticScorer.from_file(args.aesthetic) if args.aesthetic is not None else None
    clip = None
    if args.clip_vision is not None:
        tokenizer = None
        if args.clip_text is not None:
            from realisid_jax.text.tokenizer import load_tokenizer, offline_clip_tokenizer

            tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else offline_clip_tokenizer()
        clip = ClipScorer.from_pretrained(args.clip_vision, args.clip_text, tokenizer)
    if args.facenet is not None:
        embedder = FaceNetEmbedder(args.facenet)
    else:
        print(f"note: no --facenet: identity similarity uses the CLIP image encoder of {args.clip_vision} "
              "(fallback, labelled in every output; not comparable with FaceNet numbers)", file=sys.stderr)
        embedder = CLIPFaceEmbedder(clip.vision_model, source=args.clip_vision.name, encode=clip.encode_pixels)
    return Evaluator(embedder, clip, aesthetic=aesthetic, min_similarity=args.min_similarity)


def run(args: argparse.Namespace) -> int:
    """Handler of ``realisid evaluate``."""
    from realisid_jax.eval.manifest import ManifestError, read_manifest
    from realisid_jax.eval.report import write_report

    try:
        entries = read_manifest(args.generated, args.refs)
        evaluator = build_evaluator(args)
    except (ManifestError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = evaluator.evaluate_all(
        entries, progress=lambda i, n, e: print(f"[{i + 1}/{n}] {e.id}", file=sys.stderr, flush=True))
    paths = write_report([r.as_dict() for r in rows], args.out)
    summary = paths["summary.json"].read_text()
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(summary if len(summary) < 4000 else f"summary: {paths['summary.json']}")
    return 0
