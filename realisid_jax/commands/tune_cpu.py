"""``realisid tune-cpu --config FILE[:variant]``: measures the XLA:CPU kernel candidates (``attention_impl`` x
``conv_impl``) on this CPU at the config's shapes and caches the fastest for it (``models.cpu_kernels``).

The work timed per candidate is the config's UNet (random weights, float32 as the CPU configs): one forward
pass at the sampling size, batch 1 (a denoising step's heaviest network; the ControlNet branches are its
encoder half), plus one gradient with respect to the latents at the training size and batch (the backward
pass every training step runs through the frozen UNet to the branches). Candidates run round-robin, medians of
``--repeat``; XLA's own kernels are kept unless another pair is more than 3 % faster. Afterwards every config
with these shapes loaded on this CPU uses the choice (``cpu_kernels.apply``).
"""

from __future__ import annotations

from realisid_jax.commands.arguments import UsageError, positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser("tune-cpu", help="measure the XLA:CPU kernels on this CPU and cache the fastest",
                              description=__doc__)
    p.add_argument("--config", required=True, help="a CPU config, e.g. configs/sd15.py:mid, configs/sdxl.py:tiny")
    p.add_argument("--repeat", type=positive_int, default=3, help="timed rounds per candidate (medians)")
    p.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    p.set_defaults(func=run)


def unet_workload(config, kernels, seed: int = 0):
    """A function running the config's UNet with ``kernels`` once (forward at the sampling size, batch 1, and
    the latents' gradient at the training size and batch), blocking until done."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from realisid_jax.models.layers import set_conv_impl
    from realisid_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel

    unet_config = UNet2DConditionConfig.from_dict(dict(config.model["unet"]))
    unet = UNet2DConditionModel(unet_config, rngs=nnx.Rngs(seed), attention_impl=kernels.attention_impl)
    set_conv_impl(unet, kernels.conv_impl)
    graphdef, state = nnx.split(unet)
    rng = np.random.default_rng(seed)

    def inputs(batch: int, pixels: int):
        cross = unet_config.cross_attention_dim
        cross = cross[0] if isinstance(cross, (tuple, list)) else cross
        added = None
        if unet_config.addition_embed_type == "text_time":
            pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
            added = dict(text_embeds=jnp.asarray(rng.standard_normal((batch, pooled), np.float32)),
                         time_ids=jnp.tile(jnp.asarray([[pixels, pixels, 0, 0, pixels, pixels]], jnp.float32),
                                           (batch, 1)))
        latents = rng.standard_normal((batch, pixels // 8, pixels // 8, unet_config.in_channels), np.float32)
        context = rng.standard_normal((batch, 77, cross), np.float32)
        return jnp.asarray(latents), jnp.asarray(context), added

    @jax.jit
    def forward(state, latents, context, added):
        return nnx.merge(graphdef, state)(latents, 500.0, context, added_cond_kwargs=added)

    @jax.jit
    def gradient(state, latents, context, added):
        loss = lambda x: jnp.mean(nnx.merge(graphdef, state)(x, 500.0, context, added_cond_kwargs=added) ** 2)
        return jax.grad(loss)(latents)

    sampling = inputs(1, int(config.sampling.height))
    training = inputs(int(config.train.batch_size), int(config.train.resolution))
    return lambda: jax.block_until_ready((forward(state, *sampling), gradient(state, *training)))


def run(args) -> int:
    from realisid_jax.config import load_config
    from realisid_jax.models import cpu_kernels

    if args.config_overrides:
        # The cache is keyed by the shapes get_config() gives, which a config reads before overrides apply.
        raise UsageError("tune-cpu takes no --config.* overrides: it tunes a config file's own shapes")
    config = load_config(args.config)
    cpu, shapes = cpu_kernels.cpu_key(), cpu_kernels.shape_key(config)
    print(f"CPU {cpu}; shapes {shapes}; candidates {', '.join(map(str, cpu_kernels.CANDIDATES))}", flush=True)
    runs = {k: unet_workload(config, k) for k in cpu_kernels.CANDIDATES}
    seconds = cpu_kernels.median_seconds(runs, args.repeat)
    xla = cpu_kernels.Kernels("xla", "xla")
    choice = cpu_kernels.fastest(seconds, prefer=xla)
    for k, s in sorted(seconds.items(), key=lambda item: item[1]):
        print(f"  {str(k):16s} {s:8.3f} s  {seconds[xla] / s:5.2f}x of xla/xla", flush=True)
    path = cpu_kernels.cache_path()
    if args.dry_run or path is None:
        print(f"chosen {choice} (not written: {'--dry-run' if args.dry_run else 'REALISID_CPU_KERNELS=off'})")
        return 0
    cpu_kernels.record(cpu, shapes, choice, seconds, path)
    print(f"chosen {choice}, written to {path}")
    return 0
