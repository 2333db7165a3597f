"""``train_step_memory``: XLA's per-device figures of the compiled training step, on simulated CPU devices."""

import dataclasses
from pathlib import Path

import numpy as np

from realisid_jax.config import load_config
from realisid_jax.realisid.components import abstract_components
from realisid_jax.models.modeling_utils import count_params
from realisid_jax.training.memory import train_step_memory

CONFIG = f"{Path(__file__).resolve().parents[1] / 'configs' / 'sdxl.py'}:tiny"
# The trainer tests' reduced tiny model (tests/test_train.py): every code path, half the compile time.
MICRO = ["model.unet.layers_per_block=1", "model.unet.transformer_layers_per_block=(1,1)",
         "model.text_encoder.num_hidden_layers=1", "model.text_encoder_2.num_hidden_layers=1",
         "model.image_encoder.num_hidden_layers=1"]


def test_fsdp_plan_matches_the_shardings():
    config = load_config(CONFIG, MICRO)
    plan = train_step_memory(config, 8, resolution=64)
    trainable = count_params(abstract_components(config).realisid)
    assert plan.trainable_params == trainable
    # Sharded over 8 devices: one device holds less than half of the float32 branches + AdamW moments + frozen
    # weights (tiny dims that do not divide by 8 stay replicated), and XLA's arguments are exactly those
    # shards plus the device's share of the batch (1 example of 64 px: < 1 MiB).
    whole = 4 * (3 * trainable + plan.frozen_params)
    assert plan.state_bytes < 0.5 * whole, dataclasses.asdict(plan)
    assert 0 < plan.argument_bytes - plan.state_bytes < 2**20, dataclasses.asdict(plan)
    assert plan.alias_bytes > 0, "the train state is not donated"
    assert plan.temp_bytes > 0
    np.testing.assert_equal(plan.peak_bytes, plan.argument_bytes + plan.output_bytes - plan.alias_bytes
                            + plan.temp_bytes)
