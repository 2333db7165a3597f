"""Errors raised by host-side face analysis; each names the offending file when there is one."""
from __future__ import annotations


class FaceError(ValueError):
    """Base class: an input that face analysis cannot use."""


class ImageReadError(FaceError):
    """The file is missing, not an image, or corrupt."""

    def __init__(self, path: object, reason: str):
        self.path = path
        super().__init__(f"cannot read image {path}: {reason}")


class NoFaceError(FaceError):
    """No face was found in the image."""

    def __init__(self, source: object = "<array>"):
        self.source = source
        super().__init__(f"no face found in {source}")


class NoSubjectError(NoFaceError):
    """No subject stands out of a plain background (``plain_background.PlainBackgroundAnalyzer``)."""

    def __init__(self, source: object, min_pixels: int, threshold: float):
        self.source = source
        FaceError.__init__(self, f"no subject found in {source}: fewer than {min_pixels} pixels differ from the "
                                 f"border colour by {threshold:.0f}")


class FaceTooSmallError(FaceError):
    """Every face found is smaller than the analyser's minimum size."""

    def __init__(self, source: object, size: float, min_size: float):
        self.source, self.size, self.min_size = source, size, min_size
        super().__init__(
            f"face in {source} is {size:.0f} px on its longer side, below the minimum of "
            f"{min_size:.0f} px"
        )
