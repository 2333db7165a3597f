"""RealisID composition: K persons padded with a validity mask, sum/mean semantics, Eq. 3 reduction.

The sharded step (8 simulated devices) is in tests/test_realisid_sharded.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from realisid_jax.config import load_config
from realisid_jax.realisid.ops import crop_and_resize, location_mask, relocate_levels
from realisid_jax.models.id_projection import IDProjectionConfig
from realisid_jax.models.modeling_utils import count_params
from realisid_jax.realisid.branches import RealisID, RealisIDConfig
from realisid_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel

LATENT = 8  # latent side; local_latent_size is set to it, so a full box makes the crop the identity
PIXELS = 8 * LATENT


def _random_state(abstract: nnx.State, seed: int) -> nnx.State:
    """Host-side random weights for an abstract state (fast: no per-shape init programs to compile). Every
    leaf is random, including the zero-initialised ControlNet convs, so residuals are never trivially 0."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        if path[-1] == "scale":
            value = 1.0 + 0.1 * rng.normal(size=x.shape)
        elif path[-1] == "kernel":
            value = rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1]))
        else:
            value = 0.1 * rng.normal(size=x.shape)
        return jnp.asarray(value, x.dtype)

    return nnx.from_flat_state([(p, v.replace(fill(p, v))) for p, v in nnx.to_flat_state(abstract)])


def _random(abstract_module, seed: int):
    graphdef, abstract = nnx.split(abstract_module)
    return nnx.merge(graphdef, _random_state(abstract, seed))


@pytest.fixture(scope="module")
def tiny():
    config = load_config("configs/sdxl.py:tiny")
    config.realisid.local_latent_size = LATENT
    unet = _random(UNet2DConditionModel.abstract(UNet2DConditionConfig.from_dict(dict(config.model.unet))), 0)
    model = _random(RealisID.abstract(RealisIDConfig.from_config(config)), 1)
    return config, unet, model


def _inputs(config, b, k, seed=0):
    rng = np.random.default_rng(seed)
    rid = config.model.id_projection
    x0 = rng.uniform(0.0, 0.6, (b, k))
    y0 = rng.uniform(0.0, 0.6, (b, k))
    side = rng.uniform(0.1, 0.4, (b, k))
    return dict(
        sample=jnp.asarray(rng.normal(size=(b, LATENT, LATENT, 4)), jnp.float32),
        timesteps=jnp.asarray(rng.integers(0, 1000, b), jnp.float32),
        id_embedding=jnp.asarray(rng.normal(size=(b, k, rid.num_queries, rid.output_dims)), jnp.float32),
        boxes=jnp.asarray(np.stack([x0, y0, x0 + side, y0 + 1.2 * side], -1), jnp.float32),
        valid=jnp.ones((b, k), bool),
        landmark_images=jnp.asarray(rng.uniform(size=(b, k, PIXELS, PIXELS, 3)), jnp.float32),
        added_cond_kwargs=dict(text_embeds=jnp.asarray(rng.normal(size=(b, 32)), jnp.float32),
                               time_ids=jnp.tile(jnp.asarray([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]), (b, 1))),
    )


_residuals = jax.jit(lambda graphdef, state, inputs: nnx.merge(graphdef, state).residuals(**inputs), static_argnums=(0,))
_branch = jax.jit(lambda graphdef, state, sample, t, context, cond, added: nnx.merge(graphdef, state)(
    sample, t, context, cond, added_cond_kwargs=added), static_argnums=(0,))


def _run(model, inputs):
    return jax.tree.map(np.asarray, _residuals(*nnx.split(model), inputs))


def _person_fn(local_graph, local_state, global_graph, global_state, sample, t, context, box, landmarks, added, size):
    """One person of one image, each ControlNet called directly at batch 1: (relocated local levels, global
    levels), unbatched."""
    mask = location_mask(box, (8 * sample.shape[1], 8 * sample.shape[2]))[None]
    g_down, g_mid = nnx.merge(global_graph, global_state)(sample, t, context, mask, added_cond_kwargs=added)
    crop = crop_and_resize(sample[0], box, size)[None]
    box_h, box_w = (box[3] - box[1]) * 8 * sample.shape[1], (box[2] - box[0]) * 8 * sample.shape[2]
    local_added = dict(text_embeds=added["text_embeds"],
                       time_ids=jnp.stack([box_h, box_w, 0.0, 0.0, 8.0 * size, 8.0 * size])[None])
    l_down, l_mid = nnx.merge(local_graph, local_state)(crop, t, context, landmarks, added_cond_kwargs=local_added)
    g = [x[0] for x in (*g_down, g_mid)]
    return relocate_levels([x[0] for x in (*l_down, l_mid)], box, [x.shape[:2] for x in g]), g


_person = jax.jit(_person_fn, static_argnums=(0, 2, 10))


def _loop_reference(model, inputs):
    """Python loop over images and valid persons; local injections summed, global ones averaged."""
    c = model.config
    branches = (*nnx.split(model.local_branch), *nnx.split(model.global_branch))
    per_image = []
    for b in range(inputs["sample"].shape[0]):
        one = lambda x: x[b:b + 1]  # noqa: E731
        local_sum, global_sum, count = 0.0, 0.0, 0
        for k in np.flatnonzero(np.asarray(inputs["valid"][b])):
            loc, glob = _person(*branches, one(inputs["sample"]), one(inputs["timesteps"]),
                                inputs["id_embedding"][b, k][None], inputs["boxes"][b, k],
                                inputs["landmark_images"][b, k][None], jax.tree.map(one, inputs["added_cond_kwargs"]),
                                c.local_latent_size)
            local_sum = [s + np.asarray(x) for s, x in zip(local_sum or [0.0] * len(loc), loc)]
            global_sum = [s + np.asarray(x) for s, x in zip(global_sum or [0.0] * len(glob), glob)]
            count += 1
        per_image.append([c.local_scale * lo + c.global_scale * gl / count for lo, gl in zip(local_sum, global_sum)])
    levels = [np.stack(level) for level in zip(*per_image)]
    return levels[:-1], levels[-1]


def _assert_close(got, want, tol=1e-4):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g, w, atol=tol * scale, rtol=0)


def test_config_and_param_counts(tiny):
    _, _, model = tiny
    assert model.local_branch.config.conditioning_channels == 3
    assert model.global_branch.config.conditioning_channels == 1
    assert count_params(model) == (count_params(model.local_branch) + count_params(model.global_branch)
                                   + count_params(model.id_projection))
    with pytest.raises(ValueError, match="output_dims"):
        dataclasses.replace(model.config, id_projection=IDProjectionConfig(output_dims=32))


def test_from_unet_copies_the_encoder(tiny):
    config, unet, _ = tiny
    model = RealisID.from_unet(unet, RealisIDConfig.from_config(config), rngs=nnx.Rngs(3))
    unet_state = nnx.to_flat_state(nnx.state(unet, nnx.Param))
    unet_params = {path: v for path, v in unet_state}
    for branch in (model.local_branch, model.global_branch):
        copied = 0
        for path, v in nnx.to_flat_state(nnx.state(branch, nnx.Param)):
            if path[0] in ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block"):
                np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(unet_params[path].get_value()))
                copied += 1
            elif path[0] in ("controlnet_down_blocks", "controlnet_mid_block"):
                assert not np.any(np.asarray(v.get_value())), path  # Z2 starts at zero: a no-op branch
        assert copied > 0
    assert np.abs(np.asarray(model.id_projection.latents.get_value())).max() > 0


def test_sum_and_mean_match_python_loop(tiny):
    """K = 3 persons, image 0 with all three valid, image 1 with one: local summed, global averaged."""
    config, _, model = tiny
    inputs = _inputs(config, 2, 3)
    inputs["valid"] = jnp.asarray([[True, True, True], [False, True, False]])
    got = _run(model, inputs)
    want = _loop_reference(model, inputs)
    assert len(got[0]) == len(want[0]) == 6  # skips: conv_in, 2 resnets + downsampler, 2 resnets
    assert all(np.abs(x).max() > 0 for x in jax.tree.leaves(got))
    _assert_close(got, want)


def test_single_person(tiny):
    config, _, model = tiny
    inputs = _inputs(config, 2, 1, seed=1)
    _assert_close(_run(model, inputs), _loop_reference(model, inputs))


def test_padded_slot_is_ignored(tiny):
    """K = 3 with one invalid slot (garbage box, NaN inputs) equals K = 2 without it."""
    config, _, model = tiny
    two = _inputs(config, 2, 2, seed=3)
    three = dict(two)
    for name, garbage in (("boxes", jnp.asarray([0.9, 0.9, 0.1, 0.1])), ("id_embedding", jnp.nan),
                          ("landmark_images", jnp.nan)):
        pad = jnp.broadcast_to(jnp.asarray(garbage, jnp.float32), two[name][:, :1].shape)
        three[name] = jnp.concatenate([two[name][:, :1], pad, two[name][:, 1:]], axis=1)
    three["valid"] = jnp.asarray([[True, False, True]] * 2)
    got = _run(model, three)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(got))
    _assert_close(got, _run(model, two), tol=1e-6)


def test_no_valid_person_gives_zeros(tiny):
    config, _, model = tiny
    inputs = _inputs(config, 2, 2, seed=4)
    inputs["valid"] = jnp.zeros((2, 2), bool)
    assert all(np.all(x == 0) for x in jax.tree.leaves(_run(model, inputs)))


def test_full_box_reduces_to_naive_local_branch(tiny):
    """Paper Eq. 3: with a full-image box and S = latent size, the local branch runs on the whole latent."""
    config, _, model = tiny
    inputs = _inputs(config, 2, 1, seed=5)
    inputs["boxes"] = jnp.tile(jnp.asarray([[[0.0, 0.0, 1.0, 1.0]]]), (2, 1, 1))
    got = _run(model, inputs)
    c = model.config
    branches = (*nnx.split(model.local_branch), *nnx.split(model.global_branch))
    per_image = []
    for b in range(2):
        one = lambda x: x[b:b + 1]  # noqa: E731
        added = jax.tree.map(one, inputs["added_cond_kwargs"])
        context, landmarks = inputs["id_embedding"][b:b + 1, 0], inputs["landmark_images"][b:b + 1, 0]
        _, glob = _person(*branches, one(inputs["sample"]), one(inputs["timesteps"]), context, inputs["boxes"][b, 0],
                          landmarks, added, c.local_latent_size)
        local_added = dict(added, time_ids=jnp.asarray([[PIXELS, PIXELS, 0, 0, PIXELS, PIXELS]], jnp.float32))
        naive = _branch(*branches[:2], one(inputs["sample"]), one(inputs["timesteps"]), context, landmarks,
                        local_added)
        per_image.append([c.local_scale * np.asarray(n[0]) + c.global_scale * np.asarray(g)
                          for n, g in zip((*naive[0], naive[1]), glob)])
    levels = [np.stack(level) for level in zip(*per_image)]
    _assert_close(got, (levels[:-1], levels[-1]), tol=1e-5)


def test_encode_id_keeps_leading_axes(tiny):
    config, _, model = tiny
    hidden = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 257, config.model.id_projection.embed_dims)),
                         jnp.float32)

    def both(graphdef, state, hidden):
        rid = nnx.merge(graphdef, state)
        return rid.encode_id(hidden), rid.id_projection(hidden[1, 2][None])[0]

    p_id, single = jax.jit(both, static_argnums=(0,))(*nnx.split(model), hidden)
    assert p_id.shape == (2, 3, 16, config.model.id_projection.output_dims)
    np.testing.assert_allclose(np.asarray(p_id[1, 2]), np.asarray(single), atol=1e-5)


def _with_persons_per_pass(model, per_pass):
    """The same weights, run ``per_pass`` persons at a time (0: all in one pass)."""
    return _random(RealisID.abstract(dataclasses.replace(model.config, persons_per_pass=per_pass)), 1)


@pytest.mark.parametrize("per_pass", [1, 2])
def test_persons_in_sequence_give_the_same_sum(tiny, per_pass):
    """persons_per_pass P < K: the passes in a lax.scan (K = 3 padded to a multiple of P) sum to the one-pass
    residuals; an image with one valid person and one with none included."""
    config, _, model = tiny
    inputs = _inputs(config, 3, 3, seed=6)
    inputs["valid"] = jnp.asarray([[True, True, True], [False, True, False], [False, False, False]])
    one_pass = _run(_with_persons_per_pass(model, 0), inputs)
    _assert_close(_run(_with_persons_per_pass(model, per_pass), inputs), one_pass, tol=1e-6)
    assert all(np.all(x[2] == 0) for x in jax.tree.leaves(one_pass))


def test_persons_in_sequence_hold_one_pass_of_activations(tiny):
    """The point of persons_per_pass: the compiled residuals of K = 4 persons one at a time need less than
    half the temporary memory of the four in one pass (XLA:CPU memory analysis)."""
    config, _, model = tiny
    inputs = _inputs(config, 2, 4, seed=7)

    def temporaries(per_pass):
        graphdef, state = nnx.split(_with_persons_per_pass(model, per_pass))
        compiled = _residuals.lower(graphdef, state, inputs).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temporaries(1) < 0.5 * temporaries(4)
    with pytest.raises(ValueError, match="persons_per_pass"):
        dataclasses.replace(model.config, persons_per_pass=-1)
