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


def _fake_compiler(monkeypatch, compiled, hbm_gib, step_peak, refused_from, decode_gib=0.0, state_figure=False):
    """sample_plan with a step peaking at ``step_peak(batch)`` GiB (9.5 of them arguments), refused by the
    compiler beyond ``hbm_gib`` or from ``refused_from`` images on (stating its temporaries if ``state_figure``),
    and a decode peaking at ``decode_gib``."""
    def refusal(batch):
        figure = f"HLO temporaries ({step_peak(batch) - 9.5:.2f}G) exceeds available HBM" if state_figure else ""
        return f"RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. {figure}"

    def fake_plan(config, devices, *, persons, batch, step_only=False):
        compiled.append((batch, step_only))
        if batch >= refused_from or (state_figure and step_peak(batch) > hbm_gib):
            raise RuntimeError(refusal(batch))
        programs = {"denoise": {"argument_bytes": int(9.5 * GIB)}}
        peak = step_peak(batch)
        if not step_only:
            programs["decode"] = {}
            peak = max(peak, decode_gib)
        return FakePlan(int(peak * GIB), programs)

    monkeypatch.setattr(aot, "sample_plan", fake_plan)
    monkeypatch.setattr(aot, "device_hbm_bytes", lambda devices: hbm_gib * GIB)


def test_max_batch_finds_the_edge_in_few_compiles(monkeypatch):
    """Peak 9.5 GiB of weights + 1.7 GiB per image (+ a little that grows faster), 16 GiB chip, and the compiler
    refusing batches from 6 on: the largest batch is 3, found compiling the step alone, then every program once."""
    compiled = []
    _fake_compiler(monkeypatch, compiled, 16, lambda b: 9.5 + 1.7 * b + 0.05 * b**2, refused_from=6)
    seen = []
    batch, plan = aot.max_batch(None, [None], on_plan=lambda b, p: seen.append((b, p is not None)))
    assert batch == 3 and plan.peak_bytes <= 16 * GIB and "decode" in plan.programs
    assert (4, False) in seen and len(compiled) <= 5
    assert [c for c in compiled if not c[1]] == [(3, False)]  # every program compiled once, at the answer


def test_max_batch_on_a_large_chip_takes_the_line(monkeypatch):
    """95 GiB, 1 GiB per image: from batches 1 and 2 the line gives the edge (85) at once; a slightly convex
    peak overshoots, and the chord to the refused batch's peak finds the edge in a few more compiles."""
    for curve, want in ((lambda b: 9.5 + 1.0 * b, 85), (lambda b: 9.5 + 1.0 * b + 0.002 * b**2, 74)):
        compiled = []
        _fake_compiler(monkeypatch, compiled, 95, curve, refused_from=1000, state_figure=True)
        batch, _ = aot.max_batch(None, [None])
        assert batch == want
        assert len(compiled) <= 7, compiled


def test_max_batch_steps_down_when_another_program_does_not_fit(monkeypatch):
    compiled = []
    _fake_compiler(monkeypatch, compiled, 16, lambda b: 9.5 + 1.0 * b, refused_from=100, decode_gib=15.8)
    batch, plan = aot.max_batch(None, [None])
    assert batch == 6 and plan.peak_bytes <= 16 * GIB
    compiled = []
    _fake_compiler(monkeypatch, compiled, 16, lambda b: 9.5 + 1.0 * b, refused_from=100, decode_gib=16.5)
    assert aot.max_batch(None, [None]) == (0, None)


def test_max_batch_is_zero_when_one_image_does_not_fit(monkeypatch):
    monkeypatch.setattr(aot, "sample_plan", lambda *a, **k: FakePlan(20 * GIB, {"denoise": {"argument_bytes": 0}}))
    monkeypatch.setattr(aot, "device_hbm_bytes", lambda devices: 16 * GIB)
    assert aot.max_batch(None, [None]) == (0, None)


def test_max_batch_needs_a_topology(capsys):
    from realisid_jax.cli import main

    assert main(["info", "--config", "configs/sdxl.py:micro", "--max-batch"]) == 2
    assert "--max-batch needs a TPU --topology" in capsys.readouterr().err
