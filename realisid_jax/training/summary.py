"""Training progress: TensorBoard scalars (tensorboardX), a ``metrics.jsonl`` file and a tqdm bar, written by
process 0 only."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drops the rows of ``path`` (``metrics.jsonl``) after ``last_step``: a resumed run re-logs those steps, so
    the file keeps one row per step. Written to a temporary file and renamed (a kill leaves either version)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _step(line) is not None and _step(line) <= last_step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def _step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a row cut short by a kill
        return None


class ProgressLog:
    """Logs per-step metrics (host floats) every ``log_every`` steps and shows steps/s on a progress bar.

    Scalars under ``train/``: every metric given (``loss``, ``face_loss``, ``grad_norm``, ...), ``lr`` and
    ``steps_per_sec`` (averaged since the previous write, so it includes compilation on the first one). The
    same records, one JSON object per line with ``step``, are appended to ``metrics_file`` when given (local
    path; machine-readable, and it survives a resumed run).
    """

    def __init__(self, logdir: str | Path, *, start_step: int, num_steps: int, log_every: int,
                 metrics_file: Path | None = None):
        self._primary = jax.process_index() == 0
        self._log_every = max(1, int(log_every))
        self._writer = SummaryWriter(str(logdir)) if self._primary else None
        self._jsonl = open(metrics_file, "a") if self._primary and metrics_file is not None else None  # noqa: SIM115
        self._bar = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         disable=not self._primary)
        self._mark = (start_step, time.perf_counter())

    def update(self, step: int, metrics: dict[str, float], lr: float) -> None:
        """Records the metrics of the step that completed ``step`` steps (1-based)."""
        self._bar.update(1)
        if step % self._log_every:
            return
        now = time.perf_counter()
        rate = (step - self._mark[0]) / max(now - self._mark[1], 1e-9)
        self._mark = (step, now)
        self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}", steps_per_s=f"{rate:.2f}")
        if self._writer is not None:
            for name, value in metrics.items():
                self._writer.add_scalar(f"train/{name}", value, step)
            self._writer.add_scalar("train/lr", lr, step)
            self._writer.add_scalar("train/steps_per_sec", rate, step)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **metrics, "lr": lr, "steps_per_sec": rate}) + "\n")
            self._jsonl.flush()

    def message(self, text: str) -> None:
        if self._primary:
            self._bar.write(text)

    def close(self) -> None:
        self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()

    def __enter__(self) -> ProgressLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
