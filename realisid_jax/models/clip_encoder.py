"""The transformer shared by CLIP's text and vision towers (pre-LayerNorm encoder layers), tokens (B, L, C).

Mirrors transformers ``models/clip/modeling_clip.py`` (``CLIPAttention``, ``CLIPMLP``, ``CLIPEncoderLayer``,
``CLIPEncoder``) with the same attribute names, so a transformers state dict loads by the mechanical rename.
The configs passed in are ``clip_text.CLIPTextConfig`` or ``clip_vision.CLIPVisionConfig``; both carry
``hidden_size``, ``intermediate_size``, ``num_attention_heads``, ``num_hidden_layers``, ``hidden_act`` and
``layer_norm_eps``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from realisid_jax.models.layer_scan import ScannedLayers, scan_layers
from realisid_jax.models.layers import TOKENS, attention, layer_norm, linear
from realisid_jax.sharding import constrain


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of GELU (transformers ``QuickGELUActivation``)."""
    return x * jax.nn.sigmoid(1.702 * x)


# transformers ``ACT2FN`` names used by CLIP checkpoints.
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str):
    """The activation function called ``name`` in a CLIP config. Raises ValueError for an unknown name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported CLIP hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class CLIPAttention(nnx.Module):
    """transformers ``CLIPAttention``: multi-head self-attention with biased ``q_proj``/``k_proj``/``v_proj``/
    ``out_proj``; scale 1/sqrt(head_dim)."""

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = "xla"):
        dim = config.hidden_size
        if dim % config.num_attention_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_attention_heads {config.num_attention_heads}")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.heads = config.num_attention_heads
        self.attention_impl = attention_impl
        self.k_proj = linear(dim, dim, ("embed", "heads"), **kw)
        self.v_proj = linear(dim, dim, ("embed", "heads"), **kw)
        self.q_proj = linear(dim, dim, ("embed", "heads"), **kw)
        self.out_proj = linear(dim, dim, ("heads", "embed"), **kw)

    def __call__(self, hidden_states: jax.Array, *, mask: jax.Array | None = None,
                 is_causal: bool = False) -> jax.Array:
        """hidden_states (B, L, C); mask boolean, broadcastable to (B, heads, L, L), True = attend."""
        out = attention(self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states),
                        self.heads, implementation=self.attention_impl, mask=mask, is_causal=is_causal)
        return constrain(self.out_proj(out), TOKENS)


class CLIPMLP(nnx.Module):
    """transformers ``CLIPMLP``: ``fc1`` -> ``hidden_act`` -> ``fc2``."""

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.act = activation(config.hidden_act)
        self.fc1 = linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = linear(config.intermediate_size, config.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return constrain(self.fc2(self.act(self.fc1(x))), TOKENS)


class CLIPEncoderLayer(nnx.Module):
    """transformers ``CLIPEncoderLayer``: pre-LayerNorm attention and MLP, each with a residual."""

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = "xla"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = CLIPAttention(config, attention_impl=attention_impl, **kw)
        self.layer_norm1 = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(config, **kw)
        self.layer_norm2 = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)

    def __call__(self, hidden_states: jax.Array, *, mask: jax.Array | None = None,
                 is_causal: bool = False) -> jax.Array:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), mask=mask,
                                                       is_causal=is_causal)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(ScannedLayers, nnx.Module):
    """transformers ``CLIPEncoder``: ``layers[0 .. num_hidden_layers-1]``, one ``lax.scan`` with ``scan_layers``."""

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = "xla"):
        self.layers = nnx.List([
            CLIPEncoderLayer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
            for _ in range(config.num_hidden_layers)])

    def __call__(self, inputs_embeds: jax.Array, *, mask: jax.Array | None = None,
                 is_causal: bool = False) -> tuple[jax.Array, ...]:
        """Runs every layer on ``inputs_embeds`` (B, L, C).

        Returns:
          ``num_hidden_layers + 1`` arrays (B, L, C): the input, then each layer's output, as transformers'
          ``output_hidden_states=True`` (the last one is the encoder output, before any final norm).
        """
        states = [constrain(inputs_embeds, TOKENS)]
        if self.scan_layers and len(self.layers) > 1:
            _, outputs = scan_layers(self.layers, states[0], keep_outputs=True, mask=mask, is_causal=is_causal)
            return (states[0], *outputs)
        for layer in self.layers:
            states.append(layer(states[-1], mask=mask, is_causal=is_causal))
        return tuple(states)
