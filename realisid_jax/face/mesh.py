"""Topology of the MediaPipe 468-point face mesh: named landmark indices and contour polylines.

The contours are the edge sets of MediaPipe's ``face_mesh_connections.py`` (Apache-2.0,
``FACEMESH_FACE_OVAL``, ``FACEMESH_LIPS``, eyes, eyebrows, ``FACEMESH_NOSE``) chained into ordered
polylines; closed ones repeat their first index at the end. "Left"/"right" are the subject's: the
subject's right eye appears on the image's left.
"""
from __future__ import annotations

NUM_LANDMARKS = 468

FACE_OVAL = (10, 109, 67, 103, 54, 21, 162, 127, 234, 93, 132, 58, 172, 136, 150, 149, 176, 148,
             152, 377, 400, 378, 379, 365, 397, 288, 361, 323, 454, 356, 389, 251, 284, 332, 297,
             338, 10)
LIPS_OUTER = (0, 37, 39, 40, 185, 61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269,
              267, 0)
LIPS_INNER = (13, 82, 81, 80, 191, 78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311,
              312, 13)
RIGHT_EYE = (33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7, 33)
LEFT_EYE = (263, 466, 388, 387, 386, 385, 384, 398, 362, 382, 381, 380, 374, 373, 390, 249, 263)
RIGHT_EYEBROW = ((46, 53, 52, 65, 55), (70, 63, 105, 66, 107))
LEFT_EYEBROW = ((276, 283, 282, 295, 285), (300, 293, 334, 296, 336))
NOSE = ((168, 6, 197, 195, 5, 4, 1, 19, 94, 2),
        (98, 64, 48, 115, 220, 45, 4, 275, 440, 344, 278, 294, 327, 326, 2, 97, 98))

# Single points used for orientation and sanity checks.
RIGHT_EYE_OUTER = 33
LEFT_EYE_OUTER = 263
NOSE_TIP = 1
UPPER_LIP = 13
LOWER_LIP = 14
CHIN = 152
FOREHEAD = 10

# Named polylines in drawing order; draw.py gives each group a fixed colour.
CONTOURS: dict[str, tuple[tuple[int, ...], ...]] = {
    "face_oval": (FACE_OVAL,),
    "right_eyebrow": RIGHT_EYEBROW,
    "left_eyebrow": LEFT_EYEBROW,
    "right_eye": (RIGHT_EYE,),
    "left_eye": (LEFT_EYE,),
    "nose": NOSE,
    "lips": (LIPS_OUTER, LIPS_INNER),
}
