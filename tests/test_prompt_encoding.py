"""Prompt encoding equals diffusers 0.42.1's ``encode_prompt`` of tiny random SDXL and SD 1.5 pipelines."""

import numpy as np
import pytest
import torch
import transformers
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTokenizer

from realisid_jax.config import load_config
from realisid_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from realisid_jax.text.prompt_encoding import encode_prompt_sd15, encode_prompt_sdxl
from realisid_jax.text.tokenizer import offline_clip_tokenizer, tokenizer_cache_dir
from realisid_jax.loading.pretrained import from_pretrained

TINY = load_config("configs/sdxl.py:tiny").model
PROMPTS = ["a photo of a cat wearing a red hat", "portrait of an astronaut, " * 12]  # the second is truncated
NEGATIVES = ["blurry, low quality", "cartoon"]


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _text_encoders(tmp_path_factory):
    """SDXL's pair as shipped: both configs with the legacy eos_token_id=2 (argmax pooling)."""
    reference, ours = [], []
    for name, theirs, mine in (("text_encoder", transformers.CLIPTextModel, CLIPTextModel),
                               ("text_encoder_2", transformers.CLIPTextModelWithProjection,
                                CLIPTextModelWithProjection)):
        torch.manual_seed(len(reference))
        model = _randomised(theirs(transformers.CLIPTextConfig(**{**TINY[name], "bos_token_id": 0,
                                                                   "eos_token_id": 2})))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        reference.append(model)
        ours.append(from_pretrained(mine, folder))
    return reference, ours


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    tokenizer = offline_clip_tokenizer()
    # SDXL's tokenizer_2 pads with "!" (id 0), so pooling must find the end-of-text token before the padding.
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(tokenizer_cache_dir()), pad_token="!")
    reference, ours = _text_encoders(tmp_path_factory)
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**TINY.vae), text_encoder=reference[0], text_encoder_2=reference[1], tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=UNet2DConditionModel(**TINY.unet), scheduler=EulerDiscreteScheduler(),
        add_watermarker=False)
    return pipe, (tokenizer, tokenizer_2), ours


def _assert_close(actual, reference, what):
    assert actual is not None and tuple(actual.shape) == tuple(reference.shape), what
    reference = reference.numpy()
    err = float(np.max(np.abs(np.asarray(actual) - reference)))
    bound = 1e-4 * max(1.0, float(np.max(np.abs(reference))))
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


@pytest.mark.parametrize("kwargs", [
    dict(negative_prompt=NEGATIVES),
    dict(negative_prompt="ugly", prompt_2=["an oil painting", "a watercolour"], num_images_per_prompt=2),
    dict(negative_prompt=None),  # force_zeros_for_empty_prompt: zeros
    dict(negative_prompt="", clip_skip=1),  # "" is not None: encoded; clip_skip on the conditional branch only
], ids=["negative", "prompt_2_repeat", "zeros_for_empty", "empty_string_clip_skip"])
def test_sdxl_matches_diffusers(sdxl, kwargs):
    pipe, tokenizers, encoders = sdxl
    with torch.no_grad():
        expected = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True, **kwargs)
    ours = encode_prompt_sdxl(PROMPTS, tokenizers, encoders, **kwargs)
    for name, actual, reference in zip(NAMES, ours, expected, strict=True):
        _assert_close(actual, reference, name)
    hidden = TINY.text_encoder.hidden_size + TINY.text_encoder_2.hidden_size
    assert ours.prompt_embeds.shape == (len(PROMPTS) * kwargs.get("num_images_per_prompt", 1), 77, hidden)
    if kwargs["negative_prompt"] is None:
        assert not np.asarray(ours.negative_prompt_embeds).any()
        assert not np.asarray(ours.negative_pooled_prompt_embeds).any()


def test_sdxl_without_guidance_and_without_forced_zeros(sdxl):
    pipe, tokenizers, encoders = sdxl
    ours = encode_prompt_sdxl(PROMPTS, tokenizers, encoders, do_classifier_free_guidance=False)
    assert ours.negative_prompt_embeds is None and ours.negative_pooled_prompt_embeds is None
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        with torch.no_grad():
            expected = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)
    ours = encode_prompt_sdxl(PROMPTS, tokenizers, encoders, force_zeros_for_empty_prompt=False)
    for name, actual, reference in zip(NAMES, ours, expected, strict=True):
        _assert_close(actual, reference, name)
    assert np.asarray(ours.negative_pooled_prompt_embeds).any()


def test_negative_prompt_batch_mismatch(sdxl):
    _, tokenizers, encoders = sdxl
    with pytest.raises(ValueError, match="batch size 1"):
        encode_prompt_sdxl(PROMPTS, tokenizers, encoders, negative_prompt=["only one"])


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    tokenizer = offline_clip_tokenizer()
    torch.manual_seed(0)
    reference = _randomised(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY.text_encoder)))
    folder = tmp_path_factory.mktemp("sd15_text_encoder")
    reference.save_pretrained(folder)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=TINY.text_encoder.hidden_size, norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**TINY.vae), text_encoder=reference, tokenizer=tokenizer,
                                   unet=unet, scheduler=EulerDiscreteScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe, tokenizer, from_pretrained(CLIPTextModel, folder)


@pytest.mark.parametrize("negative_prompt", [NEGATIVES, None], ids=["negative", "default_negative"])
def test_sd15_matches_diffusers(sd15, negative_prompt):
    pipe, tokenizer, encoder = sd15
    with torch.no_grad():
        expected = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=negative_prompt)
    ours = encode_prompt_sd15(PROMPTS, tokenizer, encoder, negative_prompt=negative_prompt)
    for name, actual, reference in zip(NAMES[:2], ours, expected, strict=True):
        _assert_close(actual, reference, name)


def test_sd15_clip_skip(sd15):
    """diffusers 0.42's SD 1.5 clip_skip path reads ``text_encoder.text_model``, which transformers 5's
    CLIPTextModel no longer has; its rule (hidden state clip_skip layers before the last, then
    final_layer_norm) is computed here with transformers directly."""
    pipe, tokenizer, encoder = sd15
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = pipe.text_encoder(ids, output_hidden_states=True)
        expected = pipe.text_encoder.final_layer_norm(reference.hidden_states[-2])
        expected_negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)[1]
    ours, negative = encode_prompt_sd15(PROMPTS, tokenizer, encoder, clip_skip=1)
    _assert_close(ours, expected, "prompt_embeds")
    assert not np.allclose(np.asarray(ours), reference.last_hidden_state.numpy(), atol=1e-3)
    _assert_close(negative, expected_negative, "negative_prompt_embeds")
