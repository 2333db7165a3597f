"""TPU splash (flash) attention: the Pallas kernel of ``jax.experimental.pallas.ops.tpu.splash_attention``.

The config's ``attention_impl="splash"``. The kernel never materialises the (B, heads, Lq, Lk) logits: blocks of
queries and keys stream through VMEM with an online softmax (FlashAttention), and its backward pass recomputes
them. As maxdiffusion's ``_tpu_flash_attention`` (``models/attention_flax.py``): a full (non-causal) mask, keys
padded to a whole number of blocks and masked by segment ids, one kernel per batch element (``vmap``), and
``shard_map`` over the active mesh because XLA cannot partition a Pallas call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from realisid_jax.sharding import active_rules, logical_to_spec

# maxdiffusion's default query block (``_select_flash_block_sizes``): 1024 rows of bf16, 512 of float32, keep a
# block's logits (block_q x block_kv float32, 4 MiB) and its q/k/v tiles within a v5e core's scoped VMEM.
_MAX_BLOCK = {2: 1024, 4: 512}
_LANES = 128  # blocks are whole multiples of the TPU's 128 lanes
# Block rows x head_dim per kernel, so that wide heads take shorter blocks: 1024 x 512 forward, 512 x 512 backward
# compile for v5e at the VAE's head_dim 512 (docs/benchmarks.md, "TPU attention").
_FORWARD_ELEMENTS, _BACKWARD_ELEMENTS = 2**19, 2**18
# Keys shorter than this stay on XLA attention: the UNet's text (77) and ID (16) cross-attention, the CLIP towers
# (77 / 257 tokens). XLA fuses their small logits whole, and padded to a 128-key block they cost the kernel
# 1.2-2.7x XLA's roofline estimate; 256 keys are a wash, 1024 a 2.2x gain (docs/benchmarks.md, "TPU attention").
# maxdiffusion does the same (flash_min_seq_length).
MIN_KEYS = 512


def applies(key_length: int, mask: jax.Array | None, is_causal: bool) -> bool:
    """Whether ``attention(implementation="splash")`` runs the kernel: no explicit or causal mask (the CLIP text
    encoder's 77 causal tokens keep XLA) and at least ``MIN_KEYS`` keys."""
    return mask is None and not is_causal and key_length >= MIN_KEYS


def block_sizes(query_length: int, key_length: int, head_dim: int, dtype) -> kernel_lib.BlockSizes:
    """Forward and backward blocks for one head's (Lq, Lk, head_dim): ``_MAX_BLOCK`` rows, fewer for a shorter
    sequence (rounded up to whole lanes; the sequence is then padded to a whole number of blocks) or a wider head
    (the VAE's 512: its backward kernels' float32 dK/dV accumulators and double-buffered tiles exceed v5e's 16 MiB
    of scoped VMEM at 1024 rows; the TPU compiler refuses them)."""
    largest = _MAX_BLOCK.get(jnp.dtype(dtype).itemsize, 512)
    bq = min(largest, _round_up(query_length, _LANES), _power_of_two_at_most(_FORWARD_ELEMENTS // head_dim))
    bkv = min(largest, _round_up(key_length, _LANES), _power_of_two_at_most(_FORWARD_ELEMENTS // head_dim))
    bq_bwd, bkv_bwd = (_divisor_at_most(b, _BACKWARD_ELEMENTS // head_dim) for b in (bq, bkv))
    return kernel_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq_bwd,
                                 block_kv_dkv=bkv_bwd, block_kv_dkv_compute=bkv_bwd, block_q_dq=bq_bwd,
                                 block_kv_dq=bkv_bwd)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False) -> jax.Array:
    """Softmax(q k^T / sqrt(head_dim)) v by the TPU splash kernel, sharded over the active mesh's batch (and head)
    axes by the logical rules (``activation_batch``, ``activation_heads``); called directly with no mesh.

    Args:
      q: (B, Lq, heads, head_dim); k, v: (B, Lk, heads, head_dim); bfloat16 or float32. Any lengths: both are
        padded to whole blocks, padded keys masked out.
      interpret: run the kernel in Pallas' interpreter (CPU tests; the TPU program is the compiled kernel).

    Returns:
      (B, Lq, heads, head_dim), dtype of ``q``; the same maths as ``jax.nn.dot_product_attention``.
    """
    rules = active_rules()
    if rules is None:
        return _splash(q, k, v, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    # Batch and heads split, lengths whole: each device runs the kernel on its own batch elements and heads.
    spec = logical_to_spec(("activation_batch", None, "activation_heads", None), q.shape, mesh, rules)
    body = jax.shard_map(lambda *qkv: _splash(*qkv, interpret=interpret), mesh=mesh, in_specs=(spec,) * 3,
                         out_specs=spec, check_vma=False)
    return body(q, k, v)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool) -> jax.Array:
    """One device's splash attention, (B, L, heads, head_dim) in and out."""
    _, lq, heads, head_dim = q.shape
    lk = k.shape[1]
    blocks = block_sizes(lq, lk, head_dim, q.dtype)
    q_len, kv_len = _round_up(lq, blocks.block_q), _round_up(lk, blocks.block_kv)
    # The kernel's layout is (heads, L, head_dim) per batch element; it does not scale the logits.
    q = _to_kernel_layout(q * jnp.asarray(head_dim ** -0.5, q.dtype), q_len)
    k, v = _to_kernel_layout(k, kv_len), _to_kernel_layout(v, kv_len)
    # Segment 1 = real token; padded keys are segment 0 and receive no weight. Padded query rows are dropped below.
    segments = kernel_lib.SegmentIds(q=jnp.ones((q_len,), jnp.int32),
                                     kv=(jnp.arange(kv_len) < lk).astype(jnp.int32))
    mask = mask_lib.MultiHeadMask([mask_lib.FullMask((q_len, kv_len))] * heads)
    kernel = kernel_lib.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                        interpret=interpret)
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, segments if kv_len > lk else None)
    return jnp.swapaxes(out[:, :, :lq], 1, 2)


def _to_kernel_layout(x: jax.Array, length: int) -> jax.Array:
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0))) if length > x.shape[2] else x


def _power_of_two_at_most(n: int) -> int:
    return max(_LANES, 1 << (n.bit_length() - 1))


def _divisor_at_most(block: int, limit: int) -> int:
    """The largest whole-lane divisor of ``block`` up to ``limit`` (at least one lane row block)."""
    return max(d for d in range(_LANES, max(_LANES, limit) + 1, _LANES) if block % d == 0)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
