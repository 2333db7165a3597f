"""Local model folders only: the project never contacts a model hub, and says so when given a hub id."""

from __future__ import annotations

import os
import re
from pathlib import Path

class HubIdError(FileNotFoundError):
    """A hub id such as ``stabilityai/stable-diffusion-xl-base-1.0`` was given where a local folder is needed."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_folder(path: str | os.PathLike) -> Path:
    """Returns ``path`` as an existing local folder.

    Raises:
      HubIdError: ``path`` does not exist and looks like ``owner/name`` (no model hub is reachable).
      FileNotFoundError: ``path`` does not exist.
      NotADirectoryError: ``path`` is a file.
    """
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise NotADirectoryError(f"{folder} is a file; a diffusers/transformers model folder is expected")
    if _HUB_ID.match(str(path)):
        raise HubIdError(
            f"{path!r} looks like a model-hub id, but realisid-jax loads local folders only (no hub access at "
            f"run time). Download it elsewhere (e.g. `huggingface-cli download {path} --local-dir DIR`) and "
            f"pass DIR.")
    raise FileNotFoundError(f"model folder {folder} does not exist")
