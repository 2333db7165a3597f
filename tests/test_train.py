"""The trainer on the tiny config at 64 px, 8 simulated CPU devices, on the small real face set.

Building and compiling the tiny SDXL step takes minutes on 2 cores, so one ``Trainer`` (mesh (8,1,1)) serves
most tests: learning, the frozen base, sample images, export, the NaN guard, SIGTERM and exact resume. A
``realisid train`` subprocess is killed with SIGKILL. The other meshes and the 2-process run build their own
(``slow``: ``make test-slow``).
Compiled programs are shared through the test session's persistent cache (``conftest.py``).
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from realisid_jax.cli import main as cli_main
from realisid_jax.config import load_config
from realisid_jax.data.input_pipeline import make_train_iterator
from realisid_jax.data.prepare import PrepareOptions, prepare_dataset
from realisid_jax.data.sample_data import write_sample_source
from realisid_jax.sharding import make_mesh
from realisid_jax.training.trainer import Trainer
from realisid_jax.training.checkpoint import TrainCheckpointer
from realisid_jax.training.loop import NonFiniteLossError
from realisid_jax.realisid.objective import condition_dropout, face_weighted_loss
from realisid_jax.realisid.components import load_branches
from test_memory_plan import MICRO

ROOT = Path(__file__).resolve().parents[1]
CONFIG = f"{ROOT / 'configs' / 'sdxl.py'}:tiny"
RESOLUTION = 64
# Small enough for 2 shared CPU cores; every code path of the SDXL step is still there (one layer where the tiny variant
# has two: half the compile time). The learning rate makes learning visible within a few dozen steps.
OVERRIDES = [f"train.resolution={RESOLUTION}", "train.batch_size=8", "train.log_every=1", "train.warmup_steps=2",
             "train.learning_rate=1e-3", "train.sample_every=0", "mesh.shape=(8,1,1)", *MICRO]


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
    assert summary["skipped"] == {"corrupt_image": 1, "no_face": 1}, summary
    return root / "data"


@pytest.fixture(scope="module")
def trainer():
    return Trainer(config())


def fit(trainer, workdir, *, steps, checkpoint_every=1000, sample_every=0, **kwargs):
    trainer.config.train.update(num_steps=steps, checkpoint_every=checkpoint_every, sample_every=sample_every)
    return trainer.fit(workdir, **kwargs)


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _metrics(workdir: Path) -> dict[int, float]:
    """step -> loss from ``metrics.jsonl``, which holds one row per step (a resume drops rows past its start)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in rows}) == len(rows), "a step logged twice"
    return {r["step"]: r["loss"] for r in rows}


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


def test_learns_only_branches_samples_and_exports(trainer, dataset, tmp_path):
    frozen_before = host(trainer.setup.frozen_inputs)
    initial = host(trainer.initial_state()["params"])
    trainer.config.sampling.update(height=128, width=128, num_inference_steps=2)
    result = fit(trainer, tmp_path, steps=20, checkpoint_every=10, sample_every=10, data_dir=dataset)

    losses = result.losses
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    # The frozen base is bit-identical after training; (almost) every branch tensor moved.
    frozen_after = jax.tree.leaves(host(trainer.setup.frozen_inputs))
    assert len(frozen_after) > 100
    for a, b in zip(frozen_after, jax.tree.leaves(frozen_before), strict=True):
        np.testing.assert_array_equal(a, b)
    trained = host(result.state["params"])
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(initial),
                                                      strict=True)]
    assert np.mean(moved) > 0.9, f"only {np.mean(moved):.0%} of branch parameters changed"

    samples = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert samples == ["step_00000010.png", "step_00000020.png"]
    assert Image.open(tmp_path / "samples" / samples[-1]).size == (128, 128)

    # `realisid export` of the last checkpoint loads back as the trained branches.
    assert cli_main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "branches")]) == 0
    exported = host(nnx.state(load_branches(tmp_path / "branches"), nnx.Param).to_pure_dict())
    assert jax.tree.structure(exported) == jax.tree.structure(trained)
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(a, b)
    assert cli_main(["export", "--workdir", str(tmp_path), "--out", str(tmp_path / "x"), "--step", "7"]) == 2


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


def test_nan_loss_stops_and_keeps_last_good_checkpoint(trainer, dataset, tmp_path):
    iterator = _PoisonAt(make_train_iterator(dataset, batch_size=8, seed=0, resolution=RESOLUTION), step=3)
    seen = {}
    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*last good checkpoint is step 2"):
        fit(trainer, tmp_path, steps=6, checkpoint_every=2, data_iterator=iterator,
            hooks=[lambda step, state: seen.setdefault(step, host(state))])
    assert sorted(seen) == [1, 2]
    with TrainCheckpointer(tmp_path / "checkpoints", max_to_keep=3) as ckpt:
        assert ckpt.all_steps() == [2]
        restored, step = ckpt.restore(trainer.abstract_state(), None)
    assert step == 2
    for a, b in zip(jax.tree.leaves(host(restored)), jax.tree.leaves(seen[2]), strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------- subprocesses


def _realisid(*args: str, devices: int = 8, extra_env: dict | None = None, log: Path) -> subprocess.Popen:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               **(extra_env or {}))
    return subprocess.Popen([sys.executable, "-m", "realisid_jax.cli", *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, cwd=ROOT)


def _train_cli(workdir: Path, dataset: Path, *overrides: str, **kwargs) -> subprocess.Popen:
    return _realisid("train", "--config", str(CONFIG), "--workdir", str(workdir), "--data", str(dataset),
                     *(f"--config.{o}" for o in [*OVERRIDES, *overrides]), **kwargs)


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 1800.0):
    """Waits for an event (``predicate`` true) or the process's exit; ``timeout`` only catches hangs."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


class _SigtermAfter:
    """Hook: sends this process SIGTERM once ``step`` is done (what a TPU preemption notice does)."""

    def __init__(self, step):
        self.step = step

    def __call__(self, step, state):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigkill_partial_checkpoint_sigterm_and_exact_resume(trainer, dataset, tmp_path, capsys):
    steps = 8
    reference = fit(trainer, tmp_path / "reference", steps=steps, data_dir=dataset).losses
    assert f"starting a new run in {tmp_path / 'reference'}\n" in capsys.readouterr().out
    work = tmp_path / "run"
    ckpts = work / "checkpoints"
    log = tmp_path / "log.txt"

    # 1. `realisid train`, SIGKILL right after the checkpoint of step 2 is finalised.
    proc = _train_cli(work, dataset, f"train.num_steps={steps}", "train.checkpoint_every=2", log=log)
    _wait_for(lambda: (ckpts / "2").is_dir(), proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # 2. A write killed midway: a temporary step folder with partial content, newer than every finished one.
    finished = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert finished >= 2
    partial = ckpts / f"{finished + 2}.orbax-checkpoint-tmp-1234567"
    (partial / "train").mkdir(parents=True, exist_ok=True)
    (partial / "train" / "garbage").write_bytes(b"\0" * 100)

    # 3. Resume: it starts after the last finished checkpoint and removes the partial one. SIGTERM after its
    # first step: a checkpoint is written and the run returns, preempted.
    result = fit(trainer, work, steps=steps, data_dir=dataset, hooks=[_SigtermAfter(finished + 1)])
    assert result.preempted and result.step == finished + 1
    assert f"resuming from step {finished} ({ckpts / str(finished)}), data position restored\n" in \
        capsys.readouterr().out
    assert sorted(_metrics(work)) == list(range(1, finished + 2))  # rows the killed run logged past 2: dropped
    assert not partial.exists()
    with TrainCheckpointer(ckpts, max_to_keep=3) as ckpt:
        assert ckpt.latest_step() == finished + 1

    # 4. Resume to the end: every step's loss equals the uninterrupted run's.
    assert not fit(trainer, work, steps=steps, data_dir=dataset).preempted
    resumed = _metrics(work)
    assert sorted(resumed) == list(range(1, steps + 1))
    np.testing.assert_allclose([resumed[s] for s in range(1, steps + 1)], reference, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------ other meshes


@pytest.fixture(scope="module")
def reference_losses(trainer, dataset, tmp_path_factory):
    """(8,1,1) losses of 3 steps."""
    return fit(trainer, tmp_path_factory.mktemp("mesh_ref"), steps=3, data_dir=dataset).losses


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_meshes_match(dataset, tmp_path, shape, reference_losses):
    devices = jax.devices()[:int(np.prod(shape))]
    other = Trainer(config(f"mesh.shape={shape}"), mesh=make_mesh(shape, devices))
    losses = fit(other, tmp_path, steps=3, data_dir=dataset).losses
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-5, atol=1e-6)


class _BothShards:
    """Global batches of a 2-process run, built in one process: shard 0's local batch, then shard 1's
    (``make_array_from_process_local_data`` puts process 0's rows first)."""

    def __init__(self, data_dir: Path, batch_size: int):
        self._shards = [make_train_iterator(data_dir, batch_size=batch_size, seed=0, resolution=RESOLUTION,
                                            shard_index=i, shard_count=2) for i in range(2)]

    def __next__(self):
        parts = [next(s) for s in self._shards]
        return {k: parts[0][k] + parts[1][k] if k == "input_text" else np.concatenate([p[k] for p in parts])
                for k in parts[0]}

    def get_state(self):
        return [s.get_state() for s in self._shards]

    def set_state(self, state):
        for s, st in zip(self._shards, state, strict=True):
            s.set_state(st)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(trainer, dataset, tmp_path):
    """2 processes x 4 CPU devices (``jax.distributed`` on localhost, each reading its own shard: records i,
    i + 2, ...) train like one process with 8 devices fed the same global batches."""
    steps, port, workdir = 3, _free_port(), tmp_path / "multi"
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    procs = [_train_cli(workdir, dataset, f"train.num_steps={steps}", devices=4, log=logs[i],
                        extra_env=dict(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    codes = [p.wait(timeout=900) for p in procs]
    assert codes == [0, 0], "\n\n".join(log.read_text()[-3000:] for log in logs)
    multi = _metrics(workdir)
    assert sorted(multi) == list(range(1, steps + 1))
    single = fit(trainer, tmp_path / "single", steps=steps, data_iterator=_BothShards(dataset, 8)).losses
    np.testing.assert_allclose([multi[s] for s in range(1, steps + 1)], single, rtol=2e-5, atol=1e-6)
