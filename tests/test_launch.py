"""The Cloud TPU launch scripts, dry-run (``DRY_RUN=1``: they print the commands instead of running them)."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tpu_pod_plans_with_the_config_overrides_and_trains_with_every_argument():
    env = {**os.environ, "TOPOLOGY": "v5e:2x4", "DRY_RUN": "1"}
    out = subprocess.run(["bash", "launch/tpu_pod.sh", "tpu1", "us-central1-a", "gs://bucket/run", "--data",
                          "gs://bucket/data", "--config.train.num_steps=5", "--pretrained", "/sdxl"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    plan, launch = out
    assert "info --train --topology v5e:2x4" in plan and "num_steps=5" in plan
    assert "--data" not in plan and "--pretrained" not in plan  # `realisid info` takes neither
    assert launch.startswith("gcloud compute tpus tpu-vm ssh tpu1") and "--worker=all" in launch
    for part in ("realisid\\ train", "--data\\ gs://bucket/data", "num_steps=5", "--pretrained\\ /sdxl"):
        assert part in launch, part


def test_tpu_sample_plans_sampling_then_runs_sample_batch_on_every_worker():
    env = {**os.environ, "TOPOLOGY": "v5e:2x4", "DRY_RUN": "1", "PROJECT": "proj"}
    plan, launch = subprocess.run(["bash", "launch/tpu_sample.sh", "tpu1", "zone-a", "/shared/requests.jsonl",
                                   "/shared/out", "--base", "/sdxl"], cwd=ROOT, env=env, capture_output=True,
                                  text=True, check=True).stdout.splitlines()
    assert "info --sample --topology v5e:2x4" in plan
    assert launch.startswith("gcloud compute tpus tpu-vm ssh tpu1") and launch.rstrip().endswith("--project proj")
    assert "sample-batch" in launch and "--base\\ /sdxl" in launch
