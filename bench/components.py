"""Op-level timing by ablation: each part of the denoising step alone, JAX against PyTorch.

    python -m bench.components [--config mid] [--persons 4] [--repeat 3]

Parts: the UNet with residuals (B = 1), the global ControlNet (B = K, full latent), the local ControlNet
(B = K, crops), and the glue of ``RealisID.residuals`` (crop, location masks, relocation, person sums) as the
whole step minus the three networks. Each JAX part is its own ``jax.jit``; interleaved medians.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from bench.models import (build_models, jax_args, make_inputs, run_jax_step, run_torch_step, torch_args,
                          torch_residuals)
from bench.run import Row, format_table, load, set_threads
from bench.timing import interleaved, load_average
from realisid_jax.models.vae import VAE_SCALE_FACTOR


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _controlnet(graphdef, state, sample, t, context, cond):
    return nnx.merge(graphdef, state)(sample, t, context, cond)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _unet(graphdef, state, sample, t, context, down, mid):
    return nnx.merge(graphdef, state)(sample, t, context, down_block_additional_residuals=down,
                                      mid_block_additional_residual=mid)


def _block(x):
    return jax.block_until_ready(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="mid")
    p.add_argument("--persons", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    set_threads()
    config = load(args.config)
    if config.model.unet.get("addition_embed_type") is not None:
        p.error("component timing covers SD 1.5-style configs (no added conditions), e.g. --config mid")
    models = build_models(config)
    k = args.persons
    inputs = make_inputs(config, models.realisid_config, batch=1, persons=k)
    size = models.realisid_config.local_latent_size
    rng = np.random.default_rng(0)
    h, w = inputs["sample"].shape[1:3]
    realisid = nnx.merge(models.realisid_def, models.realisid_state)
    parts = {}
    for name, hw, ch in (("global", (h, w), 1), ("local", (size, size), 3)):
        branch = getattr(realisid, f"{name}_branch")
        gdef, gstate = nnx.split(branch)
        x = rng.standard_normal((k, *hw, 4), np.float32)
        ctx = inputs["p_id"][0]
        cond = rng.uniform(0, 1, (k, VAE_SCALE_FACTOR * hw[0], VAE_SCALE_FACTOR * hw[1], ch)).astype(np.float32)
        tnet = models.torch_global if name == "global" else models.torch_local
        tx, tctx, tcond = (torch.from_numpy(a) for a in (x.transpose(0, 3, 1, 2).copy(), ctx, cond.transpose(0, 3, 1, 2).copy()))
        parts[f"{name} ControlNet, B={k}"] = (
            functools.partial(lambda g, s, a: _block(_controlnet(g, s, *a)), gdef, gstate,
                              (jnp.asarray(x), jnp.float32(500), jnp.asarray(ctx), jnp.asarray(cond))),
            functools.partial(lambda net, a: torch.inference_mode()(net)(*a, return_dict=False), tnet,
                              (tx, torch.full((k,), 500.0), tctx, tcond)))
    ja, ta = jax_args(models, inputs), torch_args(inputs)
    down, mid = jax.jit(lambda s, *a: nnx.merge(models.realisid_def, s).residuals(*a))(
        models.realisid_state, *ja[2:4], *ja[5:9])
    with torch.inference_mode():
        tdown, tmid = torch_residuals(models, ta[0], ta[1], *ta[3:7], None)
    parts["UNet with residuals, B=1"] = (
        lambda: _block(_unet(models.unet_def, models.unet_state, ja[2], ja[3], ja[4], down, mid)),
        lambda: torch.inference_mode()(models.torch_unet)(ta[0], ta[1], ta[2], down_block_additional_residuals=tdown,
                                                         mid_block_additional_residual=tmid, return_dict=False))
    parts[f"whole step, K={k}"] = (lambda: run_jax_step(models, ja), lambda: run_torch_step(models, ta))
    rows = []
    for name, (fj, ft) in parts.items():
        med = interleaved({"jax": fj, "torch": ft}, args.repeat)
        rows.append(Row("part", name, med["jax"], med["torch"], "s"))
    whole = rows[-1]
    nets = rows[:-1]
    rows.append(Row("part", "glue (whole - networks)", whole.jax - sum(r.jax for r in nets),
                    whole.torch - sum(r.torch for r in nets), "s"))
    print(format_table(rows, f"components, config {args.config}, K={k}, {load_average()}"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
