"""``attention_impl="splash"``: the TPU splash kernel (``models/splash.py``) against XLA attention on CPU (Pallas'
interpreter), and compiled ahead of time for TPU v5e chips on this host (libtpu, the ``tpu`` extra)."""

import os

# Before libtpu loads: pytest-xdist workers each load it, and no metadata server answers on this host.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, SingleDeviceSharding  # noqa: E402

from realisid_jax.models import splash  # noqa: E402
from realisid_jax.models.layers import attention  # noqa: E402
from realisid_jax.models.transformer_2d import BasicTransformerBlock  # noqa: E402
from realisid_jax.sharding import DEFAULT_RULES, data_sharding, make_mesh, state_shardings, use_mesh  # noqa: E402
from realisid_jax.training.aot import topology_devices  # noqa: E402


def qkv(batch, lq, lk, heads=2, head_dim=32):
    keys = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(keys[0], (batch, lq, heads, head_dim)),
            jax.random.normal(keys[1], (batch, lk, heads, head_dim)),
            jax.random.normal(keys[2], (batch, lk, heads, head_dim)))


def loss(function, q, k, v):
    return jnp.sum(function(q, k, v) ** 2)


def test_splash_matches_xla_attention_and_its_gradients():
    q, k, v = qkv(2, 200, 77)  # neither length a whole block: padded queries dropped, padded keys masked
    kernel = jax.jit(functools.partial(splash.splash_attention, interpret=True))
    np.testing.assert_allclose(kernel(q, k, v), jax.nn.dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    grads = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2)))(q, k, v)
    expected = jax.grad(functools.partial(loss, jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_splash_under_a_mesh_runs_per_batch_shard():
    """shard_map over the activation_batch axes: each of 8 devices runs the kernel on its own batch element
    (whole blocks: no padding)."""
    q, k, v = qkv(8, 128, 128)
    mesh = make_mesh((2, 4, 1))
    with use_mesh(mesh):
        q, k, v = (jax.device_put(x, data_sharding(mesh, x.shape)) for x in (q, k, v))
        out = jax.jit(functools.partial(splash.splash_attention, interpret=True))(q, k, v)
    assert out.sharding.is_equivalent_to(data_sharding(mesh, out.shape), out.ndim)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_only_long_unmasked_keys_take_the_kernel():
    assert splash.applies(splash.MIN_KEYS, None, False)
    assert not splash.applies(77, None, False)  # text cross-attention
    assert not splash.applies(4096, None, True)  # causal (CLIP text)
    assert not splash.applies(4096, jnp.ones((1, 1, 1, 4096), bool), False)


def test_blocks_shrink_for_short_sequences_and_wide_heads():
    blocks = splash.block_sizes(4096, 77, 64, jnp.bfloat16)
    assert (blocks.block_q, blocks.block_kv) == (1024, 128)
    vae = splash.block_sizes(16384, 16384, 512, jnp.bfloat16)  # the VAE's mid-block attention
    assert (vae.block_q, vae.block_kv, vae.block_q_dkv, vae.block_kv_dq) == (1024, 1024, 512, 512)


# --- TPU programs, compiled on this host for v5e chips -------------------------------------------------------

def tpu_program(function, *args):
    return jax.jit(function).lower(*args).compile().as_text()


def assert_tpu_kernel(text, kernels):
    assert text.count("tpu_custom_call") == kernels, "the splash kernel (Mosaic custom call) is not in the program"
    assert " while(" not in text  # no query-chunked loop (the XLA:CPU "chunked" path)


def test_tpu_attention_uses_the_kernel_forward_and_backward():
    device = topology_devices("v5e:2x2")[0]
    tokens = jax.ShapeDtypeStruct((1, splash.MIN_KEYS, 8 * 64), jnp.bfloat16, sharding=SingleDeviceSharding(device))
    text = jax.ShapeDtypeStruct((1, 77, 8 * 64), jnp.bfloat16, sharding=SingleDeviceSharding(device))
    step = functools.partial(attention, heads=8, implementation="splash")
    assert_tpu_kernel(tpu_program(step, tokens, tokens, tokens), 1)
    # Backward: the dq and dkv kernels, plus the forward's with residuals.
    grad = jax.grad(lambda q, k, v: step(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    assert_tpu_kernel(tpu_program(grad, tokens, tokens, tokens), 3)
    assert_tpu_kernel(tpu_program(step, tokens, text, text), 0)  # 77 text keys stay on XLA


def block_program(devices, mesh_shape, batch):
    """One BasicTransformerBlock (width 128, 2 heads x 64, MIN_KEYS tokens, 77 text tokens) compiled for
    ``devices`` with the weights sharded by the default rules and the batch over (data, fsdp)."""
    block = nnx.eval_shape(lambda: BasicTransformerBlock(128, 2, 64, cross_attention_dim=64, attention_impl="splash",
                                                         rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    graphdef, state = nnx.split(block)
    mesh = make_mesh(mesh_shape, devices)

    def forward(state, x, context):
        return nnx.merge(graphdef, state)(x, context)

    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                            state_shardings(state, mesh, DEFAULT_RULES))
    x, context = ((batch, splash.MIN_KEYS, 128), (batch, 77, 64))
    inputs = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=data_sharding(mesh, s)) for s in (x, context)]
    with use_mesh(mesh):
        compiled = jax.jit(forward).lower(abstract, *inputs).compile()
    assert {d.platform for d in compiled.input_shardings[0][1].device_set} == {"tpu"}
    return compiled


def test_tpu_transformer_block_uses_the_kernel_on_one_chip():
    assert_tpu_kernel(block_program(topology_devices("v5e:2x2")[:1], (1, 1, 1), 1).as_text(), 1)


def test_tpu_transformer_block_uses_the_kernel_per_batch_shard_on_a_v5e_8():
    compiled = block_program(topology_devices("v5e:2x4"), (2, 4, 1), 8)
    assert_tpu_kernel(compiled.as_text(), 1)
    # The kernel's output is one device's share: one of the 8 batch elements, (heads, L, head_dim).
    kernel = next(line for line in compiled.as_text().splitlines() if 'custom_call_target="tpu_custom_call"' in line)
    assert f"bf16[2,{splash.MIN_KEYS},64]" in kernel.split("custom-call(")[0], kernel[:200]
    sharding = compiled.output_shardings
    assert isinstance(sharding, NamedSharding) and sharding.spec[0] == ("data", "fsdp")
