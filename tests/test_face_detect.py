"""Detector building blocks: box IoU, MediaPipe anchors, weighted NMS."""
import numpy as np

from realisid_jax.face.detect import _ssd_anchors, box_iou, weighted_nms


def test_box_iou():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]], np.float32)
    np.testing.assert_allclose(box_iou(a, b), [[1.0, 50 / 150, 0.0, 0.0]], atol=1e-6)


def test_blazeface_anchors():
    anchors = _ssd_anchors(128, (8, 16, 16, 16))
    assert anchors.shape == (896, 2)  # 16x16x2 + 8x8x6, the model's 896 outputs
    np.testing.assert_allclose(anchors[:3], [[1 / 32, 1 / 32]] * 2 + [[3 / 32, 1 / 32]])
    np.testing.assert_allclose(anchors[512:519], [[1 / 16, 1 / 16]] * 6 + [[3 / 16, 1 / 16]])


def test_weighted_nms_merges_clusters_by_score():
    boxes = np.array([[0, 0, 10, 10], [2, 0, 12, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.6, 0.9, 0.7], np.float32)
    kps = np.zeros((3, 6, 2), np.float32)
    kps[1] += 1
    out = weighted_nms(boxes, scores, kps, iou_threshold=0.3)
    assert [s for _, s, _ in out] == [np.float32(0.9).item(), np.float32(0.7).item()]
    np.testing.assert_allclose(out[0][0], [1.2, 0, 11.2, 10], atol=1e-5)  # 0.6/1.5 and 0.9/1.5
    np.testing.assert_allclose(out[0][2], 0.6, atol=1e-6)
    np.testing.assert_array_equal(out[1][0], boxes[2])
