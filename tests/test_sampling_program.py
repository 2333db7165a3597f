"""What the sampling program holds: the branches stored in the compute dtype (cast once at load), no weight
converted or copied to HBM inside it, no encoder among its arguments (TPU compiler, configs/sdxl.py:micro)."""

import os

# Before libtpu loads: pytest-xdist workers each load it, and no metadata server answers on this host.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import math  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from realisid_jax.config import load_config  # noqa: E402
from realisid_jax.realisid.components import abstract_components  # noqa: E402
from realisid_jax.realisid.pipeline import RealisIDPipeline  # noqa: E402
from realisid_jax.training.aot import lower_sampling, topology_devices  # noqa: E402


def _config(**sampling):
    config = load_config("configs/sdxl.py:micro")
    config.dtype = config.frozen_param_dtype = "bfloat16"  # the accelerator defaults of configs/sdxl.py
    config.sampling.update(sampling)
    return config


def _dtypes(tree) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_sampling_stores_the_branches_in_the_compute_dtype():
    pipe = RealisIDPipeline.from_config(_config())
    assert _dtypes(pipe._state["realisid"]) == {"bfloat16"}
    trained = jax.tree.map(lambda x: x.astype(np.float32), pipe._state["realisid"].to_pure_dict())
    pipe.set_branch_params(trained)  # a train state's fp32 masters: cast, not refused
    assert _dtypes(pipe._state["realisid"]) == {"bfloat16"}
    kept = RealisIDPipeline.from_config(_config(param_dtype="float32"))
    assert _dtypes(kept._state["realisid"]) == {"float32"}


def _weight_shapes(config) -> set[tuple[int, ...]]:
    _, state = nnx.split(abstract_components(config))
    return {tuple(sorted(x.shape)) for x in jax.tree.leaves(state) if len(x.shape) >= 2}


def _denoise_program(config):
    return lower_sampling(config, topology_devices("v5e:2x2")[:1])["denoise"].compile()


def _weight_converts(text: str, shapes) -> int:
    """``convert`` instructions (fused or not) whose result has a weight's shape."""
    found = re.findall(r"= \w+\[([\d,]*)\]\S* convert\(", text)
    return sum(tuple(sorted(int(d) for d in dims.split(",") if d)) in shapes for dims in found)


def _hbm_copies_of_arguments(text: str) -> list[str]:
    """Copies of the program's float arguments of rank >= 2 (weights and inputs) that land in HBM, not in VMEM
    (``S(1)``)."""
    entry = text[text.index("\nENTRY"):]
    entry = entry[:entry.index("\n}\n")]
    params = set(re.findall(r"%([\w.\-]+) = \S+ parameter\(", entry))
    copies = re.findall(r"= ((?:bf16|f32)\[\d+,[\d,]+\]\S*) copy\(%([\w.\-]+)\)", entry)
    return [shape for shape, operand in copies if operand in params and "S(1)" not in shape]


@pytest.fixture(scope="module")
def program():
    config = _config()
    return config, _denoise_program(config)


def test_the_loop_converts_and_copies_no_weight(program):
    config, compiled = program
    text = compiled.as_text()
    assert _weight_converts(text, _weight_shapes(config)) == 0
    assert _hbm_copies_of_arguments(text) == []
    # The check can fail: with the branches stored in float32 the program converts their weights to bf16.
    fp32 = _config(param_dtype="float32")
    assert _weight_converts(_denoise_program(fp32).as_text(), _weight_shapes(fp32)) > 0


def _argument_components(text: str) -> set[str]:
    """The components whose weights are arguments of the program (its parameters' ``state['<name>']`` names)."""
    return set(re.findall(r"parameter\(\d+\).*op_name=\"state\[\\'(\w+)\\'\]", text))


def test_no_encoder_weights_among_the_loop_arguments(program):
    _, compiled = program
    assert _argument_components(compiled.as_text()) == {"unet", "realisid"}
