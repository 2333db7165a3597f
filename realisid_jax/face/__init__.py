"""Faces, host side (NumPy / OpenCV / LiteRT): what the method needs to know about a photo's people.

One concept per module:
  image       ``load_image``: any photo file/array -> uint8 RGB (the project's one loader)
  errors      ``ImageReadError``, ``NoFaceError``, ``FaceTooSmallError``
  detect      ``Detector`` protocol; BlazeFace (MediaPipe) and Haar (OpenCV) backends
  landmarks   ``Landmarker`` protocol; MediaPipe Face Mesh (468 points)
  parsing     ``FaceParser`` protocol; landmark face-oval mask (offline BiSeNet stand-in)
  mesh        face-mesh topology (contours, named indices)
  analysis    ``FaceAnalyzer`` -> ``Face``
  preprocess  ``preprocess_reference`` -> ``ReferenceFace`` (square masked CLIP crop)
  draw        ``draw_landmark_image`` (c_pe), ``annotate``

The jitted face-box operations of the method (crop, relocation R, location mask) are ``realisid.ops``.
"""
