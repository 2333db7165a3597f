"""``config.realisid.branches_class``: the class of RealisID's trainable part, named by import path, is the one
the components, the trainer's initial weights and the pipeline build (docs/guides/extending.md); a name that
does not resolve to a ``RealisID`` subclass is one clear error."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from realisid_jax.config import load_config
from realisid_jax.realisid.branches import DEFAULT_BRANCHES_CLASS, RealisID, branches_class
from realisid_jax.realisid.components import abstract_branches, build_components, random_components
from realisid_jax.realisid.pipeline import RealisIDPipeline
from realisid_jax.sharding import DEFAULT_RULES, make_mesh
from realisid_jax.text.tokenizer import offline_clip_tokenizer
from realisid_jax.training.state import build_models

# The guide's tiny set-up: one layer per block, 64 px.
OVERRIDES = ["model.unet.layers_per_block=1", "model.unet.transformer_layers_per_block=(1,1)",
             "model.text_encoder.num_hidden_layers=1", "model.text_encoder_2.num_hidden_layers=1",
             "model.image_encoder.num_hidden_layers=1", "train.remat=False", "mesh.shape=(1,1,1)"]
SHIFT = 0.25


class ShiftedRealisID(RealisID):
    """RealisID plus a trainable scalar on the mid-block residual: a parameter and a forward the default lacks."""

    traces = 0

    def __init__(self, config, *, rngs, **kw):
        super().__init__(config, rngs=rngs, **kw)
        self.mid_shift = nnx.Param(jnp.full((), SHIFT, jnp.float32))

    @classmethod
    def from_unet(cls, unet, config, *, rngs=None):
        model = super().from_unet(unet, config, rngs=rngs)
        model.mid_shift = nnx.Param(jnp.full((), SHIFT, jnp.float32))  # from_unet leaves new parts abstract
        return model

    def residuals(self, *args, **kwargs):
        type(self).traces += 1
        down, mid = super().residuals(*args, **kwargs)
        return down, mid + self.mid_shift[...].astype(mid.dtype)


@pytest.fixture(scope="module")
def config():
    config = load_config("configs/sdxl.py:tiny", OVERRIDES)
    config.realisid.branches_class = f"{__name__}:ShiftedRealisID"
    return config


def test_default_is_realisid():
    assert load_config("configs/sdxl.py:tiny").realisid.branches_class == DEFAULT_BRANCHES_CLASS
    assert branches_class(load_config("configs/sdxl.py:tiny")) is RealisID
    # A config file that builds its own realisid section without the field gets the default too.
    assert branches_class(ml_collections.ConfigDict({"realisid": {"max_persons": 2}})) is RealisID
    assert branches_class(load_config("configs/sdxl.py:tiny", [
        "realisid.branches_class=realisid_jax.realisid.branches.RealisID"])) is RealisID


def test_every_build_site_builds_the_named_class(config):
    assert branches_class(config) is ShiftedRealisID
    assert isinstance(abstract_branches(config), ShiftedRealisID)
    abstract = nnx.eval_shape(lambda: build_components(config, nnx.Rngs(0)))
    assert isinstance(abstract.realisid, ShiftedRealisID)
    assert abstract.realisid.mid_shift.shape == ()
    # The trainer: the branch parameters it differentiates, and their initial values.
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    _, abstract_params, make_params = build_models(config, mesh, DEFAULT_RULES)
    assert abstract_params["mid_shift"].shape == ()
    assert float(make_params()["mid_shift"]) == SHIFT


def test_the_named_class_runs_in_the_forward_pass(config):
    components = random_components(config)
    realisid = components.realisid
    assert isinstance(realisid, ShiftedRealisID)
    b, k, s = 1, 2, realisid.config.local_latent_size
    rng = np.random.default_rng(0)
    inputs = dict(
        sample=jnp.asarray(rng.normal(size=(b, 8, 8, 4)), jnp.float32), timesteps=500,
        id_embedding=jnp.asarray(rng.normal(size=(b, k, 16, realisid.config.id_projection.output_dims)),
                                 jnp.float32),
        boxes=jnp.array([[[0.2, 0.2, 0.5, 0.5], [0.6, 0.1, 0.9, 0.4]]]), valid=jnp.array([[True, False]]),
        landmark_images=jnp.zeros((b, k, 8 * s, 8 * s, 3)),
        added_cond_kwargs={"text_embeds": jnp.zeros((b, 32)), "time_ids": jnp.full((b, 6), 64.0)})
    want_down, want_mid = RealisID.residuals(realisid, **inputs)
    got_down, got_mid = realisid.residuals(**inputs)
    for want, got in zip(want_down, got_down):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_allclose(np.asarray(got_mid), np.asarray(want_mid) + SHIFT, rtol=0, atol=1e-6)

    # The sampling loop the pipeline compiles calls the subclass's residuals.
    before = ShiftedRealisID.traces
    pipeline = RealisIDPipeline(components, (offline_clip_tokenizer(),) * 2, config)
    out = pipeline("a photo", [], height=64, width=64, num_inference_steps=1, progress=False)
    assert ShiftedRealisID.traces > before
    assert out.images.shape == (1, 64, 64, 3) and out.images.dtype == np.uint8


@pytest.mark.parametrize("path, reason", [
    ("realisid_jax.realisid.branches:NoSuchRealisID", "has no 'NoSuchRealisID'"),
    ("no_such_package.heads:HeadBranchRealisID", "cannot import 'no_such_package.heads'"),
    ("realisid_jax.realisid.ops:crop_and_resize", "is not a subclass of realisid_jax.realisid.branches.RealisID"),
    ("RealisID", "give an import path"),
])
def test_a_name_that_does_not_resolve_is_one_clear_error(path, reason):
    config = load_config("configs/sdxl.py:tiny", [f"realisid.branches_class={path}"])
    for build in (branches_class, abstract_branches, lambda c: random_components(c)):
        with pytest.raises(ValueError) as err:
            build(config)
        message = str(err.value)
        assert message.startswith(f"config.realisid.branches_class={path!r}: ") and reason in message
        assert "\n" not in message
