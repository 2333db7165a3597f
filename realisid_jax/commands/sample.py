"""``realisid sample``: the main job — prompt + per-person reference photo and face box -> images.

Without ``--face`` it runs the embedded default: the astronaut photo shipped in scikit-image, one face box,
the config's random weights (tiny config: noise, not faces) and the real CLIP vocabulary.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile

from realisid_jax.commands.arguments import (UsageError, check_fresh_folder, check_output_folder, image_size,
                                             positive_int, seed)
from realisid_jax.commands.weights import add_weight_arguments, build_pipeline, enable_compilation_cache
from realisid_jax.config import load_config

DEFAULT_PROMPT = "a photo of an astronaut smiling, portrait, studio light"


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="generate images with RealisID (the main job)")
    p.add_argument("--config", default="configs/sdxl.py:tiny", help="config file (default: configs/sdxl.py:tiny)")
    p.add_argument("--face", action="append", default=[], help="reference photo of a person (repeat per person)")
    p.add_argument("--box", action="append", default=[],
                   help="x0,y0,x1,y1 face box in output pixels, per --face (--box=-8,0,56,64 for one starting with "
                        "a minus sign); made square by its longer "
                        "edge around its centre and moved inside the image, as in training (the conditioning "
                        "sheet shows the box used); a box wholly outside the image, or whose longer edge is longer "
                        "than the image's shorter side, is refused")
    p.add_argument("--pose", action="append", default=[],
                   help="photo whose landmarks set pose/expression, per --face ('-' = the reference's own)")
    p.add_argument("--rotation", action="append", default=[], metavar="DEG",
                   help="pose of a square subject, per --face: its rotation in degrees, counter-clockwise ('-' = the "
                        "reference's own, upright); needs a config whose realisid.landmark_layout is 'square' "
                        "(configs/sdxl.py:glyphs); not with --pose for the same person")
    p.add_argument("--from-png", default=None, metavar="FILE",
                   help="re-run the request recorded in a PNG that `realisid sample` or `realisid app` wrote (its "
                        "photos, boxes, prompt, seed, settings, config and weight folders; --base/--branches/"
                        "--image-encoder given here replace the recorded folders; other request flags are unused)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--out", required=True,
                   help="output folder (PNG per image + conditioning sheet); a non-empty folder is refused "
                        "unless --overwrite, so images of two runs are never mixed")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, deleting its earlier image_*.png first")
    p.add_argument("--num-images", type=positive_int, default=1)
    p.add_argument("--seed", type=seed, default=None, help="initial-noise seed, 0 to 2**63 - 1 (default: config)")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: config)")
    p.add_argument("--height", type=image_size, default=None, help="pixels, a multiple of 64 (default: config)")
    p.add_argument("--width", type=image_size, default=None, help="pixels, a multiple of 64 (default: config)")
    add_weight_arguments(p)
    p.set_defaults(func=run)


def _persons(args, config, height: int, width: int, recorded=None):
    """(persons, rotations, source): the pipeline's ``Person``s, per person the rotation in degrees (None: the
    reference's own pose) for the record, and the references' names for the final message."""
    from realisid_jax.app.metadata import recorded_persons
    from realisid_jax.face.draw import square_keypoints
    from realisid_jax.realisid.conditions import Person, default_person

    if recorded is not None:
        rotations = recorded.rotations or (None,) * len(recorded.boxes)
        return recorded_persons(recorded), tuple(rotations), f"the photos recorded in {args.from_png}"
    rotations = _rotations(args, config)
    if not args.face:
        return [default_person(height, width)], (None,), "skimage.data.astronaut()"
    if len(args.box) != len(args.face):
        raise UsageError(f"{len(args.face)} --face but {len(args.box)} --box; give one box per face")
    if args.pose and len(args.pose) != len(args.face):
        raise UsageError("give --pose once per --face (use '-' for the reference's own landmarks)")
    poses = args.pose or ["-"] * len(args.face)
    persons = []
    for k, (face, box, pose, rotation) in enumerate(zip(args.face, args.box, poses, rotations)):
        try:
            coords = tuple(float(v) for v in box.split(","))
        except ValueError:
            raise UsageError(f"--box {box!r} is not x0,y0,x1,y1 (four numbers)") from None
        if pose != "-" and rotation is not None:
            raise UsageError(f"person {k + 1} has both --pose and --rotation; give one of them ('-' for the other)")
        landmarks = None if rotation is None else square_keypoints(rotation)
        persons.append(Person(face, coords, None if pose == "-" else pose, landmarks))
    return persons, rotations, ", ".join(args.face)


def _rotations(args, config) -> tuple[float | None, ...]:
    """Per --face the --rotation in degrees (None: '-' or no --rotation), checked against the config's layout."""
    if not args.rotation:
        return (None,) * len(args.face)
    layout = config.realisid.get("landmark_layout", "face_mesh")
    if layout != "square":
        raise UsageError(f"--rotation needs a config whose realisid.landmark_layout is 'square' (a square subject's "
                         f"pose, e.g. configs/sdxl.py:glyphs); {args.config} has {layout!r}")
    if len(args.rotation) != len(args.face):
        raise UsageError(f"{len(args.face)} --face but {len(args.rotation)} --rotation; give --rotation once per "
                         f"--face (use '-' for the reference's own upright pose)")
    rotations = []
    for text in args.rotation:
        try:
            value = None if text == "-" else float(text)
        except ValueError:
            raise UsageError(f"--rotation {text!r} is not a number of degrees (or '-')") from None
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--rotation {text!r} is not finite")
        rotations.append(value)
    return tuple(rotations)


def _warn_squared_boxes(persons, boxes, height: int, width: int) -> None:
    """A warning (stderr, one line) per box that ``check_box`` changed: old -> new, in pixels. ``boxes`` are the
    used ones, normalised (``PersonConditions.boxes``)."""
    import numpy as np

    scale = np.array([width, height, width, height])
    for person, used in zip(persons, boxes):
        given, new = np.asarray(person.box, np.float64), used * scale
        if not np.allclose(given, new, atol=0.01):  # float32 round trip of the normalised box: ~1e-4 px
            old_text, new_text = (",".join(f"{round(float(v), 2):g}" for v in b) for b in (given, new))
            print(f"warning: --box {old_text} -> {new_text}: the square of its longer edge around its centre, "
                  f"inside the {width}x{height} image, as in training", file=sys.stderr)


def _warn_lost_input(args) -> None:
    """Warnings (stderr) where a run would silently ignore part of what was asked."""
    from realisid_jax.text.tokenizer import CLIP_MAX_LENGTH, offline_clip_tokenizer

    tokenizer = offline_clip_tokenizer()
    for flag, prompt in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        count = len(tokenizer(prompt or "").input_ids)  # with the start and end tokens
        if count > CLIP_MAX_LENGTH:
            print(f"warning: {flag} is {count - 2} tokens; CLIP reads {CLIP_MAX_LENGTH - 2}, the last "
                  f"{count - CLIP_MAX_LENGTH} are dropped", file=sys.stderr)
    if args.base is not None and args.branches is None:
        print("warning: --base without --branches: the RealisID branches are fresh copies of the UNet with "
              "zero-initialised outputs, so they add nothing; pass --branches (realisid export) for identity "
              "control", file=sys.stderr)


def run(args) -> int:
    from PIL import Image

    from realisid_jax.app.metadata import png_info
    from realisid_jax.realisid.conditions import conditioning_sheet
    from realisid_jax.realisid.pipeline import prepare_conditions

    recorded = _apply_record(args) if args.from_png else None
    config = load_config(args.config, args.config_overrides)
    height = args.height or config.sampling.height
    width = args.width or config.sampling.width
    persons, rotations, source = _persons(args, config, height, width, recorded)
    out = check_output_folder(args.out)
    check_fresh_folder(out, overwrite=args.overwrite, pattern="image_*.png")
    conditions = prepare_conditions(config, persons, height, width)  # bad input fails before models load
    _warn_squared_boxes(persons, conditions.boxes, height, width)
    _warn_lost_input(args)
    enable_compilation_cache()
    pipeline = build_pipeline(config, args)
    result = pipeline(args.prompt, conditions, negative_prompt=args.negative_prompt, height=height, width=width,
                      num_inference_steps=args.steps, num_images=args.num_images,
                      seed=config.sampling.seed if args.seed is None else args.seed)
    # Everything is computed before anything is written: a failure leaves --out untouched.
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("image_*.png"):  # only reached with --overwrite (or an empty folder)
        old.unlink()
    generation = _generation(args, config, result.conditions, height, width, persons, rotations)
    files = [(f"image_{i:03d}.png", Image.fromarray(img), png_info(generation.for_image(i)))
             for i, img in enumerate(result.images)]
    files.append(("conditioning_sheet.png", conditioning_sheet(result.conditions, height, width), None))
    try:
        _write_pngs(out, files)
    except OSError as err:  # a full disk, a quota: the run failed, not its input
        print(f"error: writing {out}/ failed: {err.strerror or err}; no image of this run was kept", file=sys.stderr)
        return 1
    print(f"wrote {len(result.images)} image(s) and conditioning_sheet.png to {out}/ "
          f"(references: {source})")
    return 0


def _write_pngs(out, files) -> None:
    """Writes each ``(name, image, pnginfo)`` to ``out/name``, all or none: each through a temporary file renamed
    into place, so a file named ``image_*.png`` is always whole, and on a failure the files written so far are
    removed too, so ``--out`` never holds part of a run.

    Raises:
      OSError: a write failed (e.g. no space left on the device); nothing of ``files`` is left in ``out``.
    """
    written = []
    try:
        for name, image, info in files:
            fd, tmp = tempfile.mkstemp(dir=out, suffix=".png.tmp")
            os.close(fd)
            written.append(tmp)
            os.chmod(tmp, 0o644)
            image.save(tmp, format="PNG", pnginfo=info)  # images carry their request (realisid_jax.app.metadata)
            os.replace(tmp, out / name)
            written[-1] = out / name
    except OSError:
        for path in written:
            os.remove(path)
        raise


def _apply_record(args):
    """Sets ``args`` to the request recorded in ``args.from_png`` (weight folders given on the command line win);
    the scales and the scheduler go in as config overrides. Returns the record."""
    from realisid_jax.app.metadata import WEIGHT_FLAGS, read_generation

    g = read_generation(args.from_png)
    settings = {"scheduler": g.scheduler, "text_guidance_scale": g.text_guidance_scale,
                "id_guidance_scale": g.id_guidance_scale, "id_start_fraction": g.id_start_fraction}
    args.config = g.config
    args.config_overrides = [*g.config_overrides, *(f"--config.sampling.{k}={v!r}" for k, v in settings.items())]
    args.prompt, args.negative_prompt, args.seed, args.steps = g.prompt, g.negative_prompt, g.seed, g.steps
    args.height, args.width, args.num_images = g.height, g.width, g.num_images
    for flag in WEIGHT_FLAGS:
        if getattr(args, flag, None) is None:
            setattr(args, flag, g.weights.get(flag))
    return g


def _generation(args, config, conditions, height: int, width: int, persons, rotations):
    """The request as run (config defaults filled in, boxes as the pipeline used them), for the PNGs."""
    from realisid_jax.app.metadata import WEIGHT_FLAGS, Generation, person_photos, pixel_boxes

    s = config.sampling
    references, poses = person_photos(persons)
    return Generation(
        prompt=args.prompt, negative_prompt=s.negative_prompt if args.negative_prompt is None else args.negative_prompt,
        seed=s.seed if args.seed is None else args.seed, steps=args.steps or s.num_inference_steps,
        boxes=pixel_boxes(conditions.boxes, conditions.valid, height, width), scheduler=s.scheduler,
        text_guidance_scale=s.text_guidance_scale, id_guidance_scale=s.id_guidance_scale,
        id_start_fraction=s.id_start_fraction, height=height, width=width, num_images=args.num_images,
        config=args.config, config_overrides=tuple(args.config_overrides),
        weights={k: getattr(args, k, None) for k in WEIGHT_FLAGS}, references=references, poses=poses,
        rotations=tuple(rotations))
