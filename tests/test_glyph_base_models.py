"""The glyph world's base VAE and text-to-image UNet (``realisid_jax.glyphs.autoencoder`` / ``text_to_image``):
training lowers the loss and resumes exactly, PSNR, sampling, background accuracy. Tiny models, a few steps."""

import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from realisid_jax.config import load_config
from realisid_jax.glyphs import world
from realisid_jax.glyphs.autoencoder import build_vae, evaluate_vae, psnr, render_scenes, train_vae
from realisid_jax.glyphs.text_to_image import (
    background_accuracy,
    border_backgrounds,
    build_unet,
    diffusion_loss,
    generate,
    noise_schedule,
    prepare_pool,
    random_text_encoders,
    rendered_batches,
    train_unet,
)
from realisid_jax.text.tokenizer import standard_tokenizers


@pytest.fixture(scope="module")
def config():
    c = load_config("configs/sdxl.py:tiny")
    c.model.vae.update(block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
    c.model.unet.update(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4)
    return c


@pytest.fixture(scope="module")
def text(config):
    return random_text_encoders(config, seed=0), standard_tokenizers(2)


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_psnr_on_known_images():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0] = 1  # MSE 1
    b[1, 0, 0, 0] = 255  # MSE 255^2 / 48
    np.testing.assert_allclose(psnr(a, b), [10 * np.log10(255.0**2), 10 * np.log10(48.0)])
    assert psnr(a, a).tolist() == [np.inf, np.inf]
    with pytest.raises(ValueError):
        psnr(a, b[:, :2])


def test_vae_training_improves_and_resumes_exactly(config, tmp_path):
    held_out = render_scenes(1, 2)
    before = evaluate_vae(build_vae(config, seed=0), held_out)
    kw = dict(seed=0, num_steps=6, batch_size=2, crop=32, learning_rate=3e-3, warmup_steps=1, pool_size=4,
              checkpoint_every=3, progress=False)
    vae, metrics = train_vae(config, workdir=tmp_path / "a", **kw)
    assert len(metrics["losses"]) == 6 and metrics["scaling_factor"] > 0
    assert vae.config.scaling_factor == metrics["scaling_factor"]
    assert evaluate_vae(vae, held_out) > before
    # A run killed after the checkpoint of step 3 continues from it to the same weights.
    train_vae(config, workdir=tmp_path / "b", **kw)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
    resumed, metrics = train_vae(config, workdir=tmp_path / "b", **kw)
    assert metrics["start_step"] == 3 and len(metrics["losses"]) == 3
    for x, y in zip(_params(vae), _params(resumed), strict=True):
        np.testing.assert_array_equal(x, y)


def test_unet_training_lowers_loss_and_resumes_exactly(config, text, tmp_path):
    encoders, tokenizers = text
    vae = build_vae(config, seed=0)
    kw = dict(seed=0, batch_size=4, learning_rate=1e-3, warmup_steps=1, pool_size=4, progress=False)
    straight, _ = train_unet(config, vae, encoders, tokenizers, num_steps=4, workdir=tmp_path / "a", **kw)
    train_unet(config, vae, encoders, tokenizers, num_steps=2, workdir=tmp_path / "b", **kw)
    resumed, metrics = train_unet(config, vae, encoders, tokenizers, num_steps=4, workdir=tmp_path / "b", **kw)
    assert metrics["start_step"] == 2
    for x, y in zip(_params(straight), _params(resumed), strict=True):
        np.testing.assert_array_equal(x, y)

    arrays = prepare_pool(vae, encoders, tokenizers, rendered_batches(0, 4)).arrays()
    loss = lambda unet: float(diffusion_loss(unet, arrays, jax.random.key(1), batch_size=8,  # noqa: E731
                                             scaling_factor=vae.scaling_factor, caption_dropout=0.1,
                                             schedule=noise_schedule())[0])
    assert loss(straight) < loss(build_unet(config, seed=0))


def test_generate_shapes_and_determinism(config, text):
    encoders, tokenizers = text
    unet, vae = build_unet(config, seed=0), build_vae(config, seed=0)
    captions = ["a glyph on a teal background", "two glyphs on a red background"]
    run = lambda seed: generate(config, unet, vae, encoders, tokenizers, captions, seed=seed,  # noqa: E731
                                num_inference_steps=2)
    images = run(0)
    assert images.shape == (2, config.sampling.height, config.sampling.width, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, run(0))
    assert not np.array_equal(images, run(1))


def test_background_accuracy_on_world_scenes():
    scenes = [world.scene(3, i, num_persons=2) for i in range(12)]
    images = np.stack([s.image for s in scenes])
    names = [s.spec.background for s in scenes]
    assert border_backgrounds(images) == names
    assert background_accuracy(images, names) == 1.0
    assert background_accuracy(images, names[1:] + names[:1]) < 1.0
    with pytest.raises(ValueError):
        background_accuracy(images, names[1:])
