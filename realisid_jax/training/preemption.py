"""SIGTERM handling: Cloud TPU (and most schedulers) send SIGTERM before preempting a VM.

The handler only sets a flag; the step loop polls it between steps, writes a checkpoint and returns, so
no array is touched from inside a signal handler. On multi-host every process must take the same
decision at the same step (a checkpoint save is a collective), so the flags are OR-ed across processes.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionGuard:
    """Context manager that turns SIGTERM into a polled stop request.

    ``requested()`` is True once any process received SIGTERM (collective on multi-host: call it at the
    same point on every process). The previous handler is restored on exit. Outside the main thread
    (where signals cannot be handled) the guard is inert.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._signals = signals
        self._event = threading.Event()
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._event.set()

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def local(self) -> bool:
        """This process received a stop signal."""
        return self._event.is_set()

    def requested(self) -> bool:
        """Some process received a stop signal (an all-gather of one int on multi-host)."""
        if jax.process_count() == 1:
            return self.local()
        flags = multihost_utils.process_allgather(np.int32(self.local()))
        return bool(np.any(flags))
