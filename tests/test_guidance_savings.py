"""Fewer predictions for the same images: the steps before the ID starts run two predictions (ε_t&i = ε_t), and on
SD 1.5 (branches blind to the text) ε_none and ε_t share one branch pass; against Eq. 8 as three predictions with
their own branch passes at every step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realisid_jax.config import load_config
from realisid_jax.realisid import batch, pipeline
from realisid_jax.realisid.conditions import default_person
from realisid_jax.realisid.pipeline import RealisIDPipeline

H = W = 128
STEPS = 4


def _config(family: str):
    config = load_config("configs/sdxl.py:tiny")
    if family == "sd15":  # one 32-wide text tower, no added conditions: the branches do not see the text
        config.model.text_encoder_2 = None
        config.model.unet.update(addition_embed_type=None, addition_time_embed_dim=None,
                                 projection_class_embeddings_input_dim=None, cross_attention_dim=32)
        config.model.id_projection["output_dims"] = 32
    return config


def _pipeline(family: str) -> RealisIDPipeline:
    """Random models with every branch weight perturbed (zero convs too), so the ID and the persons matter."""
    pipe = RealisIDPipeline.from_config(_config(family))
    rng = np.random.default_rng(0)
    params = pipe._state["realisid"].to_pure_dict()
    pipe.set_branch_params(jax.tree.map(lambda x: x + 0.02 * rng.standard_normal(x.shape).astype(x.dtype), params))
    return pipe


def three_predictions(models, x_in, t, ids, persons, text, time_ids, guidance):
    """Eq. 8 as three predictions at every step, each with its own branch pass ("no ID" in ε_t&i before the ID
    starts)."""
    no_id, with_id = ids
    p_id = jnp.concatenate([no_id, no_id, no_id if with_id is None else with_id])
    context, added = pipeline.guidance_text(text, time_ids, 3)
    x3 = jnp.concatenate([x_in] * 3)
    down, mid = models.realisid.residuals(x3, t, p_id, *(jnp.concatenate([p] * 3) for p in persons), added)
    eps = models.unet(x3, t, context, added_cond_kwargs=added, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid)
    e_none, e_text, e_id = jnp.split(eps, 3)
    return e_none + guidance.text_scale * (e_text - e_none) + guidance.id_scale * (e_id - e_text)


def _sample(pipe):
    return pipe("a photo", [default_person(H, W)], height=H, width=W, num_inference_steps=STEPS, id_start_fraction=0.5,
                num_images=2, seed=1, progress=False)


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_fewer_predictions_give_the_same_images(family, monkeypatch):
    pipe = _pipeline(family)
    fewer = _sample(pipe)
    monkeypatch.setattr(pipeline, "guided_noise_pred", three_predictions)
    pipeline._denoise.clear_cache()
    try:
        reference = _sample(pipe)
    finally:
        pipeline._denoise.clear_cache()
    np.testing.assert_allclose(fewer.latents, reference.latents, atol=1e-5, rtol=1e-5)
    assert np.abs(fewer.images.astype(int) - reference.images.astype(int)).max() <= 1
    assert np.abs(fewer.latents[0] - fewer.latents[1]).max() > 0.1  # two images, two noises: not a trivial check


def _step_flops(pipe, with_id: bool) -> float:
    """XLA's cost analysis of one guided step (the ``_denoise`` phase compiled for one image, one person)."""
    calls = []
    denoise = pipeline._denoise
    pipeline._denoise = lambda *a, **kw: calls.append((a, kw)) or denoise(*a, **kw)
    try:
        _sample(pipe)
    finally:
        pipeline._denoise = denoise
    args, kw = next((a, kw) for a, kw in calls if kw["with_id"] == with_id)
    cost = denoise.lower(*args, **kw).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_a_step_before_the_id_costs_two_thirds(family):
    """Two predictions instead of three; on SD 1.5 the step with the ID also saves one of three branch passes."""
    pipe = _pipeline(family)
    before, with_id = _step_flops(pipe, False), _step_flops(pipe, True)
    assert before < 0.7 * with_id, (before, with_id)


def test_sample_batch_mixes_id_starts_exactly():
    """sample-batch runs two predictions until the batch's earliest ID start, then three with each image's own
    start: each image as the pipeline samples it alone."""
    pipe = _pipeline("sdxl")
    person = default_person(H, W)
    conditions = pipe.prepare([person], H, W)
    requests = [batch.SampleRequest(id=f"r{seed}", prompt="a photo", persons=(person,), seed=seed, height=H, width=W,
                                    num_inference_steps=STEPS, id_start_fraction=fraction).with_defaults(
                                        pipe.config.sampling) for seed, fraction in ((1, 0.25), (2, 0.75))]
    key = batch.group_key(requests[0], pipe.config.realisid.max_persons)
    sampler = batch.BatchSampler(pipe, batch_size=2)
    rows = [batch.Row(request, conditions, 0) for request in requests]
    images = np.asarray(sampler.run(key, sampler.host_inputs(key, rows)))
    for request, image in zip(requests, images):
        alone = pipe("a photo", conditions, height=H, width=W, num_inference_steps=STEPS, seed=request.seed,
                     id_start_fraction=request.id_start_fraction, progress=False).images[0]
        assert np.abs(image.astype(int) - alone.astype(int)).max() <= 1
