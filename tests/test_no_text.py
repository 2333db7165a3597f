"""One "no text" (``config.realisid.no_text``): training's text dropout and sampling's ε_none with an empty
negative prompt get the same embeddings (up to float rounding: different batches and jits), for each setting, on
SDXL and SD 1.5 (tiny random text encoders)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from realisid_jax.config import ConfigError, load_config
from realisid_jax.models.registry import FROZEN, dtypes, frozen_configs
from realisid_jax.realisid.components import Components
from realisid_jax.realisid.pipeline import RealisIDPipeline
from realisid_jax.text.tokenizer import offline_clip_tokenizer, tokenize
from realisid_jax.training.step import StepSettings, text_conditioning

PROMPT = "a photo of a person"
CLOSE = dict(rtol=1e-5, atol=1e-6)


def _config(family, no_text):
    config = load_config("configs/sdxl.py:tiny", [f"realisid.no_text={no_text}"])
    if family == "sd15":  # only the text encoders run here
        config.model.text_encoder_2 = None
    return config


def _text_only_pipeline(config):
    """The pipeline over the text encoders alone (encode_prompt runs nothing else): seconds, not minutes."""
    encoders = {name: cls(cfg, rngs=nnx.Rngs(0), **dtypes(config))
                for name, (cls, cfg) in frozen_configs(config).items() if name.startswith("text_encoder")}
    components = Components(**{name: encoders.get(name) for name in FROZEN}, realisid=None)
    return RealisIDPipeline(components, (offline_clip_tokenizer(),) * len(encoders), config)


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
@pytest.mark.parametrize("no_text", ["empty_prompt", "zeros"])
def test_dropped_text_equals_the_negative_branch(family, no_text):
    config = _config(family, no_text)
    pipe = _text_only_pipeline(config)
    _, negative, _, negative_pooled = pipe.encode_prompt(PROMPT, "", 1)

    settings = StepSettings.from_config(config, [tokenize(t, "")[0] for t in pipe.tokenizers])
    ids = [jnp.asarray(np.concatenate([tokenize(t, PROMPT), tokenize(t, "")])) for t in pipe.tokenizers]
    dropped = jnp.array([True, False])  # row 0: the prompt, dropped; row 1: the empty prompt, kept
    embeds, pooled = text_conditioning(pipe.components, ids, dropped, settings)

    np.testing.assert_allclose(np.asarray(embeds[:1]), np.asarray(negative), **CLOSE)
    if no_text == "zeros":
        assert not np.asarray(negative).any()
    else:  # the kept empty prompt is the dropped row: "no text" is the encoded ""
        np.testing.assert_allclose(np.asarray(embeds[1:]), np.asarray(negative), **CLOSE)
    if family == "sdxl":
        np.testing.assert_allclose(np.asarray(pooled[:1]), np.asarray(negative_pooled), **CLOSE)
        assert np.asarray(negative_pooled).any() == (no_text == "empty_prompt")
    else:
        assert pooled is None and negative_pooled is None


def test_unknown_setting_is_a_config_error():
    config = _config("sdxl", "nothing")
    with pytest.raises(ConfigError, match="no_text=nothing: expected one of empty_prompt, zeros"):
        StepSettings.from_config(config, [(0,)] * 2)
