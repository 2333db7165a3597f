"""RealisIDPipeline: diffusers SDXL parity with the branches off, persons, sharding, recompiles, CLI, errors."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from flax import nnx
from skimage import data
from tiny_sdxl import build_tiny_sdxl

from realisid_jax.cli import main
from realisid_jax.realisid.conditions import BoxError, Person, SizeError, TooManyPersonsError
from realisid_jax.config import load_config
from realisid_jax.face.errors import NoFaceError
from realisid_jax.realisid.branches import RealisID, RealisIDConfig
from realisid_jax.models.registry import FROZEN
from realisid_jax.realisid.components import Components
from realisid_jax.realisid.pipeline import RealisIDPipeline, _decode, _denoise, person_bucket, prepare_conditions
from realisid_jax.sharding import active_batch_shards, data_sharding, make_mesh, use_mesh
from realisid_jax.loading.pipeline_folder import load_pipeline_folder

H, W, STEPS = 128, 128, 3
CONFIG = load_config("configs/sdxl.py:tiny")
PROMPT = "a photo of an astronaut"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def parts(sdxl):
    folder, encoder, _, _ = sdxl
    return load_pipeline_folder(folder, image_encoder=encoder)


def _pipeline(parts, realisid, mesh=None, config=CONFIG):
    components = Components(**{name: getattr(parts, name) for name in FROZEN}, realisid=realisid)
    return RealisIDPipeline(components, parts.tokenizers, config, scheduler_config=parts.scheduler_config, mesh=mesh)


@pytest.fixture(scope="module")
def branches(parts):
    """Branches from the UNet with every weight perturbed: the zero-initialised convs too, so persons matter."""
    realisid = RealisID.from_unet(parts.unet, RealisIDConfig.from_config(CONFIG))
    rng = np.random.default_rng(0)
    state = nnx.state(realisid, nnx.Param)
    nnx.update(realisid, jax.tree.map(lambda x: x + 0.02 * rng.standard_normal(x.shape).astype(x.dtype), state))
    return realisid


def _latents(n=1, h=H, w=W):
    return np.random.default_rng(1).standard_normal((n, h // 8, w // 8, 4)).astype(np.float32)


def _astronaut(box):
    return Person(data.astronaut(), box)


def test_branches_off_reproduces_diffusers_sdxl(sdxl, parts):
    _, _, torch_pipe, _ = sdxl
    # diffusers' SDXL pipeline zeros the empty negative prompt (force_zeros_for_empty_prompt)
    zeros = load_config("configs/sdxl.py:tiny", ["realisid.no_text=zeros"])
    plain = _pipeline(parts, RealisID.from_unet(parts.unet, RealisIDConfig.from_config(zeros)), config=zeros)
    latents = _latents()
    ours = plain(PROMPT, [], latents=latents, height=H, width=W, num_inference_steps=STEPS,
                 text_guidance_scale=5.0, progress=False)
    torch_pipe.scheduler = DDIMScheduler.from_config(torch_pipe.scheduler.config, clip_sample=False)
    with torch.no_grad():
        ref = torch_pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, height=H, width=W,
                         latents=torch.from_numpy(latents.transpose(0, 3, 1, 2)), output_type="latent").images
        image = torch_pipe.vae.decode(ref / torch_pipe.vae.config.scaling_factor).sample
    ref = ref.numpy().transpose(0, 2, 3, 1)
    assert np.abs(ours.latents - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    ref_image = np.round(np.clip(image.numpy().transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1) * 255)
    assert np.abs(ours.images.astype(np.float32) - ref_image).max() <= 1


def test_three_overlapping_persons_non_square(parts, branches):
    pipe = _pipeline(parts, branches)
    h, w = 128, 192
    persons = [_astronaut((10, 10, 74, 74)), _astronaut((50, 30, 114, 94)), _astronaut((100, 20, 180, 100))]
    with_persons = pipe(PROMPT, persons, latents=_latents(1, h, w), height=h, width=w, num_inference_steps=STEPS,
                        progress=False)
    without = pipe(PROMPT, [], latents=_latents(1, h, w), height=h, width=w, num_inference_steps=STEPS,
                   progress=False)
    assert with_persons.images.shape == (1, h, w, 3)
    assert np.isfinite(with_persons.latents).all()
    assert with_persons.conditions.valid.tolist() == [True, True, True, False]
    assert np.abs(with_persons.latents - without.latents).max() > 1e-3


def test_batch_of_four_on_eight_devices_equals_one_device(parts, branches):
    # (2, 2, 2): the batch of 4 splits over data x fsdp, the weights over fsdp and tensor.
    persons = [_astronaut((30, 20, 94, 84))]
    kw = dict(height=H, width=W, num_inference_steps=2, num_images=4, seed=3, progress=False)
    single = _pipeline(parts, branches)(PROMPT, persons, **kw)
    mesh = make_mesh((2, 2, 2))
    assert data_sharding(mesh, (4, H // 8, W // 8, 4)).spec[0] == ("data", "fsdp"), "batch would be replicated"
    sharded_pipe = _pipeline(parts, branches, mesh=mesh)
    assert any(len(set(v.sharding.spec) - {None}) for v in jax.tree.leaves(sharded_pipe._state["unet"]))
    sharded = sharded_pipe(PROMPT, persons, **kw)
    np.testing.assert_allclose(sharded.latents, single.latents, atol=1e-4, rtol=1e-4)
    assert np.abs(sharded.images.astype(int) - single.images.astype(int)).max() <= 1


def test_decode_one_image_per_shard_at_a_time(parts, branches):
    """The VAE decodes one image per batch shard at a time: the images of decoding the batch at once, and
    temporaries that do not grow with the batch (XLA:CPU memory analysis); a batch of 8 on the (2, 2, 2) mesh
    decodes 4 at a time, one per data x fsdp shard."""
    pipe = _pipeline(parts, branches)
    latents = jax.numpy.asarray(_latents(4))
    whole = jax.jit(lambda z: parts.vae.decode(z / parts.vae.scaling_factor))(latents)
    want = np.round(np.clip(np.asarray(whole) / 2 + 0.5, 0, 1) * 255)
    got = np.asarray(_decode(pipe._graphdef, pipe._state, latents)).astype(np.float32)
    assert np.abs(got - want).max() <= 1

    def temporaries(n):
        compiled = _decode.lower(pipe._graphdef, pipe._state, latents[:1].repeat(n, 0)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temporaries(4) < 1.5 * temporaries(1)
    with use_mesh(make_mesh((2, 2, 2))):
        assert active_batch_shards(8) == 4 and active_batch_shards(3) == 1
    assert active_batch_shards(8) == 1


def test_no_recompilation_across_seeds_prompts_boxes_and_scales(parts, branches):
    pipe = _pipeline(parts, branches)
    pipe(PROMPT, [_astronaut((30, 20, 94, 84))], height=H, width=W, num_inference_steps=STEPS,
         id_start_fraction=0.5, progress=False)  # both phases: before the ID (two predictions) and with it
    compiled = _denoise._cache_size()
    pipe("another prompt", [_astronaut((10, 40, 60, 90))], height=H, width=W, num_inference_steps=STEPS, seed=7,
         text_guidance_scale=3.0, id_guidance_scale=2.0, id_start_fraction=0.75, progress=False)
    assert _denoise._cache_size() == compiled


def test_persons_run_in_buckets(parts, branches):
    """The branches run on 1, 2, 4, ... slots: a bucket compiles once, and padding does not change the images."""
    assert [person_bucket(n, 4) for n in range(6)] == [1, 1, 2, 4, 4, 4] and person_bucket(3, 3) == 3
    pipe = _pipeline(parts, branches)
    kw = dict(height=H, width=W, num_inference_steps=STEPS, progress=False)
    pipe(PROMPT, [_astronaut((30, 20, 94, 84)), _astronaut((10, 40, 60, 90))], **kw)
    compiled = _denoise._cache_size()
    two = pipe("another prompt", [_astronaut((60, 60, 120, 120)), _astronaut((0, 0, 40, 40))], seed=5,
               id_guidance_scale=2.0, **kw)
    assert _denoise._cache_size() == compiled and two.conditions.valid.tolist() == [True, True, False, False]
    one = two.conditions
    first = dataclasses.replace(one, valid=np.array([True, False, False, False]))  # bucket 1
    last = dataclasses.replace(one, valid=np.array([False, False, False, True]),  # bucket 4, 3 padded slots
                               **{f: getattr(one, f)[[3, 2, 1, 0]] for f in
                                  ("reference_pixels", "boxes", "landmark_images")})
    np.testing.assert_allclose(pipe(PROMPT, last, **kw).latents, pipe(PROMPT, first, **kw).latents,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("persons, size, error", [
    ([_astronaut((0, 0, 64, 64))], (100, 128), SizeError),
    ([_astronaut((10, 10, 10, 40))], (H, W), BoxError),  # empty
    ([_astronaut((0, 0, 64, 200))], (H, W), BoxError),
    ([_astronaut((0, 0, 64, 64))] * 5, (H, W), TooManyPersonsError),
    ([Person(np.full((256, 256, 3), 128, np.uint8), (0, 0, 64, 64))], (H, W), NoFaceError),
])
def test_bad_input_is_a_clear_error(persons, size, error):
    with pytest.raises(error):
        prepare_conditions(CONFIG, persons, *size)


def test_cli_end_to_end_on_the_astronaut(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["sample", "--config", "configs/sdxl.py:tiny", "--out", str(out), "--steps", "2", "--height", str(H),
               "--width", str(W), "--num-images", "2"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["conditioning_sheet.png", "image_000.png", "image_001.png"]
    assert "RANDOM weights" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--box", "0,0,300,64", "--face", "PHOTO"], "does not fit"),
    (["--base", "/nonexistent/sdxl"], "does not exist"),
    (["--base", "stabilityai/stable-diffusion-xl-base-1.0"], "hub id"),
])
def test_cli_errors_leave_out_untouched(tmp_path, capsys, extra, message):
    photo = tmp_path / "astronaut.png"
    from PIL import Image

    Image.fromarray(data.astronaut()).save(photo)
    out = tmp_path / "out"
    args = ["sample", "--config", "configs/sdxl.py:tiny", "--out", str(out), "--height", str(H), "--width", str(W)]
    rc = main(args + [str(photo) if a == "PHOTO" else a for a in extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
