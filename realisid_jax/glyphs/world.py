"""The glyph world: a synthetic world in which an identity is a glyph class seen across font styles.

It stands in for faces where no face data or pretrained weights can be had, and keeps what RealisID is about
measurable: *identity* (24 glyph classes of clearly different shapes), *appearance* (font style, ink colour,
stroke weight, like a person across photos), *location and scale* (a square box whose edge is 1/10 to 1/2 of the
image edge), *pose* (a rotation of -40° to 40°, with keypoints playing the face landmarks' role), *several persons*
(1 or 2 glyphs) and *text* (the caption names the background colour).

Geometry follows the face pipeline's conventions: a glyph's ink is made square by its longer edge around its centre
(as a face box is), then rotated counter-clockwise by ``rotation_deg`` (as Pillow's ``Image.rotate(angle)`` turns an
image); the person's box is that rotated square's axis-aligned bounding box. Keypoints (unit coordinates of the box
frame, (0, 0) top-left, (1, 1) bottom-right, like ``ReferenceFace.landmarks``) are the rotated square's corners
TL, TR, BR, BL, its "up" point (the middle of its top edge) and its centre. Pixel (i, j) covers ``[j, j+1) x [i, i+1)``.

Everything is host-side NumPy/Pillow and deterministic: the same spec renders the same bytes, and
``scene(seed, index)`` the same scene.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from realisid_jax.face.draw import draw_landmark_image, square_keypoints

# Upper-case letters and digits without confusable pairs (O/0/D/Q, I/1, S/5, Z/2, B/8, G/6/C).
IDENTITIES: tuple[str, ...] = ("A", "B", "C", "E", "F", "H", "J", "K", "L", "M", "N", "P", "R", "T", "U", "V", "W",
                               "X", "Y", "2", "3", "4", "7", "9")
# Named background palette (the caption names one), RGB.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 240), "gray": (128, 128, 128), "red": (200, 40, 40), "orange": (240, 140, 30),
    "yellow": (240, 210, 50), "green": (60, 160, 70), "teal": (30, 140, 140), "blue": (40, 80, 200),
    "purple": (130, 60, 170), "pink": (240, 150, 190),
}
# Glyph ink colours, RGB; an ink is used only on backgrounds it contrasts with (``inks_for``).
INKS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20), "white": (250, 250, 250), "navy": (20, 30, 90), "maroon": (110, 20, 30),
    "dark green": (10, 80, 30), "cream": (250, 240, 200), "brown": (100, 60, 20), "charcoal": (60, 60, 60),
}
MIN_CONTRAST = 90.0  # |luma(ink) - luma(background)|, 0..255
STROKES = (0, 1, 2)  # extra stroke weight, in units of 1/48 of the glyph's render size

FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@dataclasses.dataclass(frozen=True)
class Style:
    """A font style: a TrueType file shipped in matplotlib's wheel (DejaVu, STIX, Computer Modern)."""

    name: str
    font: str  # file name under ``FONT_DIR``

    @property
    def path(self) -> Path:
        return FONT_DIR / self.font


_FONTS = {
    "dejavu-sans": "DejaVuSans.ttf", "dejavu-sans-bold": "DejaVuSans-Bold.ttf",
    "dejavu-sans-oblique": "DejaVuSans-Oblique.ttf", "dejavu-sans-bold-oblique": "DejaVuSans-BoldOblique.ttf",
    "dejavu-mono": "DejaVuSansMono.ttf", "dejavu-mono-bold": "DejaVuSansMono-Bold.ttf",
    "dejavu-mono-oblique": "DejaVuSansMono-Oblique.ttf", "dejavu-mono-bold-oblique": "DejaVuSansMono-BoldOblique.ttf",
    "dejavu-serif": "DejaVuSerif.ttf", "dejavu-serif-bold": "DejaVuSerif-Bold.ttf",
    "dejavu-serif-italic": "DejaVuSerif-Italic.ttf", "dejavu-serif-bold-italic": "DejaVuSerif-BoldItalic.ttf",
    "stix": "STIXGeneral.ttf", "stix-bold": "STIXGeneralBol.ttf", "stix-italic": "STIXGeneralItalic.ttf",
    "stix-bold-italic": "STIXGeneralBolIta.ttf", "cm-roman": "cmr10.ttf", "cm-bold": "cmb10.ttf",
    "cm-sans": "cmss10.ttf", "cm-typewriter": "cmtt10.ttf", "cm-italic": "cmti10.ttf",
}
STYLES: dict[str, Style] = {name: Style(name, font) for name, font in _FONTS.items()}
# One held-out style from each family, never seen in training: the references of the benchmark's requests.
HELDOUT_STYLES: tuple[str, ...] = ("dejavu-sans-bold-oblique", "dejavu-mono-bold", "dejavu-serif-italic",
                                   "stix-bold", "cm-sans")
TRAIN_STYLES: tuple[str, ...] = tuple(s for s in STYLES if s not in HELDOUT_STYLES)

NUM_KEYPOINTS = 6
KEYPOINT_NAMES = ("top_left", "top_right", "bottom_right", "bottom_left", "up", "centre")
LANDMARK_LAYOUT = "square"  # how ``face.draw`` draws these keypoints (``config.realisid.landmark_layout``)

_RENDER_PX = 192  # font size of the master rendering, before rotation and resizing
EDGE_RANGE = (0.1, 0.5)  # box edge as a fraction of the image edge
ROTATION_RANGE = (-40.0, 40.0)
_DISTRACTOR_EDGE = (1 / 20, 1 / 14)


@dataclasses.dataclass(frozen=True)
class PersonSpec:
    """One glyph of a scene. ``box``: (x0, y0, x1, y1) pixels of the square box; ``ink``: a name of ``INKS``;
    ``stroke``: one of ``STROKES``; ``rotation_deg``: counter-clockwise, degrees."""

    identity: str
    style: str
    ink: str
    stroke: int
    box: tuple[float, float, float, float]
    rotation_deg: float


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """What a scene shows: image side ``size`` px, ``background`` (a name of ``BACKGROUNDS``), the identity glyphs
    (``persons``) and small ``distractors`` (glyphs outside every person's box, not persons)."""

    size: int
    background: str
    persons: tuple[PersonSpec, ...]
    distractors: tuple[PersonSpec, ...] = ()

    @property
    def caption(self) -> str:
        count = "a glyph" if len(self.persons) == 1 else f"{_NUMBERS[len(self.persons)]} glyphs"
        return f"{count} on a {self.background} background"


_NUMBERS = {2: "two", 3: "three", 4: "four"}


@dataclasses.dataclass(frozen=True)
class Glyph:
    """A rendered glyph filling its square box. image: (edge, edge, 3) uint8 RGB; mask: (edge, edge) bool ink;
    keypoints: (6, 2) float32 unit box coordinates (``KEYPOINT_NAMES``)."""

    image: np.ndarray
    mask: np.ndarray
    keypoints: np.ndarray


@dataclasses.dataclass(frozen=True)
class Scene:
    """A rendered scene. image: (S, S, 3) uint8 RGB; masks: (P, S, S) bool, each person's ink; keypoints:
    (P, 6, 2) float32 pixels; spec: what was rendered."""

    image: np.ndarray
    masks: np.ndarray
    keypoints: np.ndarray
    spec: SceneSpec

    @property
    def caption(self) -> str:
        return self.spec.caption


@dataclasses.dataclass(frozen=True)
class Reference:
    """A person's reference: the same class in another style, ink, stroke and rotation, filling a plain square
    image (another photo of the same person). image: (S, S, 3) uint8; mask: (S, S) bool ink (the face mask's
    role); rotation_deg counter-clockwise."""

    image: np.ndarray
    mask: np.ndarray
    identity: str
    style: str
    background: str
    rotation_deg: float

    @property
    def crop(self) -> np.ndarray:
        """(S, S, 3) uint8: what the image encoder sees, the glyph's square crop on its own plain background. A face
        reference's background is zeroed by its parsing mask; a glyph's ink alone would vanish on zeros when the
        ink is dark, so the subject region is the whole square (``face.plain_background``)."""
        return self.image


def luma(rgb) -> float:
    """ITU-R BT.601 luma of an RGB triple, 0..255."""
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def inks_for(background: str) -> tuple[str, ...]:
    """The ink names that contrast with a background (at least ``MIN_CONTRAST`` of luma)."""
    bg = luma(BACKGROUNDS[background])
    return tuple(name for name, rgb in INKS.items() if abs(luma(rgb) - bg) >= MIN_CONTRAST)


@functools.lru_cache(maxsize=4096)
def _master(identity: str, style: str, stroke: int) -> np.ndarray:
    """The glyph's ink as float32 alpha in [0, 1], cropped to its ink and padded square by the longer edge
    (centred), at about ``_RENDER_PX`` px."""
    font = ImageFont.truetype(str(STYLES[style].path), _RENDER_PX)
    width = stroke * _RENDER_PX // 48
    canvas = Image.new("L", (2 * _RENDER_PX, 2 * _RENDER_PX), 0)
    ImageDraw.Draw(canvas).text((_RENDER_PX // 2, _RENDER_PX // 4), identity, fill=255, font=font,
                                stroke_width=width, stroke_fill=255)
    alpha = np.asarray(canvas, np.float32) / 255.0
    rows, cols = np.nonzero(alpha > 0)
    if rows.size == 0:
        raise ValueError(f"font {STYLES[style].font} has no glyph for {identity!r}")
    alpha = alpha[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    side = max(alpha.shape)
    square = np.zeros((side, side), np.float32)
    top, left = (side - alpha.shape[0]) // 2, (side - alpha.shape[1]) // 2
    square[top:top + alpha.shape[0], left:left + alpha.shape[1]] = alpha
    return square


def glyph_keypoints(rotation_deg: float) -> np.ndarray:
    """(6, 2) float32 unit box coordinates of the rotated glyph square's corners TL, TR, BR, BL, up point and
    centre, for a square rotated counter-clockwise by ``rotation_deg`` inside its axis-aligned box (the
    ``"square"`` landmark layout, ``face.draw.square_keypoints``)."""
    return square_keypoints(rotation_deg)


def glyph_alpha(identity: str, style: str, stroke: int, edge: int, rotation_deg: float) -> np.ndarray:
    """(edge, edge) float32 ink coverage in [0, 1] of a glyph rotated inside its square box of ``edge`` px."""
    master = Image.fromarray(np.round(_master(identity, style, stroke) * 255).astype(np.uint8))
    rotated = master.rotate(rotation_deg, resample=Image.Resampling.BICUBIC, expand=True)
    return np.asarray(rotated.resize((edge, edge), Image.Resampling.LANCZOS), np.float32) / 255.0


def render_glyph(identity: str, style: str, ink, edge: int, rotation_deg: float, background,
                 stroke: int = 0) -> Glyph:
    """A glyph filling a square box of ``edge`` px on a plain ``background`` (RGB), ink colour ``ink`` (RGB).

    Raises:
      KeyError: unknown ``style``. ValueError: ``edge`` < 2 or the font lacks ``identity``.
    """
    if edge < 2:
        raise ValueError(f"edge must be >= 2 px, got {edge}")
    alpha = glyph_alpha(identity, style, stroke, edge, rotation_deg)[..., None]
    image = alpha * np.asarray(ink, np.float32) + (1 - alpha) * np.asarray(background, np.float32)
    return Glyph(np.round(image).astype(np.uint8), alpha[..., 0] > 0.5, glyph_keypoints(rotation_deg))


def _paste(canvas: np.ndarray, person: PersonSpec) -> np.ndarray:
    """Composites a person's glyph into ``canvas`` (float32, in place); returns its ink mask on the canvas.

    The box's pixel grid is snapped to integers: edge = round(x1 - x0), origin = round(x0), round(y0)."""
    x0, y0, x1, _ = person.box
    edge = max(2, int(round(x1 - x0)))
    alpha = glyph_alpha(person.identity, person.style, person.stroke, edge, person.rotation_deg)
    left, top = int(round(x0)), int(round(y0))
    size = canvas.shape[0]
    # Clip the glyph to the canvas (boxes may touch the border).
    a0, b0 = max(0, -top), max(0, -left)
    a1, b1 = min(edge, size - top), min(edge, size - left)
    region = (slice(top + a0, top + a1), slice(left + b0, left + b1))
    a = alpha[a0:a1, b0:b1, None]
    canvas[region] = a * np.asarray(INKS[person.ink], np.float32) + (1 - a) * canvas[region]
    mask = np.zeros(canvas.shape[:2], bool)
    mask[region] = a[..., 0] > 0.5
    return mask


def render_scene(spec: SceneSpec) -> Scene:
    """Renders a ``SceneSpec``: background, distractors, then persons (persons on top)."""
    canvas = np.empty((spec.size, spec.size, 3), np.float32)
    canvas[:] = BACKGROUNDS[spec.background]
    for distractor in spec.distractors:
        _paste(canvas, distractor)
    masks = np.stack([_paste(canvas, p) for p in spec.persons]) if spec.persons else np.zeros((0, spec.size,
                                                                                                spec.size), bool)
    keypoints = np.stack([_keypoints_px(p) for p in spec.persons]) if spec.persons else np.zeros((0, 6, 2),
                                                                                                 np.float32)
    return Scene(np.round(canvas).astype(np.uint8), masks, keypoints, spec)


def _keypoints_px(person: PersonSpec) -> np.ndarray:
    x0, y0, x1, _ = person.box
    edge = max(2, int(round(x1 - x0)))
    return (glyph_keypoints(person.rotation_deg) * edge + np.array([round(x0), round(y0)])).astype(np.float32)


def _random_glyph(rng: np.random.Generator, identity: str, styles, background: str, box, rotation: float) -> PersonSpec:
    return PersonSpec(identity=identity, style=str(rng.choice(styles)), ink=str(rng.choice(inks_for(background))),
                      stroke=int(rng.choice(STROKES)), box=tuple(float(v) for v in box), rotation_deg=rotation)


def _overlaps(box, others, margin: float = 0.0) -> bool:
    return any(box[0] < o[2] + margin and o[0] < box[2] + margin and box[1] < o[3] + margin
               and o[1] < box[3] + margin for o in others)


def random_box(rng: np.random.Generator, size: int, edge: float) -> tuple[float, float, float, float]:
    """A square box of ``edge`` px at a uniform position inside the image, corners on whole pixels."""
    edge = float(round(edge))
    x0, y0 = (float(rng.integers(0, int(size - edge) + 1)) for _ in range(2))
    return (x0, y0, x0 + edge, y0 + edge)


def sample_scene_spec(rng: np.random.Generator, *, size: int = 256, num_persons: int = 1,
                      styles=TRAIN_STYLES, identities=IDENTITIES, max_distractors: int = 3) -> SceneSpec:
    """A random scene: background from ``BACKGROUNDS``; ``num_persons`` glyphs of distinct identities, each box
    edge log-uniform in ``EDGE_RANGE`` of ``size``, rotation uniform in ``ROTATION_RANGE``, boxes not
    overlapping; 0..``max_distractors`` small glyphs (1/20..1/14 of the edge) outside every box.

    Raises:
      ValueError: ``num_persons`` not 1..4.
    """
    if not 1 <= num_persons <= 4:
        raise ValueError(f"num_persons must be 1..4, got {num_persons}")
    background = str(rng.choice(list(BACKGROUNDS)))
    chosen = rng.choice(len(identities), num_persons, replace=False)
    persons, boxes = [], []
    for k in chosen:
        # Two persons: the second box's edge is capped so that both fit side by side.
        high = EDGE_RANGE[1] if not boxes else min(EDGE_RANGE[1], 0.45)
        while True:
            edge = size * math.exp(rng.uniform(math.log(EDGE_RANGE[0]), math.log(high)))
            box = random_box(rng, size, edge)
            if not _overlaps(box, boxes):
                break
        boxes.append(box)
        persons.append(_random_glyph(rng, identities[k], styles, background, box, float(rng.uniform(*ROTATION_RANGE))))
    distractors = []
    for _ in range(int(rng.integers(0, max_distractors + 1))):
        edge = size * rng.uniform(*_DISTRACTOR_EDGE)
        box = random_box(rng, size, edge)
        if not _overlaps(box, boxes + [d.box for d in distractors], margin=2.0):
            identity = str(rng.choice(identities))
            distractors.append(_random_glyph(rng, identity, styles, background, box,
                                             float(rng.uniform(*ROTATION_RANGE))))
    return SceneSpec(size=size, background=background, persons=tuple(persons), distractors=tuple(distractors))


def scene(seed: int, index: int, **kwargs) -> Scene:
    """Scene ``index`` of the world with ``seed`` (``sample_scene_spec`` keywords pass through); deterministic."""
    return render_scene(sample_scene_spec(np.random.default_rng([seed, index]), **kwargs))


def render_reference(rng: np.random.Generator, identity: str, *, size: int = 64, styles=TRAIN_STYLES) -> Reference:
    """A reference of ``identity``: random style of ``styles``, background, contrasting ink, stroke and rotation,
    the glyph filling the square image."""
    background = str(rng.choice(list(BACKGROUNDS)))
    person = _random_glyph(rng, identity, styles, background, (0, 0, size, size), float(rng.uniform(*ROTATION_RANGE)))
    glyph = render_glyph(identity, person.style, INKS[person.ink], size, person.rotation_deg,
                         BACKGROUNDS[background], stroke=person.stroke)
    return Reference(glyph.image, glyph.mask, identity, person.style, background, person.rotation_deg)


def reference(seed: int, index: int, identity: str, **kwargs) -> Reference:
    """Reference ``index`` of ``identity`` with ``seed`` (``render_reference`` keywords pass through)."""
    return render_reference(np.random.default_rng([seed, index, IDENTITIES.index(identity)]), identity, **kwargs)


def draw_keypoints(keypoints: np.ndarray, size: int) -> np.ndarray:
    """The landmark image c_pe of a glyph: its keypoints (6, 2) in unit box coordinates drawn by the face
    pipeline's drawing code (``face.draw.draw_landmark_image``, the ``"square"`` layout).
    Returns (size, size, 3) uint8 RGB, black background."""
    return draw_landmark_image(keypoints, size, layout=LANDMARK_LAYOUT)
