"""The estimated training peak (training/peak_law.py): its parts are exact without compiling, its fit recovers a
law, and `realisid info --train --estimate` prints it, labelled, for a TPU slice."""

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # pytest-xdist workers each load libtpu

import math  # noqa: E402

import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from realisid_jax.commands import info  # noqa: E402
from realisid_jax.commands.arguments import UsageError  # noqa: E402
from realisid_jax.config import load_config  # noqa: E402
from realisid_jax.models.modeling_utils import count_params, init_rngs  # noqa: E402
from realisid_jax.training.aot import topology_devices  # noqa: E402
from realisid_jax.training.memory import lower_train_step  # noqa: E402
from realisid_jax.training.peak_law import (PeakLaw, StepParts, fit_law, largest_block_bytes,  # noqa: E402
                                            saved_residual_bytes, step_parts, tpu_tiled_bytes)
from realisid_jax.training.state import training_components  # noqa: E402

MICRO = "configs/sdxl.py:micro"


def test_residuals_grow_linearly_with_the_batch():
    """Every block is rematerialised: what the forward pass saves is the blocks' inputs, so each example adds
    the same data (the micro config keeps fp32 branches and no bf16 copies of them); tiled for the TPU, the
    residuals take more."""
    config = load_config(MICRO)
    one, two, three = (saved_residual_bytes(config, b, 64, tiled=False) for b in (1, 2, 3))
    assert 0 < one < two < three
    assert two - one == three - two
    assert saved_residual_bytes(config, 1, 64) > 2 * one  # the condition encoders' maps of 8-16 channels


def test_residuals_without_remat_hold_more():
    config = load_config(MICRO)
    kept = saved_residual_bytes(load_config(MICRO, ["train.remat=False"]), 1, 64, tiled=False)
    assert kept > 1.5 * saved_residual_bytes(config, 1, 64, tiled=False)


def test_tiled_bytes_pad_the_lanes_and_sublanes():
    assert tpu_tiled_bytes((1, 512, 512, 16), "bfloat16") == 512 * 512 * 128 * 2
    assert tpu_tiled_bytes((1, 128, 128, 8), "float32") == 128 * 128 * 128 * 4
    assert tpu_tiled_bytes((1280, 5120), "bfloat16") == 1280 * 5120 * 2
    assert tpu_tiled_bytes((3, 1280), "bfloat16") == 16 * 1280 * 2
    assert tpu_tiled_bytes((), "float32") == 8 * 128 * 4


def test_largest_block_is_the_largest_resnet_or_transformer_of_the_branches():
    config = load_config(MICRO)
    components = nnx.eval_shape(lambda: training_components(config, init_rngs(0)))
    blocks = []
    for net in (components.realisid.local_branch, components.realisid.global_branch):
        for block in [*net.down_blocks, net.mid_block]:
            blocks += [*block.resnets, *getattr(block, "attentions", ())]
    assert largest_block_bytes(config) == 4 * max(count_params(b) for b in blocks)


def test_parts_on_eight_chips_are_the_lowered_steps():
    config = load_config(MICRO)
    devices = topology_devices("v5e:2x4")
    parts = step_parts(config, 8, resolution=64, devices=devices)
    step = lower_train_step(config, 8, resolution=64, devices=devices)
    assert parts.state_bytes == step.state_bytes and parts.batch_bytes == step.batch_bytes > 0
    # fp32 gradients, each parameter sharded over the 8 chips where its shape allows
    assert 4 * step.trainable_params / 8 <= parts.gradient_bytes < 4 * step.trainable_params / 2
    # one example's residuals per chip; only the part that does not grow with the batch is sharded
    one = saved_residual_bytes(config, 1, 64)
    assert 0.9 * one <= parts.residual_bytes <= one


def test_fit_recovers_a_law_and_needs_four_compiles():
    law = (1.25, 2.0, 0.5, 3e6)
    parts = [StepParts(100, 1, r, g, b) for r, g, b in
             ((1e8, 2e8, 5e7), (2e8, 2e8, 5e7), (1e8, 1e8, 5e7), (1e8, 2e8, 9e7), (3e8, 1e8, 2e7))]
    temps = [law[0] * p.residual_bytes + law[1] * p.gradient_bytes + law[2] * p.block_bytes + law[3] for p in parts]
    assert fit_law(parts, temps) == pytest.approx(law)
    fitted = PeakLaw(fit_law(parts, temps), check_error=math.nan)
    assert fitted.peak_bytes(parts[0]) == pytest.approx(101 + temps[0])
    with pytest.raises(ValueError, match="at least 4 compiles"):
        fit_law(parts[:3], temps[:3])


def test_info_estimates_the_training_peak_without_compiling(capsys):
    args = info_args(["--train", "--estimate", "--topology", "v5e:2x4"])
    assert info.run(args) == 0
    out = capsys.readouterr().out
    assert "ESTIMATED per-chip peak" in out and "not compiled" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("v5e:2x4"))
    assert row.split()[1] == "8" and row.split()[-1] == "fits", row


def test_info_estimate_needs_train_a_topology_and_a_batch_of_one():
    with pytest.raises(UsageError, match="--train and --topology"):
        info.run(info_args(["--estimate", "--topology", "v5e:2x4"]))
    with pytest.raises(UsageError, match="batch of 1 per device"):
        info.run(info_args(["--train", "--estimate", "--topology", "v5e:2x4", "--per-device-batch", "2"]))


def info_args(extra):
    import argparse

    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    info.register(subparsers)
    args = parser.parse_args(["info", "--config", MICRO, *extra])
    args.config_overrides = ["train.resolution=64"]
    return args
