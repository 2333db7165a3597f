"""The web app's request handling, free of any UI: page values in, PNG files (with their generation record)
or one-line messages out.

A ``Studio`` holds one loaded ``RealisIDPipeline`` for the life of the app; requests of the same size, person
count, steps and scheduler reuse its compiled sampling loop (seeds, prompts, boxes and scales are data).
Face boxes come from the page as fractions of the output image and go to the pipeline as pixels; what the
page shows as "used" is what the pipeline's own box rule (``realisid.conditions.check_box``) returns.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from realisid_jax.app.metadata import Generation, person_photos, pixel_boxes, save_png
from realisid_jax.face.draw import annotate, square_keypoints
from realisid_jax.face.errors import FaceError
from realisid_jax.face.image import pil_to_rgb8
from realisid_jax.realisid.conditions import (BoxError, Person, SizeError, TooManyPersonsError, check_box,
                                              conditioning_sheet)
from realisid_jax.schedulers import SCHEDULERS, get_scheduler

#: Smallest face box the page offers, as a fraction of the image edge (the method's point is small faces).
MIN_BOX_FRACTION = 1 / 16
PREVIEW_PX = 384  # longer side of the box-layout preview
PERSON_COLORS = ((255, 80, 80), (80, 200, 255), (255, 210, 60), (170, 110, 255), (90, 230, 120), (255, 140, 200))
#: Default upload size limit of ``realisid app`` (``--max-upload-mb``), megabytes (2**20 bytes).
MAX_UPLOAD_MB = 25
#: Largest photo the app decodes (a 48-megapixel phone photo is 8000x6000): a larger one is refused from its
#: header, before any pixel is decoded, so a small file that would unpack to gigabytes costs nothing.
MAX_PHOTO_PIXELS = 50_000_000


@dataclasses.dataclass(frozen=True)
class UnreadablePhoto:
    """An upload that gives no photo: ``str()`` is the file's name and what is wrong with it, one line."""

    name: str
    problem: str

    def __str__(self) -> str:
        return f"{self.name} {self.problem}"


def read_photo(path: str | os.PathLike, name: str | None = None, *, max_bytes: int | None = None,
               max_pixels: int = MAX_PHOTO_PIXELS) -> np.ndarray | UnreadablePhoto:
    """An uploaded file as the (H, W, 3) uint8 RGB photo ``face.image.load_image`` reads from it (so ``realisid
    sample`` given the same file sees the same pixels), or what is wrong with it.

    Never raises for the file's content: a file that is not an image, is cut short or damaged, is over
    ``max_bytes`` or holds more than ``max_pixels`` pixels (checked from the header, before decoding) is an
    ``UnreadablePhoto`` named ``name`` (default: the file's name).
    """
    name = name or Path(path).name
    size = os.path.getsize(path)
    if max_bytes is not None and size > max_bytes:
        return UnreadablePhoto(name, f"is {size / 2**20:.1f} MB, over the upload limit of {max_bytes / 2**20:g} MB")
    too_large = f"larger than this app reads (over {max_pixels:,} pixels); scale it down"
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                return UnreadablePhoto(name, f"is {width}x{height} pixels, {too_large}")
            image.load()
            return pil_to_rgb8(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError:  # Pillow's own guard, at twice Image.MAX_IMAGE_PIXELS
        return UnreadablePhoto(name, f"is {too_large}")
    except Image.UnidentifiedImageError:
        return UnreadablePhoto(name, "is not an image (or not in a format this app reads: PNG, JPEG, WebP, ...)")
    except Exception as err:  # noqa: BLE001 - any decoder error of an uploaded file is a message, not a traceback
        return UnreadablePhoto(name, f"is cut short or damaged ({type(err).__name__}: {err}); upload it again")


class RequestError(ValueError):
    """A request the app cannot run; the message is shown in the page as it is."""


@dataclasses.dataclass(frozen=True, eq=False)
class PersonRequest:
    """One person slot of the page.

    Attributes:
      reference: (H, W, 3) uint8 RGB photo of the person, None (slot unused) or an ``UnreadablePhoto`` (an
        upload that gave no photo: ``Studio.generate`` refuses the request with its message).
      box: ``(centre x, centre y, width, height)`` of the face box, fractions of the output width / height.
      pose: optional (H, W, 3) uint8 RGB photo whose landmarks set pose and expression (or ``UnreadablePhoto``).
      rotation: optional pose of a square subject (``Studio.takes_rotation`` configs): degrees counter-clockwise,
        given instead of a pose photo; None = the reference's own, upright.
    """

    reference: np.ndarray | UnreadablePhoto | None
    box: tuple[float, float, float, float]
    pose: np.ndarray | UnreadablePhoto | None = None
    rotation: float | None = None

    def pixel_box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` output pixels."""
        cx, cy, w, h = (float(v) for v in self.box)
        return (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height


@dataclasses.dataclass(frozen=True, eq=False)
class Request:
    """Everything the page's Generate button sends; ``seed`` None draws a random one."""

    prompt: str
    persons: Sequence[PersonRequest]
    height: int
    width: int
    steps: int
    scheduler: str
    text_guidance_scale: float
    id_guidance_scale: float
    id_start_fraction: float
    seed: int | None = 0
    num_images: int = 1
    negative_prompt: str = ""


@dataclasses.dataclass(frozen=True)
class Result:
    """images: one PNG per image (each with its generation record); sheet: the conditioning sheet PNG."""

    images: tuple[Path, ...]
    sheet: Path
    generation: Generation
    seconds: float


class Studio:
    """One loaded pipeline serving the page's requests, one at a time.

    Args:
      pipeline: a ``RealisIDPipeline`` (loaded once, at app start).
      config_name, config_overrides, weights: recorded in every PNG (see ``metadata.Generation``).
      out_dir: where each request's PNGs go (a sub-folder per request).
    """

    def __init__(self, pipeline, *, config_name: str, out_dir: str | Path, config_overrides: Sequence[str] = (),
                 weights: dict | None = None):
        self.pipeline = pipeline
        self.config = pipeline.config
        self.config_name = config_name
        self.config_overrides = tuple(config_overrides)
        self.weights = dict(weights or {})
        self.out_dir = Path(out_dir)
        self._scheduler_config = pipeline.scheduler.config
        self._lock = threading.Lock()  # the pipeline (and its scheduler slot) serves one request at a time
        # The face analyser (TFLite interpreters) serves one photo at a time: page previews and Generate share it.
        self._face_lock = threading.RLock()

    @property
    def max_persons(self) -> int:
        return int(self.config.realisid.max_persons)

    @property
    def takes_rotation(self) -> bool:
        """Whether a person's pose is a rotation (the config's ``realisid.landmark_layout`` is ``"square"``, the
        glyph world's square subjects) rather than a pose photo."""
        return self.config.realisid.get("landmark_layout", "face_mesh") == "square"

    # ---------------------------------------------------------------------------------------- page helpers
    def face_preview(self, photo: np.ndarray | None) -> tuple[np.ndarray | None, str]:
        """The photo with its detected face box and landmarks drawn, and a message ("" when a face was found).

        The same analysis (largest face) the pipeline will run on it."""
        if photo is None:
            return None, ""
        if isinstance(photo, UnreadablePhoto):
            return None, f"⚠️ {photo}"
        try:
            with self._face_lock:
                face = self._analyzer().analyze(photo, policy="largest", source="this photo")[0]
        except FaceError as err:
            return None, f"⚠️ {err}: use a photo where the face is clearly visible"
        return annotate(np.asarray(photo), [face.box], landmarks=[face.landmarks]), ""

    def layout_preview(self, persons: Sequence[PersonRequest], height: int, width: int) -> tuple[np.ndarray, str]:
        """The output canvas with the box of each person with a reference photo (the ones generated) as set
        (thin) and as the pipeline uses it (thick), and a message for the boxes it rejects ("" when all are fine)."""
        try:
            height, width = _size(height, width)
            self.pipeline.prepare([], height, width)  # the pipeline's size check, no photo analysed
        except (RequestError, SizeError) as err:
            return np.zeros((8, 8, 3), np.uint8), str(err)
        scale = PREVIEW_PX / max(height, width)
        canvas = Image.new("RGB", (max(1, round(width * scale)), max(1, round(height * scale))), (48, 48, 48))
        draw = ImageDraw.Draw(canvas)
        messages = []
        for k, person in enumerate(persons):
            if person.reference is None or isinstance(person.reference, UnreadablePhoto):
                continue
            color = PERSON_COLORS[k % len(PERSON_COLORS)]
            box = person.pixel_box(height, width)
            draw.rectangle([v * scale for v in box], outline=color, width=1)
            try:
                used = check_box(box, height, width) * np.array([width, height, width, height]) * scale
            except BoxError as err:
                messages.append(f"person {k + 1}: {err}")
                continue
            draw.rectangle(used.tolist(), outline=color, width=3)
            draw.text((used[0] + 4, used[1] + 2), str(k + 1), fill=color)
        return np.asarray(canvas), "; ".join(messages)

    # --------------------------------------------------------------------------------------------- generate
    def generate(self, request: Request) -> Result:
        """Runs one request and writes its PNGs.

        Raises:
          RequestError: bad size, box, person count, steps or scheduler, or a photo without a usable face
            (the message names the person). Nothing is written then, and the studio stays usable.
        """
        start = time.perf_counter()
        height, width = _size(request.height, request.width)
        if request.steps < 1 or request.num_images < 1:
            raise RequestError("steps and number of images must be at least 1")
        if request.scheduler not in SCHEDULERS:
            raise RequestError(f"unknown scheduler {request.scheduler!r}; choose from {sorted(SCHEDULERS)}")
        slots = [(k, p) for k, p in enumerate(request.persons) if p.reference is not None]
        for k, person in slots:
            for kind, photo in (("reference", person.reference), ("pose", person.pose)):
                if isinstance(photo, UnreadablePhoto):
                    raise RequestError(f"person {k + 1}: the {kind} photo {photo}")
        persons = [Person(p.reference, p.pixel_box(height, width), p.pose, self._landmarks(k, p)) for k, p in slots]
        _check_boxes(slots, height, width)
        seed = random.randrange(2**31) if request.seed is None else int(request.seed)
        with self._lock:
            conditions = self._prepare(persons, [k for k, _ in slots], height, width)
            self.pipeline.scheduler = self._scheduler(request.scheduler)
            output = self.pipeline(request.prompt, conditions, negative_prompt=request.negative_prompt,
                                   height=height, width=width, num_inference_steps=int(request.steps),
                                   text_guidance_scale=float(request.text_guidance_scale),
                                   id_guidance_scale=float(request.id_guidance_scale),
                                   id_start_fraction=float(request.id_start_fraction),
                                   num_images=int(request.num_images), seed=seed)
        references, poses = person_photos(persons)
        rotations = tuple(None if p.rotation is None else float(p.rotation) for _, p in slots)
        generation = Generation(
            prompt=request.prompt, negative_prompt=request.negative_prompt, seed=seed,
            boxes=pixel_boxes(conditions.boxes, conditions.valid, height, width), steps=int(request.steps),
            scheduler=request.scheduler, text_guidance_scale=float(request.text_guidance_scale),
            id_guidance_scale=float(request.id_guidance_scale), id_start_fraction=float(request.id_start_fraction),
            height=height, width=width, num_images=int(request.num_images), config=self.config_name,
            config_overrides=self.config_overrides, weights=self.weights,
            references=references, poses=poses, rotations=rotations)
        # A folder of its own per request: two requests of the same second and seed never share one.
        self.out_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{time.strftime('%Y%m%d-%H%M%S')}-seed{seed}-", dir=self.out_dir))
        images = []
        for i, image in enumerate(output.images):
            images.append(folder / f"image_{i:03d}.png")
            save_png(image, images[-1], generation.for_image(i))
        sheet = folder / "conditioning_sheet.png"
        conditioning_sheet(output.conditions, height, width).save(sheet)
        return Result(tuple(images), sheet, generation, time.perf_counter() - start)

    def _landmarks(self, k: int, person: PersonRequest) -> np.ndarray | None:
        """Slot ``k``'s ``Person.landmarks``: its rotation's keypoints, None without a rotation."""
        if person.rotation is None:
            return None
        if not self.takes_rotation:
            raise RequestError(f"person {k + 1}: a rotation needs a config whose realisid.landmark_layout is "
                               f"'square'; this one draws {self.config.realisid.get('landmark_layout', 'face_mesh')!r}")
        if not math.isfinite(float(person.rotation)):
            raise RequestError(f"person {k + 1}: the rotation must be a finite number of degrees, "
                               f"got {person.rotation}")
        if person.pose is not None:
            raise RequestError(f"person {k + 1}: give a pose photo or a rotation, not both")
        return square_keypoints(float(person.rotation))

    def _prepare(self, persons: list[Person], slots: list[int], height: int, width: int):
        try:
            with self._face_lock:
                return self.pipeline.prepare(persons, height, width)
        except (SizeError, BoxError, TooManyPersonsError) as err:
            raise RequestError(str(err)) from None
        except FaceError as err:
            # The pipeline names array photos "<array>": find the person to name in the page.
            for k, person in zip(slots, persons):
                for kind, photo in (("reference", person.reference), ("pose", person.pose)):
                    if photo is not None and self.face_preview(photo)[1]:
                        raise RequestError(f"person {k + 1}: no usable face in the {kind} photo") from None
            raise RequestError(str(err)) from None

    def _scheduler(self, name: str):
        # Same name, equal frozen scheduler: the compiled loop (scheduler is a static argument) is reused.
        return get_scheduler(name, self._scheduler_config)

    def _analyzer(self):
        if self.pipeline.analyzer is None:
            from realisid_jax.face.analysis import FaceAnalyzer

            self.pipeline.analyzer = FaceAnalyzer()
        return self.pipeline.analyzer


def _check_boxes(slots: Sequence[tuple[int, PersonRequest]], height: int, width: int) -> None:
    """The pipeline's box rule for each used slot ``(k, person)``, before any photo is analysed.

    Raises:
      RequestError: the first box ``check_box`` refuses, named by its slot as the layout preview names it (the
        pipeline would number the persons it is given, skipping empty slots).
    """
    for k, person in slots:
        try:
            check_box(person.pixel_box(height, width), height, width)
        except BoxError as err:
            raise RequestError(f"person {k + 1}: {err}") from None


def _size(height, width) -> tuple[int, int]:
    """Output size as ints (the page's number fields may send floats); the size rule is the pipeline's."""
    try:
        h, w = int(height), int(width)
    except (TypeError, ValueError):
        raise RequestError(f"height and width must be whole numbers of pixels, got {height!r} x {width!r}") from None
    if h != height or w != width:
        raise RequestError(f"height and width must be whole numbers of pixels, got {height} x {width}")
    return h, w
