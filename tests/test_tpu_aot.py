"""Ahead-of-time compiles for Cloud TPU topologies on this CPU host (libtpu, the ``tpu`` extra): the training
step and the sampling loop of a reduced tiny model, the TPU compiler's per-chip figures."""

import os

# Before libtpu loads: pytest-xdist workers each load it, and no metadata server answers on this host.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import functools  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import pytest  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from realisid_jax.config import load_config  # noqa: E402
from realisid_jax.models.layers import attention  # noqa: E402
from realisid_jax.training.aot import device_hbm_bytes, sample_plan, topology_devices  # noqa: E402
from realisid_jax.training.memory import train_step_memory  # noqa: E402

CONFIG = f"{Path(__file__).resolve().parents[1] / 'configs' / 'sdxl.py'}:tiny"
# The trainer tests' reduced tiny model (tests/test_train.py), with the TPU kernels: XLA attention and convs.
MICRO = ["model.unet.layers_per_block=1", "model.unet.transformer_layers_per_block=(1,1)",
         "model.text_encoder.num_hidden_layers=1", "model.text_encoder_2.num_hidden_layers=1",
         "model.image_encoder.num_hidden_layers=1", "attention_impl=xla", "conv_impl=xla",
         "sampling.height=64", "sampling.width=64"]


def config():
    return load_config(CONFIG, MICRO)


# The TPU compile of the reduced tiny training step took 18 minutes on 2 shared cores: make test-slow.
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def v5e_8_plan():
    devices = topology_devices("v5e:2x4")
    assert len(devices) == 8 and {d.device_kind for d in devices} == {"TPU v5 lite"}
    return train_step_memory(config(), 8, resolution=64, devices=devices)


def check_tpu_plan(plan, hbm: int):
    # Only the TPU compiler gives a roofline time (XLA:CPU's cost analysis has none): compiled for the chip,
    # not for this host. (Its value for such a small program is not meaningful: -6 s was seen.)
    assert not math.isnan(plan.optimal_seconds) and plan.flops > 0, plan
    assert plan.alias_bytes > 0, "the train state is not donated"
    assert 0 < plan.peak_bytes < hbm, plan


@slow
def test_training_step_compiles_for_a_v5e_8(v5e_8_plan):
    check_tpu_plan(v5e_8_plan, 16 * 2**30)


@slow
def test_training_step_compiles_for_a_v4_8():
    devices = topology_devices("v4:2x2x1")  # 4 chips, one device per TensorCore: 16 of a chip's 32 GiB each
    assert len(devices) == 8 and {d.device_kind for d in devices} == {"TPU v4"}
    assert device_hbm_bytes(devices) == 16 * 2**30
    check_tpu_plan(train_step_memory(config(), 8, resolution=64, devices=devices), device_hbm_bytes(devices))


@slow
def test_fsdp_lowers_the_peak_per_chip(v5e_8_plan):
    whole = train_step_memory(config(), 1, resolution=64, devices=topology_devices("v5e:2x4"))
    assert v5e_8_plan.state_bytes < 0.5 * whole.state_bytes
    assert v5e_8_plan.peak_bytes < whole.peak_bytes, (v5e_8_plan, whole)


def test_sampling_loop_compiles_for_one_chip():
    devices = topology_devices("v5e:2x2")
    plan = sample_plan(config(), devices[:1])
    for figures in (plan.denoise, plan.decode):
        assert not math.isnan(figures["optimal_seconds"]) and figures["peak_bytes"] > 0, figures
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
