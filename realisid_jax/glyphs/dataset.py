"""The glyph world's training set in the project's own dataset format (``data.builder``), read by the same
input pipeline (``data.input_pipeline``) as a prepared face dataset.

One example per scene; its subject is the scene's first person: ``face_box`` its square box, ``landmarks`` its
6 keypoints (pixels), ``face_mask`` its ink, ``reference`` another appearance of the same identity (a training
style, ink and rotation: ``world.Reference.crop``). Scenes hold 1 or 2 persons; the caption names the
background. Micro-conditioning: the scene is the whole "photo" (``original_size`` = resolution, crop at 0, 0).
With an ``InputEncoder`` the frozen encoders' outputs are stored too (``data.precomputed``), as
``prepare-data --precompute`` stores them for photos.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from realisid_jax.data import builder
from realisid_jax.glyphs import world

DATASET_KIND = "glyphs"


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def example(seed: int, index: int, *, size: int = 256, reference_size: int = 64,
            two_person_fraction: float = 0.3) -> dict:
    """Example ``index`` of the world's training set with ``seed`` (fields as ``data.builder`` describes)."""
    rng = np.random.default_rng([seed, index])
    spec = world.sample_scene_spec(rng, size=size, num_persons=2 if rng.random() < two_person_fraction else 1)
    scene = world.render_scene(spec)
    subject = spec.persons[0]
    ref = world.render_reference(rng, subject.identity, size=reference_size)
    return {
        "image": _png(scene.image),
        "caption": scene.caption,
        "face_box": np.asarray(subject.box, np.float32),
        "landmarks": scene.keypoints[0],
        "face_mask": _png(scene.masks[0].astype(np.uint8) * 255),
        "reference": _png(ref.crop),
        "source": f"glyphs/{seed}/{index}",
        "original_size": np.array([size, size], np.int32),
        "crops_coords_top_left": np.zeros(2, np.int32),
    }


def write_world_dataset(out: str | os.PathLike, *, seed: int, count: int, size: int = 256,
                        reference_size: int = 64, two_person_fraction: float = 0.3, encoder=None,
                        progress: bool = True) -> Path:
    """Writes ``count`` examples of the world (``example``) as the ``realisid_faces`` TFDS dataset under ``out``
    (PNG images, 6 keypoints per subject); returns the dataset folder. Deterministic in ``seed``.

    Args:
      encoder: a ``data.precompute.InputEncoder`` (the base's frozen encoders): also store each example's
        precomputed training inputs and the empty prompt's, for ``config.train.precomputed_inputs``.

    Raises:
      ValueError: ``count`` < 1.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")

    def examples():
        for i in tqdm(range(count), desc="glyph scenes", disable=not progress, leave=False):
            yield f"{i:08d}", example(seed, i, size=size, reference_size=reference_size,
                                      two_person_fraction=two_person_fraction)

    metadata = {"kind": DATASET_KIND, "seed": seed, "count": count, "two_person_fraction": two_person_fraction,
                "train_styles": list(world.TRAIN_STYLES)}
    stored, shapes = examples, None
    if encoder is not None:
        from realisid_jax.data.precompute import with_precomputed

        shapes = encoder.shapes(size, reference_size)
        spec = builder.features(size, reference_size, "png", num_landmarks=world.NUM_KEYPOINTS)
        metadata["precomputed"] = {"dtype": encoder.dtype.name, "fields": shapes, **encoder.provenance}

        def stored():
            return with_precomputed(examples(), encoder, spec)

    folder = builder.write_dataset(out, stored, resolution=size, reference_size=reference_size, image_format="png",
                                   metadata=metadata, num_landmarks=world.NUM_KEYPOINTS, precomputed=shapes,
                                   precomputed_dtype=encoder.dtype.name if encoder is not None else "float16")
    if encoder is not None:
        from realisid_jax.data.precomputed import write_empty_prompt

        write_empty_prompt(out, encoder.empty_prompt())
    return folder
