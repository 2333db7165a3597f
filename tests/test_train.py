"""The trainer on the tiny config at 64 px, 8 simulated CPU devices, on the small real face set.

In-process runs check learning, mesh independence, the frozen base and the NaN guard; ``realisid train``
subprocesses check SIGKILL + resume, SIGTERM and a half-written checkpoint. Those end-to-end tests build and
compile the whole tiny SDXL step several times (minutes each on 2 shared cores): marked ``slow``. Steps are
compiled without LLVM optimisation (``XLA_OPT``): compile time dominates these short runs.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from realisid_jax.config import load_config
from realisid_jax.data.input_pipeline import make_train_iterator
from realisid_jax.data.prepare import PrepareOptions, prepare_dataset
from realisid_jax.data.sample_data import write_sample_source
from realisid_jax.sharding import make_mesh
from realisid_jax.train import train
from realisid_jax.training.checkpoint import TrainCheckpointer
from realisid_jax.training.loop import NonFiniteLossError
from realisid_jax.training.objective import condition_dropout, face_weighted_loss

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.py"
RESOLUTION = 64
# Small enough for 2 shared CPU cores; every code path of the SDXL step is still there.
OVERRIDES = [f"train.resolution={RESOLUTION}", "train.batch_size=8", "train.log_every=1", "train.warmup_steps=2",
             "train.checkpoint_every=1000", "mesh.shape=(8,1,1)"]
# Makes learning visible within a few dozen steps of a random tiny model.
FAST_LR = "train.learning_rate=1e-3"
XLA_OPT = {"xla_backend_optimization_level": 0}


def config(*extra):
    return load_config(CONFIG, [*OVERRIDES, *extra])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """``prepare-data`` output of 12 real faces (scikit-image's astronaut + LFW) at the test resolution."""
    root = tmp_path_factory.mktemp("faces")
    write_sample_source(root / "src", 12)
    summary = prepare_dataset(root / "src", root / "data",
                              options=PrepareOptions(resolution=RESOLUTION, reference_size=224, min_face_px=8))
    assert summary["written"] >= 8, summary
    return root / "data"


def _metrics(workdir: Path) -> dict[int, float]:
    """step -> loss from ``metrics.jsonl`` (later lines win: a resumed run rewrites the steps after its start)."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


# ------------------------------------------------------------------------------------------- objective


def test_face_weighted_loss_matches_eq7():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3))
    mask = np.zeros((2, 4, 4, 1))
    mask[:, 1:3, 1:3] = 1.0
    loss, mse, face = face_weighted_loss(pred, target, mask, 0.5)
    err = pred - target
    np.testing.assert_allclose(mse, np.mean(err**2), rtol=1e-6)
    np.testing.assert_allclose(face, np.mean((err * mask) ** 2), rtol=1e-6)
    np.testing.assert_allclose(loss, np.mean(err**2) + 0.5 * np.mean((err * mask) ** 2), rtol=1e-6)


def test_condition_dropout_rates():
    no_id, no_text = condition_dropout(jax.random.PRNGKey(0), 200_000, 0.05, 0.05, 0.05)
    no_id, no_text = np.asarray(no_id), np.asarray(no_text)
    np.testing.assert_allclose([np.mean(no_id & ~no_text), np.mean(no_text & ~no_id), np.mean(no_id & no_text)],
                               [0.05] * 3, atol=3e-3)


# ------------------------------------------------------------------------------------------ in-process


@pytest.mark.slow
def test_loss_decreases_and_only_branches_change(dataset, tmp_path):
    cfg = config(FAST_LR, "train.num_steps=30")
    result = train(cfg, tmp_path, data_dir=dataset, compiler_options=XLA_OPT)
    losses = result.losses
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses

    # The frozen base is bit-identical to a fresh build with the same seed; the branches moved.
    fresh = train(config("train.num_steps=0"), tmp_path / "fresh", data_dir=dataset, compiler_options=XLA_OPT)
    frozen_after = jax.tree.leaves(result.setup.frozen_inputs[0])
    frozen_fresh = jax.tree.leaves(fresh.setup.frozen_inputs[0])
    assert len(frozen_after) == len(frozen_fresh) > 100
    for a, b in zip(frozen_after, frozen_fresh, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    trained, initial = jax.tree.leaves(result.state["params"]), jax.tree.leaves(fresh.state["params"])
    moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(trained, initial, strict=True)]
    assert np.mean(moved) > 0.9, f"only {np.mean(moved):.0%} of branch parameters changed"


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_meshes_match_single_device(dataset, tmp_path, shape, single_device_losses):
    cfg = config("train.num_steps=3", f"mesh.shape={shape}")
    losses = train(cfg, tmp_path, data_dir=dataset, compiler_options=XLA_OPT).losses
    np.testing.assert_allclose(losses, single_device_losses, rtol=2e-5, atol=1e-6)


@pytest.fixture(scope="module")
def single_device_losses(dataset, tmp_path_factory):
    cfg = config("train.num_steps=3")
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    return train(cfg, tmp_path_factory.mktemp("single"), data_dir=dataset, mesh=mesh, compiler_options=XLA_OPT).losses


class _PoisonAt:
    """The real input iterator, with NaN pixels in the batch of one step (1-based)."""

    def __init__(self, iterator, step):
        self._iterator, self._step, self._count = iterator, step, 0

    def __next__(self):
        batch = next(self._iterator)
        self._count += 1
        if self._count == self._step:
            batch = dict(batch, pixel_values=np.full_like(batch["pixel_values"], np.nan))
        return batch

    def get_state(self):
        return {"inner": self._iterator.get_state(), "count": self._count}

    def set_state(self, state):
        self._iterator.set_state(state["inner"])
        self._count = state["count"]


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(dataset, tmp_path):
    cfg = config("train.num_steps=6", "train.checkpoint_every=2")
    iterator = _PoisonAt(make_train_iterator(dataset, batch_size=8, seed=0, resolution=RESOLUTION), step=3)
    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*last good checkpoint is step 2"):
        train(cfg, tmp_path, data_iterator=iterator, compiler_options=XLA_OPT)
    with TrainCheckpointer(tmp_path / "checkpoints", max_to_keep=3) as ckpt:
        assert ckpt.all_steps() == [2]
        first = train(config("train.num_steps=2"), tmp_path / "reference", data_dir=dataset, compiler_options=XLA_OPT)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), first.state)
        restored, step = ckpt.restore(target, None)
    assert step == 2
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(first.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------- subprocesses

# `realisid train` through the real CLI entry point (registering the command if cli.py does not list it yet).
_CLI = ("import sys, realisid_jax.cli as c\n"
        "c.COMMANDS = c.COMMANDS + (() if 'train' in c.COMMANDS else ('train',))\n"
        "sys.exit(c.main())")


def _start(workdir: Path, dataset: Path, *overrides: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0")
    cmd = [sys.executable, "-c", _CLI, "train", "--config", str(CONFIG), "--workdir", str(workdir),
           "--data", str(dataset), *(f"--config.{o}" for o in [*OVERRIDES, *overrides])]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_resume_sigterm_and_partial_checkpoint(dataset, tmp_path):
    steps = 8
    reference = _metrics_of_uninterrupted(dataset, tmp_path / "reference", steps)
    work = tmp_path / "run"
    ckpts = work / "checkpoints"
    log = tmp_path / "log.txt"

    # 1. SIGKILL right after the checkpoint of step 2 is finalised.
    proc = _start(work, dataset, f"train.num_steps={steps}", "train.checkpoint_every=2", log=log)
    _wait_for(lambda: (ckpts / "2").is_dir(), proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # 2. A write killed midway: a temporary step folder with partial content, newer than every finished one.
    finished = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert finished >= 2
    partial = ckpts / f"{finished + 2}.orbax-checkpoint-tmp-1234567"
    (partial / "train").mkdir(parents=True, exist_ok=True)
    (partial / "train" / "garbage").write_bytes(b"\0" * 100)

    # 3. Resume: it starts after the last finished checkpoint and removes the partial one. SIGTERM after a
    # step: a checkpoint is written and the process exits 0.
    logged = len((work / "metrics.jsonl").read_text().splitlines())
    proc = _start(work, dataset, f"train.num_steps={steps}", "train.checkpoint_every=1000", log=log)
    _wait_for(lambda: len((work / "metrics.jsonl").read_text().splitlines()) > logged, proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert json.loads((work / "metrics.jsonl").read_text().splitlines()[logged])["step"] == finished + 1
    assert not partial.exists()
    with TrainCheckpointer(ckpts, max_to_keep=3) as ckpt:
        stopped = ckpt.latest_step()
    assert finished < stopped < steps
    assert "stopped by SIGTERM" in log.read_text()

    # 4. Resume to the end: every step's loss equals the uninterrupted run's.
    proc = _start(work, dataset, f"train.num_steps={steps}", log=log)
    assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    resumed = _metrics(work)
    assert sorted(resumed) == list(range(1, steps + 1))
    np.testing.assert_allclose([resumed[s] for s in range(1, steps + 1)], reference, rtol=1e-6, atol=0)


def _metrics_of_uninterrupted(dataset: Path, workdir: Path, steps: int) -> list[float]:
    return train(config(f"train.num_steps={steps}"), workdir, data_dir=dataset, compiler_options=XLA_OPT).losses
