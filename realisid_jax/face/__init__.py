"""Faces: host-side analysis (NumPy/OpenCV/LiteRT) and jitted face ops (``face.ops``, JAX).

Host side, one concept per module:
  image       ``load_image``: any photo file/array -> uint8 RGB (the project's one loader)
  errors      ``ImageReadError``, ``NoFaceError``, ``FaceTooSmallError``
  detect      ``Detector`` protocol; BlazeFace (MediaPipe) and Haar (OpenCV) backends
  landmarks   ``Landmarker`` protocol; MediaPipe Face Mesh (468 points)
  parsing     ``FaceParser`` protocol; landmark face-oval mask (offline BiSeNet stand-in)
  mesh        face-mesh topology (contours, named indices)
  analysis    ``FaceAnalyzer`` -> ``Face``
  preprocess  ``preprocess_reference`` -> ``ReferenceFace`` (square masked CLIP crop)
  draw        ``draw_landmark_image`` (c_pe), ``annotate``

The names below are importable from ``realisid_jax.face`` directly; they load lazily so that
importing ``realisid_jax.face.ops`` does not pull in OpenCV or LiteRT.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_image": "image",
    "ImageReadError": "errors",
    "NoFaceError": "errors",
    "FaceTooSmallError": "errors",
    "FaceError": "errors",
    "Detection": "detect",
    "Detector": "detect",
    "Landmarker": "landmarks",
    "FaceParser": "parsing",
    "BlazeFaceDetector": "detect",
    "HaarCascadeDetector": "detect",
    "FaceMeshLandmarker": "landmarks",
    "LandmarkOvalParser": "parsing",
    "Face": "analysis",
    "FaceAnalyzer": "analysis",
    "ReferenceFace": "preprocess",
    "preprocess_reference": "preprocess",
    "draw_landmark_image": "draw",
    "annotate": "draw",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
