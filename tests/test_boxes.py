"""The box rule: a user box becomes the square of its longer edge around its centre, moved inside the image; a box
wholly outside the image is refused."""

import types

import numpy as np
import pytest

from realisid_jax.cli import main
from realisid_jax.realisid.conditions import BoxError, PersonConditions, check_box, conditioning_sheet


def _used(box, height=512, width=768):
    return check_box(box, height, width) * np.array([width, height, width, height])


def test_non_square_box_becomes_square_around_its_centre():
    np.testing.assert_allclose(_used((100, 80, 200, 230)), [75, 80, 225, 230], atol=1e-3)  # 1.5x tall
    np.testing.assert_allclose(_used((300, 200, 500, 260)), [300, 130, 500, 330], atol=1e-3)  # wide
    np.testing.assert_allclose(_used((10.5, 20.25, 74.5, 84.25)), [10.5, 20.25, 74.5, 84.25], atol=1e-3)


@pytest.mark.parametrize("box, expected", [
    ((-5, 0, 64, 64), (0, 0, 69, 69)),            # past the left edge
    ((700, 400, 800, 450), (668, 375, 768, 475)),  # past the right edge
    ((600, 300, 780, 530), (538, 282, 768, 512)),  # square of 230 pushed back from the right and bottom
    ((-99, -60, 1, 40), (0, 0, 100, 100)),         # overlapping by a sliver: moved to the nearest corner
])
def test_box_is_moved_inside_the_image(box, expected):
    used = _used(box)
    np.testing.assert_allclose(used, expected, atol=1e-3)
    assert used[0] >= 0 and used[1] >= 0 and used[2] <= 768 + 1e-3 and used[3] <= 512 + 1e-3


@pytest.mark.parametrize("box, message", [
    ((0, 0, 64, 600), "longer edge \\(600 px\\).*768x512"),
    ((0, 0, 513, 100), "longer edge \\(513 px\\)"),
    ((10, 10, 10, 40), "empty"),
    ((1, 2, 3), "4 numbers"),
    ((-900, -900, -800, -850), "box -900,-900,-800,-850 lies wholly outside the 768x512 image"),
    ((768, 100, 800, 132), "wholly outside"),  # touching the right edge: no pixel of the image
    ((100, -40, 140, 0), "wholly outside"),
])
def test_box_that_cannot_fit_is_refused(box, message):
    with pytest.raises(BoxError, match=message):
        check_box(box, 512, 768)


def test_box_as_large_as_the_shorter_side_is_accepted():
    np.testing.assert_allclose(_used((200, 0, 300, 512)), [0, 0, 512, 512], atol=1e-3)


def test_sheet_shows_the_box_used():
    boxes = np.zeros((2, 4), np.float32)
    boxes[0] = check_box((100, 80, 200, 230), 256, 256)
    reference = types.SimpleNamespace(crop=np.zeros((32, 32, 3), np.uint8))
    conditions = PersonConditions(np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 16, 16, 3), np.float32), boxes,
                                  np.array([True, False]), (reference,))
    sheet = np.asarray(conditioning_sheet(conditions, 256, 256, thumb=128))
    mask = sheet[:, 256:384]
    white = np.argwhere(np.all(mask == 255, axis=-1))
    # 150 px square at (75, 80) scaled by 128 / 256, its outline in lime around the white fill.
    np.testing.assert_allclose([white[:, 1].min(), white[:, 0].min(), white[:, 1].max(), white[:, 0].max()],
                               [38, 41, 112, 114], atol=1.5)
    text = mask[116:].astype(int)
    assert ((text[..., 1] > 100) & (text[..., 0] < 50)).any()  # the pixel coordinates, in lime under the mask


def test_sample_help_states_the_box_rule(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "square" in text and "inside the image" in text
