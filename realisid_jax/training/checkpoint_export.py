"""Trained branches out of a training checkpoint: ``realisid export --workdir DIR --out FOLDER``.

The checkpoint's ``meta`` item holds the run's config, so nothing else is needed: the train state is
restored onto the host CPU (parameters and both AdamW moments: 3x the branches' size, ~31 GB for SDXL), the
parameters go into a ``RealisID`` module, and ``weights.export.export_branches`` writes the diffusers
folders that ``realisid sample --branches`` reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import ml_collections
from flax import nnx
from jax.sharding import SingleDeviceSharding

from realisid_jax.realisid.branches import RealisID
from realisid_jax.realisid.components import abstract_branches
from realisid_jax.training.checkpoint import TrainCheckpointer
from realisid_jax.training.optimizer import make_optimizer
from realisid_jax.training.state import initial_train_state
from realisid_jax.loading.branch_folders import export_branches


def restore_branches(workdir: str | os.PathLike, step: int | None = None) -> tuple[RealisID, int]:
    """The ``RealisID`` module (both ControlNets, the ID projection) of checkpoint ``step`` (default the newest
    finished one) of the run in ``workdir``, on the host CPU; returns ``(module, step)``.

    Raises:
      FileNotFoundError: no finished checkpoint (or not ``step``) under ``workdir/checkpoints``.
    """
    with TrainCheckpointer(Path(workdir) / "checkpoints", read_only=True) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in ckpt.all_steps():
            raise FileNotFoundError(f"no finished checkpoint {'' if step is None else step} under "
                                    f"{ckpt.directory} (finished: {ckpt.all_steps() or 'none'})")
        config = ml_collections.ConfigDict(ckpt.meta(step)["config"])
        graphdef, params, rest = nnx.split(abstract_branches(config), nnx.Param, ...)
        optimizer, _ = make_optimizer(config.train)
        host = SingleDeviceSharding(jax.devices("cpu")[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host),
                              jax.eval_shape(lambda p: initial_train_state(optimizer, p, 0), params.to_pure_dict()))
        state, _ = ckpt.restore(target, None, step)
    params.replace_by_pure_dict(state["params"])
    return nnx.merge(graphdef, params, rest), step


def export_checkpoint(workdir: str | os.PathLike, out: str | os.PathLike, step: int | None = None) -> int:
    """Writes checkpoint ``step``'s branches to ``out`` (``local_branch/``, ``global_branch/``,
    ``id_projection/``, ``realisid.json``); returns the step exported. Raises as ``restore_branches``."""
    realisid, step = restore_branches(workdir, step)
    export_branches(realisid, out)
    return step
