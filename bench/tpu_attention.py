"""XLA attention against the TPU splash kernel at SDXL's 1024-px attention shapes, as compiled for one TPU v5e chip.

    python bench/tpu_attention.py [--topology v5e:2x2] [--batch 1,2]

Nothing runs: each program is compiled ahead of time by libtpu on this host for the first chip of the topology
(``realisid_jax.training.aot.topology_devices``), and the figures are the TPU compiler's:

* temp: ``memory_analysis().temp_size_in_bytes``, the program's HBM scratch (XLA attention's logits and
  softmax; the kernel keeps them in VMEM).
* roofline: ``cost_analysis()["optimal_seconds"]``, the compiler's roofline estimate, not a measured time. The
  compiler has no cost model for a Pallas call (nor for some of its own custom calls, e.g. ``ConcatBitcast``):
  each such op adds -1 s to its total, so the figure here is the total modulo 1 s, the sum over the ops it does
  cost. For splash programs that sum counts the kernel's HBM operands but none of its FLOPs; the splash column
  adds the kernel's FLOPs at the compiler's own peak rate (calibrated from an 8192^2 bf16 matmul), a sum rather
  than a max and so on the kernel's unfavourable side. Neither figure models head_dim 64 filling half of the
  128-wide MXU.

Inputs are (B, L, heads * head_dim) bfloat16 as ``models.layers.attention`` receives them; "fwd+bwd" is
``jax.grad`` of the f32 sum of the output with respect to query, key and value. "splash" here always runs the
kernel (keys padded to a block); the last column says what ``attention_impl="splash"`` runs for that shape
(``models.splash.applies``). A second table compiles SDXL's full-size ``BasicTransformerBlock`` (self-attention,
77-token text cross-attention, GEGLU feed-forward; bf16 weights), forward and backward with respect to its weights
and input, with ``attention_impl`` "xla" and "splash".
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

# Before libtpu loads: other processes may hold it, and no metadata server answers on this host.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from realisid_jax.models import splash  # noqa: E402
from realisid_jax.models.layers import attention  # noqa: E402
from realisid_jax.models.transformer_2d import BasicTransformerBlock  # noqa: E402
from realisid_jax.training.aot import topology_devices  # noqa: E402

# (name, Lq, Lk, heads, head_dim) at 1024 px: 128x128 latents, transformer blocks at 64x64 (640 channels, 10
# heads) and 32x32 (1280, 20 heads); the local branch's crops are up-sampled to the same 64x64 latent.
SHAPES = (
    ("self 64x64", 4096, 4096, 10, 64),
    ("self 32x32", 1024, 1024, 20, 64),
    ("text 64x64", 4096, 77, 10, 64),
    ("text 32x32", 1024, 77, 20, 64),
    ("ID 64x64", 4096, 16, 10, 64),
    ("VAE mid 128x128", 16384, 16384, 1, 512),
    ("self 16x16", 256, 256, 20, 64),  # 512 px: where the threshold splash.MIN_KEYS comes from
    ("CLIP image", 257, 257, 16, 80),  # ViT-H/14 image encoder
)
# (name, width, heads, tokens) of the UNet's transformer levels at 1024 px; head_dim 64, 2048-wide text context.
BLOCKS = (("level 1, 64x64", 640, 10, 4096), ("level 2, 32x32", 1280, 20, 1024))


def compile_program(function, shapes, device):
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=SingleDeviceSharding(device)) for s in shapes]
    return jax.jit(function).lower(*args).compile()


def roofline_seconds(compiled) -> float:
    """The compiler's ``optimal_seconds`` over the ops it has a cost for (each op without one counts -1 s)."""
    return compiled.cost_analysis()["optimal_seconds"] % 1.0


def peak_flops_per_second(device) -> float:
    """The compiler's own peak: FLOPs / optimal_seconds of an 8192^2 bf16 matmul (197 TFLOP/s on v5e)."""
    cost = compile_program(jnp.matmul, [(8192, 8192)] * 2, device).cost_analysis()
    return cost["flops"] / cost["optimal_seconds"]


def kernel_flops(batch: int, lq: int, lk: int, heads: int, head_dim: int, backward: bool) -> float:
    """The splash kernels' matmul FLOPs over padded blocks: forward q k^T and p v (4 L_q L_k d per head); the
    backward's dq kernel recomputes q k^T and does dO v^T, dS k (6), its dkv kernel q k^T, p^T dO, dO v^T,
    dS^T q (8)."""
    blocks = splash.block_sizes(lq, lk, head_dim, jnp.bfloat16)
    lq_p, lk_p = -(-lq // blocks.block_q) * blocks.block_q, -(-lk // blocks.block_kv) * blocks.block_kv
    return (18 if backward else 4) * batch * heads * lq_p * lk_p * head_dim


def measure(impl: str, batch: int, lq: int, lk: int, heads: int, head_dim: int, backward: bool, device):
    if impl == "xla":
        core = functools.partial(attention, heads=heads, implementation="xla")
    else:
        def core(q, k, v):
            split = lambda x: x.reshape(*x.shape[:2], heads, head_dim)  # noqa: E731
            return splash.splash_attention(split(q), split(k), split(v)).reshape(q.shape)
    function = core
    if backward:
        function = jax.grad(lambda q, k, v: core(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    shapes = [(batch, lq, heads * head_dim)] + [(batch, lk, heads * head_dim)] * 2
    compiled = compile_program(function, shapes, device)
    kernels = compiled.as_text().count("tpu_custom_call")
    assert (kernels > 0) == (impl == "splash"), (impl, kernels)
    return compiled.memory_analysis().temp_size_in_bytes, roofline_seconds(compiled)


def measure_block(impl: str, batch: int, width: int, heads: int, tokens: int, device):
    """Temp bytes and roofline of one full-size BasicTransformerBlock's gradient (weights and input)."""
    block = nnx.eval_shape(lambda: BasicTransformerBlock(width, heads, 64, cross_attention_dim=2048,
                                                         attention_impl=impl, rngs=nnx.Rngs(0),
                                                         dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    graphdef, state = nnx.split(block)
    grad = jax.grad(lambda state, x, context: nnx.merge(graphdef, state)(x, context).astype(jnp.float32).sum(),
                    argnums=(0, 1))
    placed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=SingleDeviceSharding(device)),
                          state)
    inputs = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=SingleDeviceSharding(device))
              for s in ((batch, tokens, width), (batch, 77, 2048))]
    compiled = jax.jit(grad).lower(placed, *inputs).compile()
    assert compiled.as_text().count("tpu_custom_call") == (3 if impl == "splash" else 0)
    return compiled.memory_analysis().temp_size_in_bytes, roofline_seconds(compiled)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5e:2x2", help="TPU topology; its first chip is compiled for")
    parser.add_argument("--batch", default="1,2", help="comma-separated batch sizes")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    device = topology_devices(args.topology)[0]
    peak = peak_flops_per_second(device)
    print(f"{device.device_kind}: compiler peak {peak / 1e12:.0f} TFLOP/s; roofline = the compiler's estimate "
          "(splash: + kernel FLOPs at that peak)\n")
    print("| shape (Lq x Lk, heads x d) | B | pass | temp XLA | temp splash | XLA / splash | roofline XLA "
          "| roofline splash | XLA / splash | `splash` config runs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, lq, lk, heads, head_dim in SHAPES:
        for batch in batches:
            for backward in (False, True):
                x_temp, x_time = measure("xla", batch, lq, lk, heads, head_dim, backward, device)
                s_temp, s_time = measure("splash", batch, lq, lk, heads, head_dim, backward, device)
                s_time += kernel_flops(batch, lq, lk, heads, head_dim, backward) / peak
                runs = "kernel" if splash.applies(lk, None, False) else "XLA"
                print(f"| {name} ({lq} x {lk}, {heads} x {head_dim}) | {batch} | {'fwd+bwd' if backward else 'fwd'} "
                      f"| {_row(x_temp, s_temp, x_time, s_time)} | {runs} |", flush=True)
    print("\n| BasicTransformerBlock, fwd+bwd | B | temp XLA | temp splash | XLA / splash | roofline XLA "
          "| roofline splash | XLA / splash |")
    print("|---|---|---|---|---|---|---|---|")
    for name, width, heads, tokens in BLOCKS:
        for batch in batches:
            x_temp, x_time = measure_block("xla", batch, width, heads, tokens, device)
            s_temp, s_time = measure_block("splash", batch, width, heads, tokens, device)
            s_time += kernel_flops(batch, tokens, tokens, heads, 64, True) / peak
            print(f"| {name} ({width} wide, {heads} x 64, {tokens} tokens) | {batch} "
                  f"| {_row(x_temp, s_temp, x_time, s_time)} |", flush=True)


def _row(x_temp: int, s_temp: int, x_time: float, s_time: float) -> str:
    # A ratio of near-empty scratch (XLA fuses small attentions whole; the kernel's is its block metadata) is noise.
    ratio = f"{x_temp / s_temp:.0f}x" if min(x_temp, s_temp) >= 2**20 else "-"
    return (f"{_mib(x_temp)} | {_mib(s_temp)} | {ratio} | {x_time * 1e3:.3f} ms | {s_time * 1e3:.3f} ms "
            f"| {x_time / s_time:.2f}x")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


if __name__ == "__main__":
    main()
