"""The glyph world: deterministic per seed; boxes, keypoints and masks agree with the rendered pixels; its
training set goes through the project's dataset format and input pipeline."""

import math

import numpy as np
import pytest

from realisid_jax.glyphs import world


def test_world_has_the_sizes_the_experiment_needs():
    assert len(world.IDENTITIES) >= 24 and len(set(world.IDENTITIES)) == len(world.IDENTITIES)
    assert len(world.STYLES) >= 16 and len(world.BACKGROUNDS) >= 8
    assert set(world.TRAIN_STYLES).isdisjoint(world.HELDOUT_STYLES)
    assert set(world.TRAIN_STYLES) | set(world.HELDOUT_STYLES) == set(world.STYLES)
    assert all(world.inks_for(name) for name in world.BACKGROUNDS)


@pytest.mark.parametrize("style", sorted(world.STYLES))
def test_every_identity_renders_distinctly_in_every_style(style):
    masks = [world.glyph_alpha(i, style, 0, 32, 0.0) > 0.5 for i in world.IDENTITIES]
    assert all(m.sum() > 20 for m in masks)
    flat = np.stack([m.ravel() for m in masks]).astype(np.float32)
    # No two classes render to (nearly) the same pixels: Hamming distance of at least 4% of the box
    # (the closest pair, E and F in STIX italic, differs by its bottom bar: 5%).
    distance = np.abs(flat[:, None] - flat[None]).sum(-1) + np.eye(len(masks)) * 1e9
    assert distance.min() >= 0.04 * 32 * 32


def test_scenes_are_deterministic_per_seed():
    a, b, c = world.scene(3, 7), world.scene(3, 7), world.scene(4, 7)
    assert a.spec == b.spec and np.array_equal(a.image, b.image)
    assert a.spec != c.spec


@pytest.mark.parametrize("index", range(12))
def test_boxes_masks_and_keypoints_agree_with_pixels(index):
    scene = world.scene(0, index, num_persons=1 + index % 2)
    spec, size = scene.spec, scene.spec.size
    assert spec.background in scene.caption
    background = np.asarray(world.BACKGROUNDS[spec.background])
    boxes = [p.box for p in spec.persons + spec.distractors]
    covered = np.zeros((size, size), bool)
    for x0, y0, x1, y1 in boxes:
        covered[int(y0):int(math.ceil(y1)), int(x0):int(math.ceil(x1))] = True
    assert np.all(scene.image[~covered] == background)  # nothing drawn outside the boxes
    for person, mask, keypoints in zip(spec.persons, scene.masks, scene.keypoints):
        x0, y0, x1, y1 = person.box
        assert x1 - x0 == y1 - y0 and 0.1 * size - 1 <= x1 - x0 <= 0.5 * size + 1
        assert -40 <= person.rotation_deg <= 40
        rows, cols = np.nonzero(mask)
        assert rows.size and x0 <= cols.min() and cols.max() < x1 and y0 <= rows.min() and rows.max() < y1
        # Ink pixels carry the ink colour (up to anti-aliasing at the mask's 0.5 threshold).
        ink = np.asarray(world.INKS[person.ink], np.float32)
        assert np.median(np.abs(scene.image[mask] - ink)) < 40
        # The corners of the rotated square touch the box's four sides; the centre is the box's centre.
        corners = keypoints[:4]
        np.testing.assert_allclose(corners.min(0), [x0, y0], atol=1e-3)
        np.testing.assert_allclose(corners.max(0), [x1, y1], atol=1e-3)
        np.testing.assert_allclose(keypoints[5], [(x0 + x1) / 2, (y0 + y1) / 2], atol=1e-3)
        # The up point is rotated counter-clockwise by rotation_deg from straight up (y points down).
        up = keypoints[4] - keypoints[5]
        np.testing.assert_allclose(math.degrees(math.atan2(-up[0], -up[1])), person.rotation_deg, atol=1e-3)
    if len(spec.persons) == 2:
        (a, b) = (p.box for p in spec.persons)
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_rotation_turns_the_ink_as_pillow_does():
    """A glyph rendered at +30° is the upright glyph turned counter-clockwise: its ink centroid's top part leans
    left (y down: a point above the centre moves to negative x)."""
    upright = world.glyph_alpha("T", "dejavu-sans-bold", 0, 96, 0.0)
    turned = world.glyph_alpha("T", "dejavu-sans-bold", 0, 96, 30.0)
    top = lambda a: np.argwhere(a[:40] > 0.5).mean(0)  # noqa: E731 - the bar of the T
    assert top(turned)[1] < top(upright)[1] - 5


def test_references_are_the_identity_in_other_styles():
    ref = world.reference(0, 1, "K", styles=world.HELDOUT_STYLES)
    assert ref.identity == "K" and ref.style in world.HELDOUT_STYLES and ref.image.shape == (64, 64, 3)
    assert ref.mask.any() and np.array_equal(ref.crop, ref.image)  # the square on its own background
    other = world.reference(0, 2, "K", styles=world.HELDOUT_STYLES)
    assert not np.array_equal(ref.image, other.image)


def test_keypoint_image_uses_the_landmark_drawing_path():
    image = world.draw_keypoints(world.glyph_keypoints(20.0), 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    red = image[..., 0].astype(int) - image[..., 1] > 100  # the up line's colour (face.draw.SQUARE_COLORS)
    assert red.any() and (image.sum(-1) > 0).mean() < 0.3
    assert not np.array_equal(image, world.draw_keypoints(world.glyph_keypoints(-20.0), 64))


def test_world_dataset_goes_through_the_input_pipeline(tmp_path):
    from realisid_jax.data.input_pipeline import make_train_iterator
    from realisid_jax.glyphs import dataset

    dataset.write_world_dataset(tmp_path, seed=5, count=8, progress=False)
    batch = next(make_train_iterator(tmp_path, batch_size=8, seed=0, shard_index=0, shard_count=1,
                                     read_threads=1))
    assert batch["landmarks"].shape == (8, 6, 2) and batch["reference"].shape == (8, 64, 64, 3)
    assert batch["pixel_values"].shape == (8, 256, 256, 3)
    assert all(any(f" {name} background" in t for name in world.BACKGROUNDS) for t in batch["input_text"])
    # In the box frame the keypoints' corners span the unit square (the box is the rotated square's bounds).
    np.testing.assert_allclose(batch["landmarks"][:, :4].min(1), 0.0, atol=1e-4)
    np.testing.assert_allclose(batch["landmarks"][:, :4].max(1), 1.0, atol=1e-4)
