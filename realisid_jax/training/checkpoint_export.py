"""Trained branches out of a training checkpoint: ``realisid export --workdir DIR --out FOLDER``.

The checkpoint's ``meta`` item holds the run's config, so nothing else is needed: the train state is
restored onto the host CPU (parameters and both AdamW moments: 3x the branches' size, ~31 GB for SDXL), the
parameters go into a ``RealisID`` module, and ``weights.export.export_branches`` writes the diffusers
folders that ``realisid sample --branches`` reads.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import ml_collections
from flax import nnx
from jax.sharding import SingleDeviceSharding

from realisid_jax.realisid.branches import RealisID
from realisid_jax.realisid.components import abstract_branches
from realisid_jax.training.checkpoint import CheckpointError, TrainCheckpointer
from realisid_jax.training.optimizer import make_optimizer
from realisid_jax.training.state import initial_train_state
from realisid_jax.loading.branch_folders import export_branches


def restore_branches(workdir: str | os.PathLike, step: int | None = None) -> tuple[RealisID, int]:
    """The ``RealisID`` module (both ControlNets, the ID projection) of checkpoint ``step`` of the run in
    ``workdir``, on the host CPU; returns ``(module, step)``. Without ``step``: the newest finished checkpoint that
    restores, as ``realisid train`` resumes (each newer one skipped is named on stderr in one line).

    Raises:
      FileNotFoundError: no finished checkpoint (or not ``step``) under ``workdir/checkpoints``.
      CheckpointError: ``step`` (or every finished checkpoint) does not restore.
    """
    with TrainCheckpointer(Path(workdir) / "checkpoints", read_only=True) as ckpt:
        steps = ckpt.all_steps()
        if not steps or (step is not None and step not in steps):
            wanted = "" if step is None else f" {step}"
            raise FileNotFoundError(f"no finished checkpoint{wanted} under {ckpt.directory} "
                                    f"(finished: {steps or 'none'})")
        config = _run_config(ckpt, steps if step is None else [step])
        graphdef, params, rest = nnx.split(abstract_branches(config), nnx.Param, ...)
        optimizer, _ = make_optimizer(config.train)
        host = SingleDeviceSharding(jax.devices("cpu")[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host),
                              jax.eval_shape(lambda p: initial_train_state(optimizer, p, 0), params.to_pure_dict()))
        state, step = ckpt.restore(target, None, step)
    params.replace_by_pure_dict(state["params"])
    return nnx.merge(graphdef, params, rest), step


def _run_config(ckpt: TrainCheckpointer, steps: list[int]) -> ml_collections.ConfigDict:
    """The config in the ``meta`` item of the newest of ``steps`` that reads. One config serves every step of a
    run: each resume restored the older state into the model's shapes."""
    for newer in reversed(steps[1:]):
        try:
            return ml_collections.ConfigDict(ckpt.meta(newer)["config"])
        except CheckpointError as err:
            print(f"warning: {err}; reading the run's config from an older step", file=sys.stderr, flush=True)
    return ml_collections.ConfigDict(ckpt.meta(steps[0])["config"])


def export_checkpoint(workdir: str | os.PathLike, out: str | os.PathLike, step: int | None = None) -> int:
    """Writes checkpoint ``step``'s branches to ``out`` (``local_branch/``, ``global_branch/``,
    ``id_projection/``, ``realisid.json``); returns the step exported. Raises as ``restore_branches``."""
    realisid, step = restore_branches(workdir, step)
    export_branches(realisid, out)
    return step
