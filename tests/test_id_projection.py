"""ID projection: parity with diffusers' IPAdapterPlusImageProjection on tiny random weights."""

import jax
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from flax import nnx

from realisid_jax.config import load_config
from realisid_jax.models.id_projection import IDProjection, IDProjectionConfig
from realisid_jax.models.modeling_utils import count_params
from realisid_jax.loading.torch_state import load_torch_state
from realisid_jax.loading.errors import CheckpointMismatchError


def _torch_reference(config: IDProjectionConfig) -> IPAdapterPlusImageProjection:
    torch.manual_seed(0)
    model = IPAdapterPlusImageProjection(**config.to_dict()).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): randomise them so a scale/bias mix-up fails
        for name, p in model.named_parameters():
            if name.endswith(("ln0.weight", "ln1.weight", "ff.0.weight", "norm_out.weight")):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(("ln0.bias", "ln1.bias", "ff.0.bias", "norm_out.bias")):
                p.copy_(0.3 * torch.randn_like(p))
    return model


def _load(config: IDProjectionConfig, state_dict) -> IDProjection:
    graphdef, abstract = nnx.split(IDProjection.abstract(config))
    state = load_torch_state(abstract, {k: v.numpy() for k, v in state_dict.items()}, source="reference")
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("overrides", [{}, dict(depth=2, ffn_ratio=1.5, dim_head=16, heads=2, num_queries=4)])
def test_parity_with_diffusers(overrides):
    section = dict(load_config("configs/sdxl.py:tiny").model.id_projection)
    config = IDProjectionConfig.from_dict({**section, **overrides})
    reference = _torch_reference(config)
    model = _load(config, reference.state_dict())
    assert count_params(model) == sum(p.numel() for p in reference.parameters())

    x = np.random.default_rng(0).normal(size=(2, 257, config.embed_dims)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    got = np.asarray(jax.jit(lambda g, s, x: nnx.merge(g, s)(x))(*nnx.split(model), x))
    assert got.shape == (2, config.num_queries, config.output_dims)
    err = np.abs(got - want).max()
    assert err <= 1e-4 * max(1.0, np.abs(want).max()), err


def test_state_dict_mismatch_is_reported():
    config = IDProjectionConfig.from_dict(dict(load_config("configs/sdxl.py:tiny").model.id_projection))
    state = _torch_reference(config).state_dict()
    del state["layers.0.ff.1.net.2.weight"]
    with pytest.raises(CheckpointMismatchError, match="layers.0.ff.1.net.2.weight"):
        _load(config, state)


def test_sdxl_parameter_count_matches_diffusers():
    """configs/sdxl.py's projection (ViT-H/14 tokens -> 16 x 2048): diffusers counts 82,961,664."""
    config = IDProjectionConfig.from_dict(dict(load_config("configs/sdxl.py").model.id_projection))
    assert count_params(IDProjection.abstract(config)) == 82_961_664
