"""Ahead-of-time compiles for Cloud TPU topologies on this CPU host (libtpu, the ``tpu`` extra): the training
step and the sampling loop of a reduced tiny model for a v5e-8 and a v4-8, the TPU compiler's per-chip figures,
FSDP against one chip, and the configured kernels."""

import os

# Before libtpu loads: pytest-xdist workers each load it, and no metadata server answers on this host.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import pytest  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from realisid_jax.config import load_config  # noqa: E402
from realisid_jax.models.layers import attention  # noqa: E402
from realisid_jax.training.aot import device_hbm_bytes, lower_sampling, sample_plan, topology_devices  # noqa: E402
from realisid_jax.training.roofline import device_chip, program_roofline  # noqa: E402
from realisid_jax.training.memory import MemoryPlan, executable_figures, lower_train_step  # noqa: E402

# The smallest program with every part of the TPU training step (configs/sdxl.py:micro).
CONFIG = f"{Path(__file__).resolve().parents[1] / 'configs' / 'sdxl.py'}:micro"


def config():
    return load_config(CONFIG)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    plan: MemoryPlan
    text: str  # the TPU program (compiled HLO)


def compile_step(devices, num_devices: int | None = None) -> CompiledStep:
    n = num_devices or len(devices)
    lowered = lower_train_step(config(), n, resolution=64, devices=devices)
    start = time.perf_counter()
    compiled = lowered.lowered.compile()
    figures = executable_figures(compiled, time.perf_counter() - start)
    plan = MemoryPlan(num_devices=n, per_device_batch=1, resolution=64, trainable_params=lowered.trainable_params,
                      frozen_params=lowered.frozen_params, state_bytes=lowered.state_bytes, **figures)
    return CompiledStep(plan, compiled.as_text())


@pytest.fixture(scope="module")
def v5e_8():
    devices = topology_devices("v5e:2x4")
    assert len(devices) == 8 and {d.device_kind for d in devices} == {"TPU v5 lite"}
    return compile_step(devices)


def check_tpu_step(step: CompiledStep, hbm: int, devices: int):
    plan = step.plan
    # Only the TPU compiler gives a roofline time (XLA:CPU's cost analysis has none). (Its value for such a small
    # program is not meaningful: -6 s was seen.)
    assert not math.isnan(plan.optimal_seconds) and plan.flops > 0, plan
    assert plan.alias_bytes > 0, "the train state is not donated"
    assert 0 < plan.peak_bytes < hbm, plan
    # Compiled for the chips, not for this host: TPU tiled layouts (XLA:CPU has none), one SPMD partition per
    # device, and the FSDP collectives.
    header = step.text.split("\n", 1)[0]
    assert ":T(8,128)" in header, header[:300]
    if devices > 1:
        assert "all-gather" in step.text and ("reduce-scatter" in step.text or "all-reduce" in step.text)


# A training-step compile takes 4 minutes on 2 idle cores and over 15 under load (the TPU compiler's code generation
# runs per fusion, whatever the sizes): these run in `make test-slow`; `make test` compiles the sampling loops.
@pytest.mark.slow
def test_training_step_compiles_for_a_v5e_8(v5e_8):
    check_tpu_step(v5e_8, 16 * 2**30, 8)


@pytest.mark.slow
def test_training_step_compiles_for_a_v4_8():
    devices = topology_devices("v4:2x2x1")  # 4 chips, one device per TensorCore: 16 of a chip's 32 GiB each
    assert len(devices) == 8 and {d.device_kind for d in devices} == {"TPU v4"}
    assert device_hbm_bytes(devices) == 16 * 2**30
    check_tpu_step(compile_step(devices), device_hbm_bytes(devices), 8)


@pytest.mark.slow
def test_fsdp_lowers_the_peak_per_chip(v5e_8):
    """At a fixed batch per chip, FSDP divides the state by the chips and each layer's weights are gathered only
    around that layer (``mesh.gather_weights``): the peak per chip falls from 1 to 2, 4 and 8 chips."""
    devices = topology_devices("v5e:2x4")
    plans = [compile_step(devices, n).plan for n in (1, 2, 4)] + [v5e_8.plan]
    assert v5e_8.plan.state_bytes < 0.5 * plans[0].state_bytes
    peaks = [plan.peak_bytes for plan in plans]
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] < peaks[0], peaks


@pytest.mark.parametrize("topology", ["v5e:2x4", "v4:2x2x1"])
def test_sampling_loop_compiles_for_a_slice(topology):
    devices = topology_devices(topology)
    plan = sample_plan(config(), devices)
    assert set(plan.programs) == {"denoise_before_id", "denoise", "decode"}
    for figures in plan.programs.values():
        # The roofline is positive where the compiler's own was negative (its ConcatBitcast calls count -1 s each).
        assert figures["roofline"].seconds > 0 and figures["roofline"].flops > 0 and figures["peak_bytes"] > 0
    before, with_id = plan.programs["denoise_before_id"], plan.programs["denoise"]
    assert before["roofline"].flops < 0.7 * with_id["roofline"].flops  # two predictions, not three
    assert plan.peak_bytes < device_hbm_bytes(devices)


def test_unknown_topology_is_one_clear_error():
    with pytest.raises(ValueError, match="v5e:3x3"):
        topology_devices("v5e:3x3")


def test_tpu_attention_is_the_configured_kernel():
    """No backend sniffing: compiled for a TPU chip on this CPU host, "xla" attention is one fused softmax and
    the XLA:CPU query-chunked variant (a loop over query blocks) appears only when the config asks for it."""
    device = topology_devices("v5e:2x2")[0]
    tokens = jax.ShapeDtypeStruct((1, 1024, 8 * 64), jnp.bfloat16, sharding=SingleDeviceSharding(device))

    def program(impl):
        step = jax.jit(functools.partial(attention, heads=8, implementation=impl))
        return step.lower(tokens, tokens, tokens).compile().as_text()

    assert " while(" not in program("xla")
    assert " while(" in program("chunked")


def test_roofline_estimates_the_splash_kernel_the_compiler_does_not_cost():
    """The splash kernel (a Pallas custom call) gets 0 FLOPs from the compiler; the roofline adds its attention
    FLOPs from its operands, 4·B·heads·Lq·Lk·head_dim, at the chip's peak."""
    devices = topology_devices("v5e:2x2")[:1]
    tokens = jax.ShapeDtypeStruct((1, 1024, 8 * 64), jnp.bfloat16, sharding=SingleDeviceSharding(devices[0]))
    step = jax.jit(functools.partial(attention, heads=8, implementation="splash"))
    compiled = step.lower(tokens, tokens, tokens).compile()
    roofline = program_roofline(compiled, device_chip(devices))
    assert roofline.kernels == 1
    assert roofline.kernel_flops == 4 * 8 * 1024 * 1024 * 64
    assert roofline.compiler_flops < 0.01 * roofline.kernel_flops
    assert roofline.seconds >= roofline.kernel_flops / device_chip(devices).peak_flops > 0


def test_roofline_counts_every_iteration_of_a_loop_with_a_constant_trip_count():
    """The compiler costs a loop body once; a scan's other iterations are added (here 4 matmuls, 2·256³ FLOPs
    each, as a scan and unrolled), while a loop over a traced number of steps stays one iteration."""
    devices = topology_devices("v5e:2x2")[:1]
    chip = device_chip(devices)
    x = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16, sharding=SingleDeviceSharding(devices[0]))
    w = jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16, sharding=SingleDeviceSharding(devices[0]))

    def roofline(fn, *args):
        return program_roofline(jax.jit(fn).lower(*args).compile(), chip)

    scanned = roofline(lambda x, w: jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0], x, w)
    unrolled = roofline(lambda x, w: functools.reduce(lambda h, wi: jnp.tanh(h @ wi), list(w), x), x, w)
    matmuls = 4 * 2 * 256**3
    assert scanned.compiler_flops < 0.3 * matmuls  # the compiler's own count: one iteration
    assert scanned.flops == pytest.approx(unrolled.flops, rel=0.02) and unrolled.flops >= matmuls
    assert scanned.seconds == pytest.approx(unrolled.seconds, rel=0.25)
    steps = jax.ShapeDtypeStruct((), jnp.int32, sharding=SingleDeviceSharding(devices[0]))
    traced = roofline(lambda x, w, n: jax.lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ w[0]), x), x, w, steps)
    assert traced.loop_flops == 0


def test_roofline_reads_a_loop_body_past_a_kernel_with_a_multi_line_config():
    """A Pallas kernel's backend config runs over several lines of the compiled HLO, one of them starting with
    "}}"; the loop reader goes on past it: a scan of 3 layers (splash attention, then a matmul) costs what the
    unrolled layers cost."""
    devices = topology_devices("v5e:2x2")[:1]
    chip = device_chip(devices)
    x = jax.ShapeDtypeStruct((1, 1024, 512), jnp.bfloat16, sharding=SingleDeviceSharding(devices[0]))
    w = jax.ShapeDtypeStruct((3, 512, 512), jnp.bfloat16, sharding=SingleDeviceSharding(devices[0]))

    def layer(h, wi):
        return jnp.tanh(attention(h, h, h, heads=8, implementation="splash") @ wi)

    def roofline(fn):
        compiled = jax.jit(fn).lower(x, w).compile()
        assert "\n}}" in compiled.as_text()  # the kernel's config as the reader meets it
        return program_roofline(compiled, chip)

    scanned = roofline(lambda x, w: jax.lax.scan(lambda h, wi: (layer(h, wi), None), x, w)[0])
    unrolled = roofline(lambda x, w: functools.reduce(layer, list(w), x))
    assert unrolled.flops >= 3 * (4 * 8 * 1024 * 1024 * 64 + 2 * 1024 * 512 * 512)
    assert scanned.flops == pytest.approx(unrolled.flops, rel=0.02)


def test_roofline_counts_convolutions_with_negative_padding_in_a_loop():
    """Gradient convolutions come with negative padding (``pad=1_-1x1_-1``); a scan of 3 of them costs what the
    unrolled convolutions cost (valid taps only, as the compiler counts)."""
    devices = topology_devices("v5e:2x2")[:1]
    x = jax.ShapeDtypeStruct((8, 64, 64, 128), jnp.bfloat16, sharding=SingleDeviceSharding(devices[0]))
    w = jax.ShapeDtypeStruct((3, 3, 3, 128, 128), jnp.bfloat16, sharding=SingleDeviceSharding(devices[0]))

    def conv(h, wi):
        y = jax.lax.conv_general_dilated(h, wi, (1, 1), ((1, -1), (1, -1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.pad(jnp.tanh(y), ((0, 0), (0, 2), (0, 2), (0, 0)))

    def roofline(fn):
        compiled = jax.jit(fn).lower(x, w).compile()
        assert "pad=1_-1x1_-1" in compiled.as_text()
        return program_roofline(compiled, device_chip(devices))

    scanned = roofline(lambda x, w: jax.lax.scan(lambda h, wi: (conv(h, wi), None), x, w)[0])
    unrolled = roofline(lambda x, w: functools.reduce(conv, list(w), x))
    assert scanned.flops == pytest.approx(unrolled.flops, rel=0.02)


def test_roofline_of_persons_in_sequence_is_that_of_one_pass():
    """Two persons' branch passes in a scan (configs/sdxl.py's persons_per_pass = 1) cost what the one pass of
    both costs (the sampling step with the ID, micro config): the scan's second iteration is counted."""
    devices = topology_devices("v5e:2x2")[:1]
    chip = device_chip(devices)

    def step(per_pass):
        config = load_config("configs/sdxl.py:micro", [f"realisid.persons_per_pass={per_pass}"])
        return program_roofline(lower_sampling(config, devices, persons=2)["denoise"].compile(), chip)

    sequence, one_pass = step(1), step(0)
    assert one_pass.loop_flops == 0 and sequence.loop_flops > 0.2 * sequence.compiler_flops
    assert sequence.flops == pytest.approx(one_pass.flops, rel=0.06)
    assert sequence.seconds == pytest.approx(one_pass.seconds, rel=0.1)


def _real_oom_error(device) -> Exception:
    """The TPU compiler's own refusal of a program larger than one chip's HBM (compiles in seconds)."""
    huge = jax.ShapeDtypeStruct((9 * 2**30,), jnp.bfloat16, sharding=SingleDeviceSharding(device))  # 18 GiB
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as refused:
        jax.jit(lambda x: x * 2).lower(huge).compile()
    return refused.value


def test_info_reports_a_slice_the_step_does_not_fit(monkeypatch, capsys):
    """`realisid info --train --topology` prints the compiler's refusal as "does not fit" and fails the plan,
    instead of a traceback."""
    from realisid_jax.commands import info
    from realisid_jax.training import memory

    error = _real_oom_error(topology_devices("v5e:2x2")[0])

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(memory, "train_step_memory", refuse)
    assert info.print_tpu_train_plans(config(), ["v5e:2x2"]) is False
    row = capsys.readouterr().out.strip().splitlines()[-2]
    assert row.split()[:3] == ["v5e:2x2", "1", "4"] and "does not fit: " in row and "RESOURCE_EXHAUSTED" in row, row
