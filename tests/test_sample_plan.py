"""`realisid info --sample` / `--max-batch`: the sampling plan's programs and per-image figures, and the search
for the largest batch a chip holds."""

import dataclasses

from realisid_jax.commands import info
from realisid_jax.config import load_config
from realisid_jax.training import aot

GIB = 2**30


def test_sample_plan_on_cpu_devices_prints_each_program(capsys):
    config = load_config("configs/sdxl.py:micro")
    assert info.print_sample_plan(config, None, 1, [1]) == 0
    out = capsys.readouterr().out
    for program in ("denoise_before_id", "denoise", "decode"):
        assert f"      {program} " in out
    assert "TFLOP/image" in out and "the ID from step 2" in out


def test_per_image_counts_each_phase_its_steps():
    figures = lambda flops: {"flops": flops, "peak_bytes": 1}  # noqa: E731
    plan = aot.SamplePlan(num_devices=2, persons=1, batch=4, height=64, width=64, steps=10, id_start=2,
                          programs={"denoise_before_id": figures(2.0), "denoise": figures(3.0),
                                    "decode": figures(5.0)})
    assert plan.per_image(lambda f: f["flops"]) == (2 * 2.0 + 8 * 3.0 + 5.0) * 2 / 4


@dataclasses.dataclass
class FakePlan:
    peak_bytes: int
    programs: dict


def test_max_batch_finds_the_edge_in_few_compiles(monkeypatch):
    """Peak 9.5 GiB of weights + 1.7 GiB per image (+ a little that grows faster), 16 GiB chip, and the compiler
    refusing batches from 6 on: the largest batch is 3, found without compiling every batch up to it."""
    compiled = []

    def fake_plan(config, devices, *, persons, batch):
        compiled.append(batch)
        if batch >= 6:
            raise RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
                               "space hbm.")
        peak = int((9.5 + 1.7 * batch + 0.05 * batch**2) * GIB)
        return FakePlan(peak, {"denoise": {"argument_bytes": int(9.5 * GIB)}})

    monkeypatch.setattr(aot, "sample_plan", fake_plan)
    monkeypatch.setattr(aot, "device_hbm_bytes", lambda devices: 16 * GIB)
    seen = []
    batch, plan = aot.max_batch(None, [None], on_plan=lambda b, p: seen.append((b, p is not None)))
    assert batch == 3 and plan.peak_bytes <= 16 * GIB
    assert (4, False) in seen and len(compiled) <= 4 and len(set(compiled)) == len(compiled)


def test_max_batch_is_zero_when_one_image_does_not_fit(monkeypatch):
    monkeypatch.setattr(aot, "sample_plan", lambda *a, **k: FakePlan(20 * GIB, {}))
    monkeypatch.setattr(aot, "device_hbm_bytes", lambda devices: 16 * GIB)
    assert aot.max_batch(None, [None]) == (0, None)


def test_max_batch_needs_a_topology(capsys):
    from realisid_jax.cli import main

    assert main(["info", "--config", "configs/sdxl.py:micro", "--max-batch"]) == 2
    assert "--max-batch needs a TPU --topology" in capsys.readouterr().err
