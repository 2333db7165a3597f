"""Two processes x 4 CPU devices on localhost (``jax.distributed`` + gloo collectives) train like one process
with 8 devices: same losses, step for step.

Each process reads its own shard of the dataset (records i, i + 2, ...); the single-process reference is fed
the same global batches (shard 0's local batch, then shard 1's: ``make_array_from_process_local_data`` puts
process 0's rows first).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import _CLI, CONFIG, OVERRIDES, RESOLUTION, ROOT, config, dataset  # noqa: F401

from realisid_jax.data.input_pipeline import make_train_iterator
from realisid_jax.train import train

STEPS = 3


class _BothShards:
    """Global batches of a 2-process run, built in one process: shard 0's local batch, then shard 1's."""

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
def test_two_processes_match_one(dataset, tmp_path):  # noqa: F811
    port = _free_port()
    workdir = tmp_path / "multi"
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        cmd = [sys.executable, "-c", _CLI, "train", "--config", str(CONFIG), "--workdir", str(workdir),
               "--data", str(dataset), *(f"--config.{o}" for o in [*OVERRIDES, f"train.num_steps={STEPS}"])]
        log = (tmp_path / f"process_{i}.log").open("w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    codes = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"process_{i}.log").read_text() for i in range(2)]
    if codes != [0, 0] and any("collective" in log.lower() and "not" in log.lower() and "support" in log.lower()
                               for log in logs):
        pytest.skip(f"multi-process CPU collectives unsupported by this jax build:\n{logs[0][-2000:]}")
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    multi = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))

    single = train(config(f"train.num_steps={STEPS}"), tmp_path / "single",
                   data_iterator=_BothShards(dataset, 8)).losses
    np.testing.assert_allclose(multi, single, rtol=2e-5, atol=1e-6)
