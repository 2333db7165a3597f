"""The step loop: run steps, log, checkpoint, stop cleanly on SIGTERM, refuse to continue on a NaN/inf loss."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from realisid_jax.training.checkpoint import StatefulIterator, TrainCheckpointer
from realisid_jax.training.preemption import PreemptionGuard
from realisid_jax.training.summary import ProgressLog

StepFn = Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]
# Called after each step with (completed steps, train state): e.g. sample images every N steps.
Hook = Callable[[int, Any], None]


class NonFiniteLossError(RuntimeError):
    """A step produced a NaN/inf loss or gradient norm; the state after it was not saved."""

    def __init__(self, step: int, metrics: dict[str, float], last_checkpoint: int | None, directory: str):
        self.step = step
        self.metrics = metrics
        self.last_checkpoint = last_checkpoint
        where = (f"the last good checkpoint is step {last_checkpoint} in {directory}" if last_checkpoint is not None
                 else "no checkpoint was written yet")
        shown = ", ".join(f"{k}={v}" for k, v in metrics.items())
        super().__init__(f"non-finite training metrics at step {step} ({shown}); stopped without saving this "
                         f"state; {where}")


@dataclasses.dataclass
class LoopResult:
    """``state`` after ``step`` completed steps; ``losses`` of the steps run here (in order);
    ``preempted``: stopped early by SIGTERM (a checkpoint of ``step`` was written)."""

    state: Any
    step: int
    losses: list[float]
    preempted: bool


def run(step_fn: StepFn, state: Any, batches: Iterator[Any], *, start_step: int, num_steps: int,
        checkpointer: TrainCheckpointer, data_iterator: StatefulIterator | None, checkpoint_every: int,
        log: ProgressLog, learning_rate: Callable[[int], float], meta: dict,
        hooks: Sequence[Hook] = ()) -> LoopResult:
    """Runs steps ``start_step + 1 .. num_steps`` (1-based counts of completed steps).

    Each step's metrics are fetched to the host before the next step starts: the NaN check needs them, a
    checkpoint must not be written from a state that produced a bad loss, and XLA:CPU with many simulated
    devices aborts when sharded steps queue up unawaited. A checkpoint is written every ``checkpoint_every``
    steps, at ``num_steps``, and when any process got SIGTERM (then the loop returns ``preempted=True``).

    Args:
      step_fn: ``(state, batch) -> (state, metrics)``; metrics hold scalar ``loss`` and ``grad_norm``. The
        incoming state may be donated.
      batches: device batches, drawn from ``data_iterator`` without look-ahead, so that the iterator's
        position saved with step ``s`` is exactly the batches consumed by steps ``1..s``.
      meta: JSON-able dict stored with each checkpoint (``step`` is added).

    Raises:
      NonFiniteLossError: a step's loss or gradient norm is NaN/inf; pending checkpoint writes are finished,
        the bad state is not saved.
    """
    losses: list[float] = []
    step = start_step
    with PreemptionGuard() as guard:
        try:
            while step < num_steps:
                state, metrics = step_fn(state, next(batches))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                step += 1
                if not all(math.isfinite(v) for v in metrics.values()):
                    checkpointer.wait()
                    raise NonFiniteLossError(step, metrics, checkpointer.latest_step(), str(checkpointer.directory))
                losses.append(metrics["loss"])
                log.update(step, metrics, float(learning_rate(step - 1)))
                for hook in hooks:
                    hook(step, state)
                stop = guard.requested()
                if stop or step % checkpoint_every == 0 or step == num_steps:
                    checkpointer.save(step, state, data_iterator, {**meta, "step": step})
                if stop:
                    log.message(f"stop requested (SIGTERM): checkpoint of step {step} written, exiting")
                    return LoopResult(state, step, losses, preempted=True)
        finally:
            checkpointer.wait()
    return LoopResult(state, step, losses, preempted=False)
