"""The glyph world's training loops, with orbax checkpoints and exact resume (``training.checkpoint``).

``fit`` runs a step function through the project's step loop (``training.loop.run``: NaN check, SIGTERM
checkpoint, progress log); ``checkpointed_loop`` is the bare loop that keeps every step's statistics (accuracies as
well as the loss) for the classifiers. Both take ``batch(step)``, a pure function of the step, so that a resumed
run draws the batches an uninterrupted one would.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm import tqdm

from realisid_jax.training import loop
from realisid_jax.training.checkpoint import TrainCheckpointer
from realisid_jax.training.summary import ProgressLog, truncate_metrics


class Interrupted(RuntimeError):
    """A training stopped by SIGTERM before its last step (checkpointed): not a finished model."""


class _Silent:
    """``ProgressLog``'s interface with no output (``progress=False``)."""

    def update(self, step, metrics, lr) -> None:
        del step, metrics, lr

    def message(self, text) -> None:
        del text

    def close(self) -> None:
        pass


def fit(step_fn: Callable, state: dict, batch: Callable[[int], jax.Array], *, num_steps: int,
        workdir: str | Path, checkpoint_every: int, learning_rate: optax.Schedule, meta: dict,
        progress: bool) -> tuple[dict, dict]:
    """Runs ``step_fn`` to ``num_steps`` completed steps with the project's step loop (``training.loop.run``:
    NaN check, SIGTERM checkpoint), resuming from the newest checkpoint in ``workdir/checkpoints``.

    Args:
      state: the initial train state ``{"step", "params", "opt_state", "rng"}`` (its structure is also the
        restore target).
      batch: step index (0-based) -> device batch; a pure function, so a resumed run sees the same batches.
      meta: JSON-able, stored with each checkpoint.

    Returns:
      ``(state, metrics)``; metrics: ``losses`` of the steps run by this call, ``start_step``, ``seconds``.

    Raises:
      Interrupted: SIGTERM stopped the loop early (after its checkpoint), so no caller takes the state as trained.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with TrainCheckpointer(workdir / "checkpoints", max_to_keep=2) as checkpointer:
        start = 0
        if checkpointer.latest_step() is not None:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
            state, start = checkpointer.restore(abstract, None)
        truncate_metrics(workdir / "metrics.jsonl", start)
        log = (ProgressLog(workdir / "logs", start_step=start, num_steps=num_steps, log_every=10,
                           metrics_file=workdir / "metrics.jsonl") if progress else _Silent())
        batches: Iterator = (batch(s) for s in itertools.count(start))
        began = time.perf_counter()
        try:
            result = loop.run(step_fn, state, batches, start_step=start, num_steps=num_steps,
                              checkpointer=checkpointer, data_iterator=None, checkpoint_every=checkpoint_every,
                              log=log, learning_rate=learning_rate, meta=meta)
        finally:
            log.close()
    if result.preempted:
        raise Interrupted(f"training stopped by SIGTERM at step {result.step} of {num_steps}; its checkpoint is in "
                          f"{workdir / 'checkpoints'}: run again to resume")
    return result.state, {"losses": result.losses, "start_step": start, "seconds": time.perf_counter() - began}


def init_state(params: nnx.State, optimizer: optax.GradientTransformation, seed: int) -> dict:
    """``{"step": 0, "params", "opt_state", "rng"}`` for :func:`fit`."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
            "rng": jax.random.key_data(jax.random.key(seed))}


def _abstract(tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


def checkpointed_loop(step_fn: Callable, state: dict, batch: Callable[[int], tuple], *, num_steps: int,
                      workdir: str | Path | None, desc: str, progress: bool = True,
                      checkpoint_every: int = 200) -> tuple[dict, list[dict]]:
    """Runs ``state, stats = step_fn(state, *batch(step))`` for the steps ``state["step"]`` .. ``num_steps - 1``.

    ``batch(step)`` must depend on the step alone (e.g. an RNG seeded by it), so that a resumed run draws the
    batches an uninterrupted one would. With a ``workdir``, the newest checkpoint of ``workdir/checkpoints`` (orbax,
    ``training.checkpoint.TrainCheckpointer``, the newest kept) is restored first, and ``state`` is saved every
    ``checkpoint_every`` steps and at the end; a finished run returns at once.

    Returns:
      ``(state, history)``: the final state and each step's ``stats`` as floats (this call's steps only).
    """
    checkpointer = TrainCheckpointer(Path(workdir) / "checkpoints", max_to_keep=1) if workdir else None
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, _ = checkpointer.restore(_abstract(state), None)
    history = []
    for step in tqdm(range(int(state["step"]), num_steps), desc=desc, disable=not progress):
        state, stats = step_fn(state, *batch(step))
        history.append({k: float(v) for k, v in stats.items()})
        if checkpointer is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == num_steps):
            checkpointer.save(step + 1, state, None, {"step": step + 1, "desc": desc})
    if checkpointer is not None:
        checkpointer.wait()
        checkpointer.close()
    return state, history
