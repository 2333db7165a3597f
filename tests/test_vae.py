"""AutoencoderKL: parity with diffusers 0.42.1 on tiny random checkpoints, SDXL size, bfloat16, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import nnx

from realisid_jax.config import load_config
from realisid_jax.models.modeling_utils import count_params
from realisid_jax.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussianDistribution
from realisid_jax.sharding import make_mesh, state_shardings, use_mesh
from realisid_jax.loading.pretrained import from_pretrained

TINY = dict(load_config("configs/sdxl.py:tiny").model.vae)
VARIANTS = {
    "tiny": TINY,
    "two_layers": {**TINY, "layers_per_block": 2},
    "no_attention_no_quant": {**TINY, "mid_block_add_attention": False, "use_quant_conv": False,
                              "use_post_quant_conv": False, "block_out_channels": (16, 32)},
}


def _torch_vae(config: dict, folder) -> TorchAutoencoderKL:
    """Random diffusers VAE with every parameter perturbed (norm scales/biases start at 1/0), saved to folder."""
    n = len(config["block_out_channels"])
    config = {**config, "down_block_types": ("DownEncoderBlock2D",) * n, "up_block_types": ("UpDecoderBlock2D",) * n}
    torch.manual_seed(0)
    model = TorchAutoencoderKL(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def _to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def _assert_close(actual, reference, rel=1e-4):
    reference = np.asarray(reference, np.float32)
    err = float(np.max(np.abs(np.asarray(actual, np.float32) - reference)))
    bound = rel * max(1.0, float(np.max(np.abs(reference))))
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant name -> (torch reference, our model loaded from its saved folder, folder); built once each."""
    built = {}

    def get(name):
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            reference = _torch_vae(VARIANTS[name], folder)
            built[name] = reference, from_pretrained(AutoencoderKL, folder), folder
        return built[name]

    return get


@pytest.fixture(params=sorted(VARIANTS))
def pair(request, checkpoints):
    return checkpoints(request.param)


@pytest.fixture
def tiny_pair(checkpoints):
    return checkpoints("tiny")


def _latents(model, seed):
    # The parity test's latent shape, so the eager float32 decode reuses its compiled ops.
    return jax.random.normal(jax.random.key(seed), (2, 4, 6, model.config.latent_channels))


def test_parity_encode_decode(pair):
    reference, model, _ = pair
    f = 2 ** (len(model.config.block_out_channels) - 1)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, 3, 4 * f, 6 * f)).astype(np.float32)  # non-square: catches H/W swaps
    latents = rng.standard_normal((2, model.config.latent_channels, 4, 6)).astype(np.float32)
    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(image)).latent_dist
        decoded = reference.decode(torch.from_numpy(latents)).sample
    ours = model.encode(jnp.asarray(image.transpose(0, 2, 3, 1)))
    _assert_close(ours.mean, _to_nhwc(posterior.mean))
    _assert_close(ours.logvar, _to_nhwc(posterior.logvar))
    _assert_close(ours.std, _to_nhwc(posterior.std))
    _assert_close(model.decode(jnp.asarray(latents.transpose(0, 2, 3, 1))), _to_nhwc(decoded))


def test_bfloat16_load_and_decode(tiny_pair):
    _, model, folder = tiny_pair
    bf16 = from_pretrained(AutoencoderKL, folder, dtype=jnp.bfloat16)
    dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(bf16, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    z = _latents(model, 1)
    graphdef, state = nnx.split(bf16)
    out = jax.jit(lambda state, z: nnx.merge(graphdef, state).decode(z))(state, z.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    _assert_close(out, model.decode(z), rel=5e-2)


# Spatial sharding too: the height axis over "fsdp", so the constraints at block boundaries do real work.
SPATIAL_RULES = (("activation_batch", "data"), ("activation_length", "fsdp"), ("activation_embed", "tensor"),
                 ("embed", "fsdp"), ("heads", "tensor"), ("conv_out", "tensor"), ("conv_in", None),
                 ("conv_h", None), ("conv_w", None))


def test_sharded_decode_matches_single_device(tiny_pair):
    _, model, _ = tiny_pair
    z = _latents(model, 2)
    expected = model.decode(z)
    mesh = make_mesh((2, 2, 2))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, state_shardings(state, mesh, SPATIAL_RULES))

    @jax.jit
    def decode(state, z):
        return nnx.merge(graphdef, state).decode(z)

    with use_mesh(mesh, SPATIAL_RULES):
        out = jax.block_until_ready(decode(state, z))
    _assert_close(out, expected)


def test_posterior_clips_logvar_and_samples():
    moments = jnp.concatenate([jnp.ones((1, 2, 2, 4)), jnp.full((1, 2, 2, 4), 50.0).at[..., 0].set(-50.0)], -1)
    posterior = DiagonalGaussianDistribution.from_moments(moments)
    assert float(posterior.logvar.max()) == 20.0 and float(posterior.logvar.min()) == -30.0
    key = jax.random.key(3)
    np.testing.assert_allclose(posterior.sample(key), 1.0 + posterior.std * jax.random.normal(key, (1, 2, 2, 4)))
    assert posterior.mode() is posterior.mean


def test_sdxl_parameter_count():
    config = AutoencoderKLConfig.from_dict(dict(load_config("configs/sdxl.py").model.vae))
    assert count_params(AutoencoderKL.abstract(config)) == 83_653_863


def test_unsupported_block_type_is_rejected():
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        AutoencoderKLConfig(down_block_types=("AttnDownEncoderBlock2D",))
