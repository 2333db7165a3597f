"""Face detectors: the ``Detector`` protocol and two offline backends.

Coordinates follow one convention throughout ``realisid_jax.face``: continuous pixel coordinates
in the image frame, the image spanning ``[0, W] x [0, H]``, pixel (i, j) covering
``[j, j + 1) x [i, i + 1)``; boxes are ``(x0, y0, x1, y1)`` float32.

Backends:
  * ``BlazeFaceDetector``: MediaPipe BlazeFace short-range (``face_detection_short_range.tflite``,
    MediaPipe "Face Detection" model card) run with ``ai_edge_litert``; gives six keypoints used to
    orient the landmark crop. Run on the whole (padded) image and on overlapping tiles so that both
    frame-filling and small faces are found.
  * ``HaarCascadeDetector``: OpenCV's frontal-face Haar cascade (``cv2.data.haarcascades``), no
    keypoints.

The paper's MTCNN fits the same protocol once a user supplies its weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from typing import Protocol

import cv2
import numpy as np

from realisid_jax.face.image import warp_affine

# BlazeFace short-range decoding constants, from MediaPipe's
# face_detection_short_range.pbtxt (SsdAnchorsCalculator, TensorsToDetectionsCalculator).
_BLAZE_INPUT = 128
_BLAZE_STRIDES = (8, 16, 16, 16)
_BLAZE_NUM_KEYPOINTS = 6
_BLAZE_SCORE_CLIP = 100.0


@dataclasses.dataclass(frozen=True, eq=False)  # array fields: no elementwise ==
class Detection:
    """One detected face.

    Attributes:
      box: (4,) float32 ``(x0, y0, x1, y1)`` in image pixels.
      score: confidence in [0, 1].
      keypoints: (6, 2) float32 pixel ``(x, y)`` of the subject's right eye, left eye, nose tip,
        mouth centre, right ear tragion, left ear tragion (BlazeFace order), or None when the
        backend gives none.
    """

    box: np.ndarray
    score: float
    keypoints: np.ndarray | None = None


class Detector(Protocol):
    """Finds faces in an image."""

    def __call__(self, image: np.ndarray) -> list[Detection]:
        """``image``: uint8 (H, W, 3) RGB. Returns detections in any order (possibly none)."""
        ...


class BlazeFaceDetector:
    """MediaPipe BlazeFace short-range detector, on the whole image and on tiles.

    The model sees a 128x128 letterboxed view, and finds faces whose size is roughly 15–90 % of
    that view. Three views cover the sizes a photo can hold: the whole image padded by
    ``pad_fraction`` on each side (faces that fill or touch the frame), the whole image as is, and
    a grid of overlapping tiles of side ``max(H, W) / tile_divisions`` (small faces) when that side is
    at least ``min_tile_px``. Detections from all views are merged by weighted non-maximum
    suppression (MediaPipe's "WEIGHTED" algorithm).

    Args:
      model_path: the ``.tflite`` file; default ``realisid_jax.assets.face_detector_model()``.
      score_threshold: minimum sigmoid score, default 0.5 (MediaPipe's value).
      iou_threshold: IoU above which detections are merged, default 0.3 (MediaPipe's value).
      pad_fraction: padding of the first view, as a fraction of the longer image side.
      tile_divisions: the tile side is ``max(H, W) / tile_divisions``; tiles overlap by half.
      min_tile_px: smallest tile side (pixels) worth a tile pass; at the default, 128 (the model
        input), tiles are never enlarged, and images of 384 px and more get tiles.
      num_threads: interpreter threads.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, *, score_threshold: float = 0.5,
                 iou_threshold: float = 0.3, pad_fraction: float = 0.25, tile_divisions: int = 3,
                 min_tile_px: int = 128, num_threads: int = 1):
        if model_path is None:
            from realisid_jax.assets import face_detector_model
            model_path = face_detector_model()
        self._interp = tflite_interpreter(model_path, num_threads)
        self._input = self._interp.get_input_details()[0]["index"]
        outputs = {d["name"]: d["index"] for d in self._interp.get_output_details()}
        self._regressors, self._scores = outputs["regressors"], outputs["classificators"]
        self._anchors = _ssd_anchors(_BLAZE_INPUT, _BLAZE_STRIDES)
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold
        self.pad_fraction = pad_fraction
        self.tile_divisions = tile_divisions
        self.min_tile_px = min_tile_px

    def __call__(self, image: np.ndarray) -> list[Detection]:
        """``image``: uint8 (H, W, 3) RGB. Returns the merged detections, best score first."""
        h, w = image.shape[:2]
        per_view = [self._detect_view(image, *view) for view in self._views(h, w)]
        boxes, scores, keypoints = (np.concatenate(parts) for parts in zip(*per_view))
        return [
            Detection(b, float(s), k)
            for b, s, k in weighted_nms(boxes, scores, keypoints, self.iou_threshold)
        ]

    def _views(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        pad = round(self.pad_fraction * max(h, w))
        views = [(-pad, -pad, w + pad, h + pad), (0, 0, w, h)]
        side = math.ceil(max(h, w) / self.tile_divisions)
        if side >= self.min_tile_px:
            step = side // 2
            ys = range(0, max(h - side, 0) + step, step)
            xs = range(0, max(w - side, 0) + step, step)
            views += [(x, y, x + side, y + side) for y in ys for x in xs]
        return views

    def _detect_view(self, image: np.ndarray, x0: int, y0: int, x1: int, y1: int):
        """Runs the model on image[y0:y1, x0:x1] (zero outside the image), letterboxed to 128²."""
        scale = _BLAZE_INPUT / max(x1 - x0, y1 - y0)
        off_x = (_BLAZE_INPUT - (x1 - x0) * scale) / 2 - x0 * scale
        off_y = (_BLAZE_INPUT - (y1 - y0) * scale) / 2 - y0 * scale
        m = np.array([[scale, 0, off_x], [0, scale, off_y]])
        view = warp_affine(image, m, (_BLAZE_INPUT, _BLAZE_INPUT))
        boxes, scores, kps = self._run_model(view.astype(np.float32)[None] / 127.5 - 1.0)
        offset = np.array([off_x, off_y], np.float32)
        boxes = (boxes.reshape(-1, 2, 2) - offset) / scale
        return boxes.reshape(-1, 4), scores, (kps - offset) / scale

    def _run_model(self, x: np.ndarray):
        """(1, 128, 128, 3) input in [-1, 1] -> boxes (N, 4), scores (N,), keypoints (N, 6, 2) in
        input pixels, for anchors scoring at least ``score_threshold``; all float32."""
        self._interp.set_tensor(self._input, x)
        self._interp.invoke()
        raw = self._interp.get_tensor(self._regressors)[0]
        logits = self._interp.get_tensor(self._scores)[0, :, 0].astype(np.float64)
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits, -_BLAZE_SCORE_CLIP, _BLAZE_SCORE_CLIP)))
        keep = scores >= self.score_threshold
        raw, scores, anchors = raw[keep], scores[keep], self._anchors[keep] * _BLAZE_INPUT
        # Offsets are in input pixels relative to the anchor centre (unit-size anchors).
        centre, half = raw[:, 0:2] + anchors, raw[:, 2:4] / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        kps = raw[:, 4:4 + 2 * _BLAZE_NUM_KEYPOINTS].reshape(-1, _BLAZE_NUM_KEYPOINTS, 2)
        kps = kps + anchors[:, None, :]
        return boxes.astype(np.float32), scores.astype(np.float32), kps.astype(np.float32)


def tflite_interpreter(model_path: str | os.PathLike, num_threads: int):
    """An ``ai_edge_litert`` interpreter of ``model_path`` with its tensors allocated.

    Allocating is when LiteRT applies its XNNPACK delegate and, the first time in a process, prints "INFO:
    Created TensorFlow Lite XNNPACK delegate for CPU." to stderr; that line is not shown. A model that does not
    load still raises (LiteRT puts its own error text in the exception).
    """
    from ai_edge_litert.interpreter import Interpreter  # deferred: heavy, only the MediaPipe backends

    interpreter = Interpreter(model_path=str(model_path), num_threads=num_threads)
    with _native_stderr_discarded():
        interpreter.allocate_tensors()
    return interpreter


@contextlib.contextmanager
def _native_stderr_discarded():
    # LiteRT logs with fprintf(stderr) and has no setting for its level: file descriptor 2 itself goes to
    # /dev/null while the block runs.
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class HaarCascadeDetector:
    """OpenCV's ``haarcascade_frontalface_default.xml`` (Viola–Jones), multi-scale.

    Scores are not probabilities: the cascade's level weight is squashed to (0, 1) by a sigmoid so
    that detections can be ranked; ``min_neighbors`` is the real confidence control.

    Args:
      cascade: cascade file name in ``cv2.data.haarcascades`` or a path.
      min_neighbors: overlapping raw hits needed to keep a face (OpenCV's parameter).
      scale_factor: pyramid step.
      min_size_px: smallest face searched for, pixels.
    """

    def __init__(self, cascade: str = "haarcascade_frontalface_default.xml", *,
                 min_neighbors: int = 5, scale_factor: float = 1.1, min_size_px: int = 20):
        path = cascade if os.path.exists(cascade) else os.path.join(cv2.data.haarcascades, cascade)
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise FileNotFoundError(f"cannot load Haar cascade {path}")
        self.min_neighbors = min_neighbors
        self.scale_factor = scale_factor
        self.min_size_px = min_size_px

    def __call__(self, image: np.ndarray) -> list[Detection]:
        """``image``: uint8 (H, W, 3) RGB. Returns detections, best score first."""
        gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
        rects, _, weights = self._cascade.detectMultiScale3(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(self.min_size_px, self.min_size_px), outputRejectLevels=True)
        dets = [
            Detection(np.array([x, y, x + w, y + h], np.float32), float(1 / (1 + np.exp(-wt))))
            for (x, y, w, h), wt in zip(np.reshape(rects, (-1, 4)), np.ravel(weights))
        ]
        return sorted(dets, key=lambda d: -d.score)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a`` (N, 4) and ``b`` (M, 4), ``(x0, y0, x1, y1)``; returns (N, M) float32."""
    a, b = np.asarray(a, np.float32).reshape(-1, 4), np.asarray(b, np.float32).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, keypoints: np.ndarray,
                 iou_threshold: float) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """MediaPipe's weighted NMS: each cluster (IoU > threshold with its best member) is replaced
    by the score-weighted mean of its boxes and keypoints, keeping the best score.

    Args:
      boxes: (N, 4) float32; scores: (N,) float32; keypoints: (N, K, 2) float32.

    Returns:
      ``(box, score, keypoints)`` tuples, best score first.
    """
    order = np.argsort(-scores, kind="stable")
    boxes, scores, keypoints = boxes[order], scores[order], keypoints[order]
    remaining = np.ones(len(scores), bool)
    out = []
    for i in range(len(scores)):
        if not remaining[i]:
            continue
        cluster = remaining & (box_iou(boxes[i], boxes)[0] > iou_threshold)
        cluster[i] = True
        remaining &= ~cluster
        wts = scores[cluster] / scores[cluster].sum()
        out.append((
            np.tensordot(wts, boxes[cluster], 1).astype(np.float32),
            float(scores[i]),
            np.tensordot(wts, keypoints[cluster], 1).astype(np.float32),
        ))
    return out


def _ssd_anchors(input_size: int, strides: tuple[int, ...]) -> np.ndarray:
    """Anchor centres (N, 2) in [0, 1], MediaPipe SsdAnchorsCalculator order.

    With ``fixed_anchor_size`` and aspect ratio 1 every anchor is a unit box: only centres matter.
    Consecutive layers with the same stride share one feature map, two anchors per layer per cell.
    """
    anchors = []
    i = 0
    while i < len(strides):
        j = i
        while j < len(strides) and strides[j] == strides[i]:
            j += 1
        per_cell = 2 * (j - i)
        n = math.ceil(input_size / strides[i])
        ys, xs = np.meshgrid((np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n, indexing="ij")
        cells = np.stack([xs.ravel(), ys.ravel()], axis=1)
        anchors.append(np.repeat(cells, per_cell, axis=0))
        i = j
    return np.concatenate(anchors).astype(np.float32)
