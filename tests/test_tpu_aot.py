"""Ahead-of-time compiles for Cloud TPU topologies on this CPU host (libtpu, the ``tpu`` extra): the training
step and the sampling loop of a reduced tiny model, the TPU compiler's per-chip figures."""

import os

# Before libtpu loads: pytest-xdist workers each load it, and no metadata server answers on this host.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import functools  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import pytest  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from realisid_jax.config import load_config  # noqa: E402
from realisid_jax.models.layers import attention  # noqa: E402
from realisid_jax.training.aot import chip_hbm_bytes, sample_plan, topology_devices  # noqa: E402
from realisid_jax.training.memory import train_step_memory  # noqa: E402

CONFIG = f"{Path(__file__).resolve().parents[1] / 'configs' / 'sdxl.py'}:tiny"
# The trainer tests' reduced tiny model (tests/test_train.py), with the TPU kernels: XLA attention and convs.
MICRO = ["model.unet.layers_per_block=1", "model.unet.transformer_layers_per_block=(1,1)",
         "model.text_encoder.num_hidden_layers=1", "model.text_encoder_2.num_hidden_layers=1",
         "model.image_encoder.num_hidden_layers=1", "attention_impl=xla", "conv_impl=xla",
         "sampling.height=64", "sampling.width=64"]


def config():
    return load_config(CONFIG, MICRO)


@pytest.mark.parametrize("topology, chips, kind", [("v5e:2x4", 8, "TPU v5 lite"), ("v4:2x2x1", 4, "TPU v4")])
def test_training_step_compiles_for_the_tpu_slice(topology, chips, kind):
    devices = topology_devices(topology)
    assert len(devices) == chips and {d.device_kind for d in devices} == {kind}
    plan = train_step_memory(config(), chips, resolution=64, devices=devices)
    # Only the TPU compiler gives a roofline time (XLA:CPU's cost analysis has none): compiled for the chip,
    # not for this host.
    assert plan.optimal_seconds > 0 and plan.flops > 0, plan
    assert plan.alias_bytes > 0, "the train state is not donated"
    assert 0 < plan.peak_bytes < chip_hbm_bytes(devices[0])


def test_fsdp_lowers_the_peak_per_chip():
    devices = topology_devices("v5e:2x4")
    sharded = train_step_memory(config(), 8, resolution=64, devices=devices)
    whole = train_step_memory(config(), 1, resolution=64, devices=devices)
    assert sharded.state_bytes < 0.5 * whole.state_bytes
    assert sharded.peak_bytes < whole.peak_bytes, (sharded, whole)


def test_sampling_loop_compiles_for_one_chip():
    devices = topology_devices("v5e:2x2")
    plan = sample_plan(config(), devices[:1])
    for figures in (plan.denoise, plan.decode):
        assert figures["optimal_seconds"] > 0 and figures["peak_bytes"] > 0, figures
    assert plan.peak_bytes < chip_hbm_bytes(devices[0])


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
