"""One training run per work directory: an OS advisory lock (``flock``) on ``<workdir>/.lock``.

The lock belongs to the open file, so the OS drops it when the holder exits in any way (SIGKILL, a crash, a
preempted VM): a stale ``.lock`` file left behind never blocks the next run. The file holds the holder's pid,
host and start time, for the message a second run prints.

Multi-host: only process 0 takes the lock, on its own view of the work directory (the other processes are
started by the same launcher and follow process 0). A ``gs://`` work directory is not locked (object stores
have no advisory locks).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another live run holds the work directory's lock (one-line message naming its pid and host)."""


class WorkdirLock:
    """Context manager holding the lock of ``workdir`` (created) for the duration of a run.

    Re-entrant within one process (``realisid train`` takes it before building the models, ``Trainer.fit``
    again around the loop), so an API caller and the CLI are protected alike.

    Raises:
      WorkdirLockedError: on enter, when another process holds it.
    """

    _held: dict[Path, int] = {}  # path -> nesting depth in this process
    _files: dict[Path, int] = {}

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.path = Path(workdir).absolute() / LOCK_FILE
        self.enabled = enabled and "://" not in str(workdir)

    def __enter__(self) -> WorkdirLock:
        if not self.enabled:
            return self
        if self.path in self._held:
            self._held[self.path] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise WorkdirLockedError(f"{self.path.parent} is in use by another training run ({holder}); wait for "
                                     "it to finish or stop it, or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._held[self.path], self._files[self.path] = 1, fd
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self._held[self.path] -= 1
        if self._held[self.path] == 0:
            del self._held[self.path]
            os.close(self._files.pop(self.path))  # closing the file releases the lock
