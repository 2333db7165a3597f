"""How errors read in one line: the first line of a message, and whether an error means a full disk."""

from __future__ import annotations

import errno
import re

#: A full disk or a quota as OSError messages and TensorStore's read them (orbax and array_record wrap them in
#: ValueError / RuntimeError: ``RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']``).
DISK_FULL = re.compile(r"No space left on device|Disk quota exceeded|os_error_code='(28|122)'")


def first_line(error: BaseException | str) -> str:
    """The first line of ``str(error)``, stripped ("" for an empty message): orbax, TensorStore and reader errors
    run to dozens of lines ending in a JSON spec dump."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def one_line(error: BaseException) -> str:
    """An error as the one line the CLI prints after ``error:``: an OSError's reason and file (its ``str`` adds
    ``[Errno N]``), else the message's first line, else the error's type name."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return first_line(error) or type(error).__name__


def disk_full(error: BaseException | None) -> str | None:
    """``"No space left on device"`` / ``"Disk quota exceeded"`` when ``error`` or an error in its chain of causes
    (a worker process's error re-raised, a writer's error wrapped by orbax or TFDS) is one, else None."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error.strerror
        found = DISK_FULL.search(str(error))
        if found:
            return "Disk quota exceeded" if found.group(0) in ("Disk quota exceeded", "os_error_code='122'") \
                else "No space left on device"
        error = error.__cause__ or error.__context__
    return None
