"""Prompt -> text conditioning, as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` and
``StableDiffusionPipeline.encode_prompt`` (diffusers 0.42) compute it.

Tokenisation runs on the host (``realisid_jax.text.tokenizer.tokenize``); the encoders run in one ``jax.jit``
(``sdxl_text_embeddings`` / ``sd15_text_embeddings`` are pure and can also be called inside a larger jitted
function). Prompt weighting, textual inversion and LoRA scaling are not provided.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import CLIPTokenizer

from realisid_jax.config import ConfigError
from realisid_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from realisid_jax.text.tokenizer import tokenize

TextEncoder = CLIPTextModel | CLIPTextModelWithProjection
Prompts = str | Sequence[str]
NO_TEXT = ("empty_prompt", "zeros")


def no_text_setting(config) -> str:
    """``config.realisid.no_text``: what "no text" is, for training's text dropout and for sampling's ε_none
    when the negative prompt is empty. ``"empty_prompt"``: the encoded empty prompt ``""``; ``"zeros"``: all-zero
    prompt (and pooled) embeddings, diffusers' SDXL ``force_zeros_for_empty_prompt``.

    Raises:
      ConfigError: any other value.
    """
    value = config.realisid.no_text
    if value not in NO_TEXT:
        raise ConfigError(f"--config.realisid.no_text={value}: expected one of {', '.join(NO_TEXT)}")
    return value


class SDXLPromptEmbeds(NamedTuple):
    """SDXL conditioning, in the order diffusers' ``encode_prompt`` returns it.

    Attributes:
      prompt_embeds: (B * num_images_per_prompt, 77, 768 + 1280) for SDXL: both encoders' penultimate hidden
        states, concatenated on the feature axis.
      negative_prompt_embeds: same shape, or ``None`` without classifier-free guidance.
      pooled_prompt_embeds: (B * num_images_per_prompt, 1280): ``text_embeds`` of the projection encoder.
      negative_pooled_prompt_embeds: same shape, or ``None`` without classifier-free guidance.
    """

    prompt_embeds: jax.Array
    negative_prompt_embeds: jax.Array | None
    pooled_prompt_embeds: jax.Array
    negative_pooled_prompt_embeds: jax.Array | None


def sdxl_text_embeddings(text_encoders: Sequence[TextEncoder], input_ids: Sequence[jax.Array], *,
                         clip_skip: int | None = None) -> tuple[jax.Array, jax.Array]:
    """SDXL's text conditioning from token ids (pure, jittable).

    Args:
      text_encoders: SDXL's ``(CLIPTextModel, CLIPTextModelWithProjection)``, or the latter alone.
      input_ids: one (B, 77) int array per encoder.
      clip_skip: use the hidden state ``clip_skip`` layers before the penultimate one (diffusers' ``clip_skip``).

    Returns:
      prompt_embeds (B, 77, sum of hidden sizes) and pooled (B, projection_dim): the ``text_embeds`` of the first
      encoder with a projection, as diffusers keeps the first 2-D output.

    Raises:
      ValueError: no encoder has a projection.
    """
    outputs = [encoder(ids) for encoder, ids in zip(text_encoders, input_ids, strict=True)]
    pooled = [o.text_embeds for o in outputs if o.text_embeds is not None]
    if not pooled:
        raise ValueError("SDXL needs a CLIPTextModelWithProjection among the text encoders for the pooled embedding")
    hidden = [o.hidden_states[-((clip_skip or 0) + 2)] for o in outputs]
    return jnp.concatenate(hidden, axis=-1), pooled[0]


def sd15_text_embeddings(text_encoder: CLIPTextModel, input_ids: jax.Array, *,
                         clip_skip: int | None = None) -> jax.Array:
    """SD 1.5's text conditioning (pure, jittable): the last hidden state, or with ``clip_skip`` the hidden state
    ``clip_skip`` layers earlier passed through ``final_layer_norm`` (diffusers' rule). (B, 77) -> (B, 77, 768)."""
    out = text_encoder(input_ids)
    if clip_skip is None:
        return out.last_hidden_state
    return text_encoder.text_model.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


@functools.partial(jax.jit, static_argnames=("graphdefs", "clip_skip"))
def _sdxl_jit(graphdefs, states, input_ids, clip_skip):
    encoders = [nnx.merge(g, s) for g, s in zip(graphdefs, states)]
    return sdxl_text_embeddings(encoders, input_ids, clip_skip=clip_skip)


@functools.partial(jax.jit, static_argnames=("graphdef", "clip_skip"))
def _sd15_jit(graphdef, state, input_ids, clip_skip):
    return sd15_text_embeddings(nnx.merge(graphdef, state), input_ids, clip_skip=clip_skip)


def _as_list(prompts: Prompts) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _negatives(negative: Prompts, batch_size: int) -> list[str]:
    """A string is repeated per prompt; a list must have one entry per prompt (diffusers' check)."""
    if isinstance(negative, str):
        return [negative] * batch_size
    if len(negative) != batch_size:
        raise ValueError(f"`negative_prompt` has batch size {len(negative)}, but `prompt` has batch size "
                         f"{batch_size}")
    return list(negative)


def _repeat(x: jax.Array | None, n: int) -> jax.Array | None:
    """Each row ``n`` times in a row, as diffusers' ``repeat(1, n, 1).view(B * n, ...)``."""
    return x if x is None or n == 1 else jnp.repeat(x, n, axis=0)


def encode_prompt_sdxl(prompt: Prompts, tokenizers: Sequence[CLIPTokenizer], text_encoders: Sequence[TextEncoder],
                       *, prompt_2: Prompts | None = None, negative_prompt: Prompts | None = None,
                       negative_prompt_2: Prompts | None = None, do_classifier_free_guidance: bool = True,
                       force_zeros_for_empty_prompt: bool = True, num_images_per_prompt: int = 1,
                       clip_skip: int | None = None) -> SDXLPromptEmbeds:
    """diffusers ``StableDiffusionXLPipeline.encode_prompt`` (without precomputed embeddings or LoRA).

    Args:
      prompt: one prompt or a list (batch B), for the first tokenizer/encoder; ``prompt_2`` (default ``prompt``)
        for the second.
      tokenizers, text_encoders: SDXL's ``(tokenizer, tokenizer_2)`` and ``(text_encoder, text_encoder_2)``.
      negative_prompt, negative_prompt_2: the unconditional branch's prompts (``negative_prompt_2`` defaults to
        ``negative_prompt``). When ``negative_prompt`` is ``None`` and ``force_zeros_for_empty_prompt`` (SDXL
        base's pipeline config), the unconditional embeddings are zeros; otherwise ``None`` encodes ``""``.
      do_classifier_free_guidance: compute the unconditional branch.
      num_images_per_prompt: each row repeated this many times in a row.
      clip_skip: as diffusers, applied to the conditional branch only.

    Returns:
      ``SDXLPromptEmbeds``, arrays of the encoders' computation dtype.

    Raises:
      ValueError: a ``negative_prompt`` list whose length differs from the number of prompts.
    """
    prompts = _as_list(prompt)
    prompts_2 = _as_list(prompt_2 or prompt)
    graphdefs, states = zip(*(nnx.split(e) for e in text_encoders), strict=True)
    ids = [tokenize(tok, p) for tok, p in zip(tokenizers, (prompts, prompts_2))]
    embeds, pooled = _sdxl_jit(graphdefs, states, ids, clip_skip)
    negative_embeds = negative_pooled = None
    if do_classifier_free_guidance and negative_prompt is None and force_zeros_for_empty_prompt:
        negative_embeds, negative_pooled = jnp.zeros_like(embeds), jnp.zeros_like(pooled)
    elif do_classifier_free_guidance:
        negatives = _negatives(negative_prompt or "", len(prompts))
        negatives_2 = _negatives(negative_prompt_2 or negative_prompt or "", len(prompts))
        ids = [tokenize(tok, p, max_length=embeds.shape[1]) for tok, p in zip(tokenizers, (negatives, negatives_2))]
        negative_embeds, negative_pooled = _sdxl_jit(graphdefs, states, ids, None)
    n = num_images_per_prompt
    return SDXLPromptEmbeds(_repeat(embeds, n), _repeat(negative_embeds, n), _repeat(pooled, n),
                            _repeat(negative_pooled, n))


def encode_prompt_sd15(prompt: Prompts, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, *,
                       negative_prompt: Prompts | None = None, do_classifier_free_guidance: bool = True,
                       num_images_per_prompt: int = 1,
                       clip_skip: int | None = None) -> tuple[jax.Array, jax.Array | None]:
    """diffusers ``StableDiffusionPipeline.encode_prompt`` (text encoders without ``use_attention_mask``).

    Args:
      prompt: one prompt or a list (batch B).
      negative_prompt: the unconditional branch's prompts; ``None`` encodes ``""``.
      clip_skip: as diffusers, applied to the conditional branch only.

    Returns:
      (prompt_embeds, negative_prompt_embeds), each (B * num_images_per_prompt, 77, hidden_size); the second is
      ``None`` without classifier-free guidance.

    Raises:
      ValueError: a ``negative_prompt`` list whose length differs from the number of prompts.
    """
    prompts = _as_list(prompt)
    graphdef, state = nnx.split(text_encoder)
    embeds = _sd15_jit(graphdef, state, tokenize(tokenizer, prompts), clip_skip)
    negative_embeds = None
    if do_classifier_free_guidance:
        negatives = _negatives(negative_prompt or "", len(prompts))
        negative_embeds = _sd15_jit(graphdef, state, tokenize(tokenizer, negatives, max_length=embeds.shape[1]),
                                    None)
    return _repeat(embeds, num_images_per_prompt), _repeat(negative_embeds, num_images_per_prompt)
