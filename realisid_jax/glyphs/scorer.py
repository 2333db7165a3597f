"""The glyph world's independent scorer: what a generated image shows in each requested box, judged by a small CNN
trained only on rendered glyphs (never on generated images), plus pixel measures of location and background.

For each requested person the scene is cut to the box's glyph square, de-rotated by the requested rotation and
resampled to ``INPUT_SIZE`` px (``derotated_crop``); the CNN sees its *ink map* (the distance of each pixel from the
image's background colour, scaled by the crop's contrast), so that ink and background colours do not matter, and
predicts the identity (24 logits) and the residual rotation (the glyph's rotation minus the requested one, as
sin/cos). Training crops come from rendered scenes of the training styles (backgrounds, distractors, boxes of 1/10
to 1/2 of the edge) with a few pixels of box jitter and up to ``ROTATION_JITTER`` degrees of rotation error, so the
de-rotation error is learned; accuracy is reported on held-out-style scenes at each box size of ``BOX_FRACTIONS``.

Per image, ``score_image`` gives per person: identity prediction and correctness, location (IoU of the glyph's ink
bounding box, within a margin around the requested box, with the requested box; ``ink_box_iou``), rotation error
(degrees, the predicted residual), and the background colour (nearest palette colour of the border region).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.ndimage
from flax import nnx, traverse_util
from safetensors.numpy import load_file, save_file

from realisid_jax.face.image import warp_affine
from realisid_jax.glyphs import world
from realisid_jax.glyphs.fitting import checkpointed_loop

INPUT_SIZE = 32
CROP_MARGIN = 1.25  # crop side / glyph square side: room for box and rotation errors
BOX_FRACTIONS = (1 / 2, 1 / 3, 1 / 4, 1 / 6, 1 / 8, 1 / 10)  # box edge / image edge, the world's scales
ROTATION_JITTER = 35.0  # degrees of de-rotation error seen in training
BOX_JITTER = 0.05  # box shift (of the edge, at least 2 px) and relative scale error seen in training
INK_THRESHOLD = 48  # 0..255 channel distance from the background that counts as ink (world inks differ by >= 60)
LOCATION_MARGIN = 0.25  # of the box edge: ink searched this far around the requested box
WEIGHTS_NAME, CONFIG_NAME = "scorer.safetensors", "scorer.json"


class PersonRequest(Protocol):
    """What was asked of one person: ``world.PersonSpec`` and ``manifest.Person`` have these fields."""

    identity: str
    box: Sequence[float]  # (x0, y0, x1, y1) image pixels
    rotation_deg: float  # counter-clockwise, as Pillow's Image.rotate


class ImageRequest(Protocol):
    """What was asked of an image: ``world.SceneSpec`` and ``manifest.Record`` have these fields."""

    background: str  # a name of world.BACKGROUNDS
    persons: Sequence[PersonRequest]


# ---------------------------------------------------------------------------------------------------- pixels


def border_colour(image: np.ndarray) -> np.ndarray:
    """Median RGB (3,) float32 of the image's border frame (1/32 of the edge, at least 2 px): its background."""
    w = max(2, min(image.shape[:2]) // 32)
    frame = np.concatenate([image[:w].reshape(-1, 3), image[-w:].reshape(-1, 3), image[:, :w].reshape(-1, 3),
                            image[:, -w:].reshape(-1, 3)])
    return np.median(frame, axis=0).astype(np.float32)


def nearest_background(rgb: Sequence[float]) -> str:
    """The name of the ``world.BACKGROUNDS`` colour nearest (Euclidean RGB) to ``rgb``."""
    names = list(world.BACKGROUNDS)
    palette = np.asarray([world.BACKGROUNDS[n] for n in names], np.float32)
    return names[int(np.argmin(np.linalg.norm(palette - np.asarray(rgb, np.float32), axis=1)))]


def glyph_square(box: Sequence[float], rotation_deg: float) -> tuple[float, float, float]:
    """``(cx, cy, side)`` px of the glyph square a box holds: the box is the square's bounding box once rotated
    (``world``'s geometry), so side = edge / (|cos| + |sin|)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    t = math.radians(rotation_deg)
    edge = max(x1 - x0, y1 - y0)
    return (x0 + x1) / 2, (y0 + y1) / 2, edge / (abs(math.cos(t)) + abs(math.sin(t)))


def derotated_crop(image: np.ndarray, box: Sequence[float], rotation_deg: float, *, size: int = INPUT_SIZE,
                   margin: float = CROP_MARGIN) -> np.ndarray:
    """The glyph square of ``box`` turned back by ``rotation_deg`` (clockwise), ``margin`` times its side,
    resampled to (size, size, C) with ``image``'s dtype; zero outside the image."""
    cx, cy, side = glyph_square(box, rotation_deg)
    t = math.radians(rotation_deg)
    c, s = math.cos(t), math.sin(t)
    # The world turns glyph-frame points q into the image by [[c, s], [-s, c]]; its transpose turns them back.
    a = size / (side * margin) * np.array([[c, -s], [s, c]])
    offset = size / 2 - a @ np.array([cx, cy])
    return warp_affine(image, np.concatenate([a, offset[:, None]], axis=1), (size, size), border="constant")


def ink_map(crop: np.ndarray, background: Sequence[float]) -> np.ndarray:
    """(H, W, 3) crop -> (H, W) float32 in [0, 1]: the largest channel distance from ``background`` (RGB 0..255),
    divided by the crop's 99th percentile of it (at least 0.1 of full scale): ink and background colours drop
    out, the shape stays."""
    d = np.abs(crop.astype(np.float32) - np.asarray(background, np.float32)).max(-1) / 255.0
    return np.clip(d / max(float(np.quantile(d, 0.99)), 0.1), 0.0, 1.0)


def ink_box_iou(image: np.ndarray, box: Sequence[float], background: Sequence[float], *,
                margin: float = LOCATION_MARGIN, threshold: float = INK_THRESHOLD) -> float:
    """IoU of the glyph's ink bounding box with the requested ``box``.

    Ink: pixels whose largest channel distance from ``background`` (RGB) exceeds ``threshold``, within the box
    grown by ``margin`` of its edge on each side; only 8-connected ink components that touch the box count
    (a distractor beside it does not), and specks under 1/400 of the box's area are ignored. 0 where no ink.
    A perfect render scores below 1: a glyph's ink does not fill the bounding box of its rotated square.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    grow = margin * max(x1 - x0, y1 - y0)
    h, w = image.shape[:2]
    rx0, ry0 = max(0, int(math.floor(x0 - grow))), max(0, int(math.floor(y0 - grow)))
    rx1, ry1 = min(w, int(math.ceil(x1 + grow))), min(h, int(math.ceil(y1 + grow)))
    if rx1 <= rx0 or ry1 <= ry0:
        return 0.0
    region = image[ry0:ry1, rx0:rx1].astype(np.float32)
    ink = np.abs(region - np.asarray(background, np.float32)).max(-1) > threshold
    labels, count = scipy.ndimage.label(ink, structure=np.ones((3, 3)))
    if count == 0:
        return 0.0
    inside = np.zeros_like(ink)
    inside[max(0, int(y0) - ry0):int(math.ceil(y1)) - ry0, max(0, int(x0) - rx0):int(math.ceil(x1)) - rx0] = True
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    touching = np.unique(labels[inside & ink])
    keep = [k for k in touching if k and sizes[k] >= (x1 - x0) * (y1 - y0) / 400]
    if not keep:
        return 0.0
    rows, cols = np.nonzero(np.isin(labels, keep))
    ink_box = (cols.min() + rx0, rows.min() + ry0, cols.max() + 1 + rx0, rows.max() + 1 + ry0)
    return box_iou(ink_box, box)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def scorer_input(image: np.ndarray, box: Sequence[float], rotation_deg: float,
                 background: Sequence[float] | None = None) -> np.ndarray:
    """The CNN's input for one requested person: (INPUT_SIZE, INPUT_SIZE) float32 ink map of the de-rotated crop;
    ``background`` default: the image's ``border_colour``."""
    background = border_colour(image) if background is None else background
    return ink_map(derotated_crop(image, box, rotation_deg), background)


# ---------------------------------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class ScorerConfig:
    """The CNN's sizes: three stages of 3x3 convolutions (``widths``), each followed by 2x2 max pooling, then a
    ``hidden``-wide dense layer and the heads."""

    input_size: int = INPUT_SIZE
    widths: tuple[int, int, int] = (16, 32, 64)
    hidden: int = 128
    crop_margin: float = CROP_MARGIN
    identities: tuple[str, ...] = world.IDENTITIES


class GlyphNet(nnx.Module):
    """(B, S, S) ink maps in [0, 1] -> ``(logits (B, K), rotation (B, 2))``: identity logits over
    ``config.identities`` and the residual rotation as an unnormalised (sin, cos)."""

    def __init__(self, config: ScorerConfig, *, rngs: nnx.Rngs):
        w1, w2, w3 = config.widths
        self.conv1 = nnx.Conv(1, w1, (3, 3), rngs=rngs)
        self.conv2a = nnx.Conv(w1, w2, (3, 3), rngs=rngs)
        self.conv2b = nnx.Conv(w2, w2, (3, 3), rngs=rngs)
        self.conv3a = nnx.Conv(w2, w3, (3, 3), rngs=rngs)
        self.conv3b = nnx.Conv(w3, w3, (3, 3), rngs=rngs)
        self.norm1, self.norm2, self.norm3 = (nnx.GroupNorm(w, num_groups=8, rngs=rngs) for w in config.widths)
        flat = (config.input_size // 8) ** 2 * w3
        self.dense = nnx.Linear(flat, config.hidden, rngs=rngs)
        self.identity_head = nnx.Linear(config.hidden, len(config.identities), rngs=rngs)
        self.rotation_head = nnx.Linear(config.hidden, 2, rngs=rngs)

    def __call__(self, ink: jax.Array) -> tuple[jax.Array, jax.Array]:
        pool = lambda x: nnx.max_pool(x, (2, 2), (2, 2))  # noqa: E731
        x = pool(jax.nn.relu(self.norm1(self.conv1(ink[..., None]))))
        x = pool(jax.nn.relu(self.norm2(self.conv2b(jax.nn.relu(self.conv2a(x))))))
        x = pool(jax.nn.relu(self.norm3(self.conv3b(jax.nn.relu(self.conv3a(x))))))
        x = jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))
        return self.identity_head(x), self.rotation_head(x)


@jax.jit(static_argnums=0)
def _predict(graphdef: nnx.GraphDef, state: nnx.State, ink: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits, rotation = nnx.merge(graphdef, state)(ink)
    return jax.nn.softmax(logits), jnp.degrees(jnp.arctan2(rotation[:, 0], rotation[:, 1]))


@dataclasses.dataclass
class Scorer:
    """A trained ``GlyphNet`` with its config and the figures measured when it was trained."""

    model: GlyphNet
    config: ScorerConfig
    metrics: dict = dataclasses.field(default_factory=dict)

    def predict(self, ink: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """(N, S, S) ink maps -> (probabilities (N, K) float32, residual rotation (N,) degrees in (-180, 180])."""
        graphdef, state = nnx.split(self.model)
        # Few compiled shapes: one image's persons pad to 8, larger sets to whole batches.
        step = 8 if len(ink) <= 8 else batch_size
        padded = np.concatenate([ink, np.zeros((-len(ink) % step, *ink.shape[1:]), np.float32)])
        outs = [_predict(graphdef, state, padded[i:i + step]) for i in range(0, len(padded), step)]
        return (np.concatenate([np.asarray(p) for p, _ in outs])[:len(ink)],
                np.concatenate([np.asarray(r) for _, r in outs])[:len(ink)])

    def save(self, folder: str | Path) -> Path:
        """Writes ``scorer.safetensors`` (parameters, '.'-joined names) and ``scorer.json`` (config and metrics)
        into ``folder`` (created); returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(self.model, nnx.Param)), sep=".")
        save_file({k: np.asarray(v) for k, v in params.items()}, folder / WEIGHTS_NAME)
        (folder / CONFIG_NAME).write_text(json.dumps({"config": dataclasses.asdict(self.config),
                                                      "metrics": self.metrics}, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Scorer:
        """Reads a folder written by ``save``. Raises FileNotFoundError (a file missing) or ValueError (weights
        that do not fit the config)."""
        folder = Path(folder)
        saved = json.loads((folder / CONFIG_NAME).read_text())
        config = ScorerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()})
        model = GlyphNet(config, rngs=nnx.Rngs(0))
        state = nnx.state(model, nnx.Param)
        weights = traverse_util.unflatten_dict(load_file(folder / WEIGHTS_NAME), sep=".")
        expected = traverse_util.flatten_dict(nnx.to_pure_dict(state), sep=".")
        got = traverse_util.flatten_dict(weights, sep=".")
        if {k: v.shape for k, v in expected.items()} != {k: v.shape for k, v in got.items()}:
            raise ValueError(f"{folder / WEIGHTS_NAME} does not fit the config in {folder / CONFIG_NAME}")
        nnx.replace_by_pure_dict(state, weights)
        nnx.update(model, state)
        return cls(model, config, saved.get("metrics", {}))


# ---------------------------------------------------------------------------------------------------- data


def _jittered_box(rng: np.random.Generator, box: Sequence[float]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    edge = x1 - x0
    shift = max(2.0, BOX_JITTER * edge)
    cx, cy = (x0 + x1) / 2 + rng.uniform(-shift, shift), (y0 + y1) / 2 + rng.uniform(-shift, shift)
    half = edge * rng.uniform(1 - BOX_JITTER, 1 + BOX_JITTER) / 2
    return cx - half, cy - half, cx + half, cy + half


def training_crops(seed: int, num_scenes: int, *, crops_per_person: int = 2, styles=world.TRAIN_STYLES,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scorer inputs from ``num_scenes`` rendered scenes (1 or 2 persons), each person cut ``crops_per_person``
    times with a jittered box and a de-rotation error uniform in +-``ROTATION_JITTER``.

    Returns:
      ``(ink (N, S, S) float16, labels (N,) int32, residual (N,) float32 degrees)``; residual = the glyph's
      rotation minus the rotation it was de-rotated by.
    """
    rng = np.random.default_rng([seed, 7])
    ink, labels, residual = [], [], []
    for index in range(num_scenes):
        scene = world.scene(seed, index, num_persons=int(rng.integers(1, 3)), styles=styles)
        background = border_colour(scene.image)
        for person in scene.spec.persons:
            for _ in range(crops_per_person):
                error = rng.uniform(-ROTATION_JITTER, ROTATION_JITTER)
                ink.append(scorer_input(scene.image, _jittered_box(rng, person.box), person.rotation_deg - error,
                                        background))
                labels.append(world.IDENTITIES.index(person.identity))
                residual.append(error)
    return np.stack(ink).astype(np.float16), np.asarray(labels, np.int32), np.asarray(residual, np.float32)


def sized_scene(rng: np.random.Generator, identity: str, fraction: float, *, size: int = 256,
                styles=world.HELDOUT_STYLES) -> world.Scene:
    """A one-person scene of ``identity`` whose box edge is ``fraction`` of the image edge (random place,
    rotation, style of ``styles``, background, distractors that stay clear of the box)."""
    spec = world.sample_scene_spec(rng, size=size, styles=styles)
    box = world.random_box(rng, size, fraction * size)
    person = dataclasses.replace(spec.persons[0], identity=identity, box=box)
    clear = tuple(d for d in spec.distractors if d.box[2] + 2 <= box[0] or box[2] + 2 <= d.box[0]
                  or d.box[3] + 2 <= box[1] or box[3] + 2 <= d.box[1])
    return world.render_scene(dataclasses.replace(spec, persons=(person,), distractors=clear))


# ---------------------------------------------------------------------------------------------------- training


def _make_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation):
    def loss_fn(params, ink, labels, residual):
        logits, rotation = nnx.merge(graphdef, params)(ink.astype(jnp.float32))
        target = jnp.stack([jnp.sin(jnp.radians(residual)), jnp.cos(jnp.radians(residual))], -1)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return ce + jnp.mean(jnp.sum((rotation - target) ** 2, -1)), (logits.argmax(-1) == labels).mean()

    @jax.jit
    def step(state, ink, labels, residual):
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], ink, labels, residual)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return ({"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                 "step": state["step"] + 1}, {"loss": loss, "accuracy": accuracy})

    return step


def train_scorer(*, seed: int = 0, num_steps: int = 1500, workdir: str | Path | None = None,
                 batch_size: int = 64, num_scenes: int = 4000, learning_rate: float = 3e-3,
                 eval_per_size: int = 240, config: ScorerConfig = ScorerConfig(),
                 progress: bool = True) -> tuple[Scorer, dict]:
    """Trains the scorer on training-style renders and measures it on held-out-style renders.

    Args:
      seed: parameters, the training scenes (``world.scene(seed, i)``), batches; evaluation uses other seeds.
      num_steps: AdamW steps (warm-up, cosine decay).
      workdir: checkpoints in ``workdir/checkpoints`` (resumed from the newest); ``None``: none.
      batch_size: crops per step, drawn from the pool of ``num_scenes`` scenes (two crops per person).
      learning_rate: peak learning rate.
      eval_per_size: held-out-style scenes per box size of ``BOX_FRACTIONS`` (0: no evaluation).
      config: the CNN's sizes.
      progress: show a tqdm bar.

    Returns:
      ``(scorer, metrics)``; metrics (also ``scorer.metrics``): ``steps``, ``seconds``, ``train_accuracy`` (last
      50 steps), and from ``evaluate``.
    """
    start = time.time()
    ink, labels, residual = training_crops(seed, num_scenes)
    model = GlyphNet(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    warmup = min(100, max(1, num_steps // 10))
    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup,
                                                               max(num_steps, warmup + 1)), weight_decay=1e-4)
    params = nnx.to_pure_dict(params)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    def batch(step: int):
        index = np.random.default_rng([seed, step]).integers(0, len(labels), batch_size)
        return ink[index], labels[index], residual[index]

    state, history = checkpointed_loop(_make_step(graphdef, optimizer), state, batch, num_steps=num_steps,
                                       workdir=workdir, desc="scorer", progress=progress)
    trained = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(trained, state["params"])
    nnx.update(model, trained)
    scorer = Scorer(model, config)
    tail = history[-50:]
    metrics = {"steps": num_steps, "seconds": time.time() - start,
               "train_accuracy": float(np.mean([h["accuracy"] for h in tail])) if tail else None}
    if eval_per_size:
        start = time.time()
        metrics.update(evaluate(scorer, seed=seed + 1, per_size=eval_per_size), eval_seconds=time.time() - start)
    scorer.metrics = metrics
    return scorer, metrics


def evaluate(scorer: Scorer, *, seed: int = 1, per_size: int = 240, styles=world.HELDOUT_STYLES) -> dict:
    """The scorer on renders of ``styles``: per box size of ``BOX_FRACTIONS``, ``per_size`` one-person scenes
    (identities in turn), scored with ``score_image`` on the exact request, and again with the requested
    rotation off by up to +-``ROTATION_JITTER`` (is the error recovered?).

    Returns:
      ``{"heldout_accuracy_by_size": {"1/2": accuracy, ...}, "min_heldout_accuracy", "heldout": {"1/2":
      {"accuracy", "median_iou", "median_rotation_error_deg", "background_accuracy", "jittered_accuracy",
      "median_residual_error_deg"}, ...}}``; ``median_rotation_error_deg`` is the estimated error of an exact
      request (ideally 0), ``median_residual_error_deg`` how far the estimate is from a known error.
    """
    rng = np.random.default_rng([seed, 11])
    by_size = {}
    for fraction in BOX_FRACTIONS:
        rows, jittered, residual_errors = [], [], []
        for i in range(per_size):
            scene = sized_scene(rng, world.IDENTITIES[i % len(world.IDENTITIES)], fraction, styles=styles)
            rows.append(score_image(scorer, scene.image, scene.spec))
            person = scene.spec.persons[0]
            error = rng.uniform(-ROTATION_JITTER, ROTATION_JITTER)
            off = dataclasses.replace(scene.spec, persons=(dataclasses.replace(
                person, rotation_deg=person.rotation_deg - error),))
            row = score_image(scorer, scene.image, off)["persons"][0]
            jittered.append(row["correct"])
            residual_errors.append(abs(_wrap(row["residual_deg"] - error)))
        persons = [r["persons"][0] for r in rows]
        by_size[f"1/{round(1 / fraction)}"] = {
            "accuracy": float(np.mean([p["correct"] for p in persons])),
            "median_iou": float(np.median([p["iou"] for p in persons])),
            "median_rotation_error_deg": float(np.median([p["rotation_error_deg"] for p in persons])),
            "background_accuracy": float(np.mean([r["background_correct"] for r in rows])),
            "jittered_accuracy": float(np.mean(jittered)),
            "median_residual_error_deg": float(np.median(residual_errors))}
    accuracy = {size: v["accuracy"] for size, v in by_size.items()}
    return {"heldout_accuracy_by_size": accuracy, "min_heldout_accuracy": min(accuracy.values()), "heldout": by_size}


def _wrap(degrees: float) -> float:
    return (degrees + 180.0) % 360.0 - 180.0


# ---------------------------------------------------------------------------------------------------- scoring


def score_image(scorer: Scorer, image: np.ndarray, request: ImageRequest) -> dict:
    """Scores one image against its request.

    Args:
      scorer: a trained ``Scorer``.
      image: (H, W, 3) uint8 RGB.
      request: ``background`` name and ``persons`` (``identity``, ``box`` in ``image``'s pixels, ``rotation_deg``);
        a ``world.SceneSpec`` or a ``manifest.Record``.

    Returns:
      ``{"background": predicted name, "background_correct": bool, "persons": [{"identity", "predicted",
      "confidence", "correct", "iou", "residual_deg", "rotation_error_deg", "box_fraction"}, ...]}`` in the
      request's order; ``residual_deg`` is the glyph's estimated rotation minus the requested one,
      ``rotation_error_deg`` its absolute value, ``box_fraction`` the box edge over the image edge.
      Two persons add ``"both_correct"`` and ``"swapped"`` (each box shows the other person's identity).

    Raises:
      ValueError: the image is not (H, W, 3).
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    background = border_colour(image)
    persons = list(request.persons)
    rows = []
    if persons:
        ink = np.stack([scorer_input(image, p.box, p.rotation_deg, background) for p in persons])
        probs, residual = scorer.predict(ink)
        for p, prob, res in zip(persons, probs, residual):
            predicted = scorer.config.identities[int(prob.argmax())]
            edge = max(p.box[2] - p.box[0], p.box[3] - p.box[1])
            rows.append({"identity": p.identity, "predicted": predicted, "confidence": float(prob.max()),
                         "correct": predicted == p.identity, "iou": ink_box_iou(image, p.box, background),
                         "residual_deg": float(res), "rotation_error_deg": abs(float(res)),
                         "box_fraction": float(edge / max(image.shape[:2]))})
    name = nearest_background(background)
    result = {"background": name, "background_correct": name == request.background, "persons": rows}
    if len(rows) == 2:
        result["both_correct"] = rows[0]["correct"] and rows[1]["correct"]
        result["swapped"] = (rows[0]["predicted"] == rows[1]["identity"]
                             and rows[1]["predicted"] == rows[0]["identity"])
    return result
