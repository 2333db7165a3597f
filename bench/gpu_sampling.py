"""Full-size SDXL RealisID sampling on one GPU: realisid-jax against PyTorch, in one run; prints one table.

    python -m bench.gpu_sampling [--config configs/sdxl.py] [--steps 30] [--size 1024] [--repeat 3] [--device cuda|cpu]

Random weights from the config, one image, one person, DDIM, from noise to the final latents (no text encoding
or VAE decode on any side). Three contenders, JAX and PyTorch each in a fresh process (its own allocator peak; no
JAX pool beside PyTorch's):

  jax        ``pipeline._denoise`` (``bench.sampling.jax_sampler``): Eq. 8's predictions of a step as one batch,
             two (ε_none, ε_t) in the steps before the ID starts (the first 20%) and three (+ ε_t&i) after,
             UNet + global ControlNet on the latent + local ControlNet on the face crop (64² latent cells), the
             config's dtypes, cuDNN attention on a GPU (``attention_impl=cudnn``)
  torch      the same work in eager PyTorch (``bench.sampling.torch_sampler`` on the device): diffusers'
             ``UNet2DConditionModel`` and two ``ControlNetModel``, crop and relocation as ours
             (``bench.models.torch_residuals``), bf16 autocast (norms in float32), SDPA attention
  diffusers  ``StableDiffusionXLControlNetPipeline`` with the same two ControlNets (MultiControlNet), bf16,
             SDPA: what a diffusers user runs. Its work differs: two predictions (CFG) in every step, so none
             with the ID after it starts (60 UNet predictions in 30 steps against the others' 84), and both
             ControlNets on the whole latent (no crop), with the text as their context

Per contender: cold seconds (first call: compile or lazy initialisation, plus one image), warm seconds per image
(median of ``--repeat`` calls), peak device memory (the allocator's peak over the process, weights included;
none on a CPU) and warm seconds over JAX's. The test runs it on a CPU with ``configs/sdxl.py:tiny``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = {"jax": "Eq. 8, 2 preds (3 once the ID starts): UNet + global CN + local CN on crop", "torch": "same as jax",
        "diffusers": "CFG, 2 preds: UNet + 2 CN on the whole latent"}


def load_config(name: str, size: int | None, steps: int | None, attention: str | None):
    """The config with the bench's image size, steps and JAX attention kernel (on a GPU: the TPU splash kernel
    of ``configs/sdxl.py`` does not lower there)."""
    from bench.run import load

    config = load(name)
    if size:
        config.sampling.height = config.sampling.width = size
    if steps:
        config.sampling.num_inference_steps = steps
    if attention:
        config.attention_impl = attention
    return config


def _inputs(config, realisid_config):
    """``bench.sampling.SamplingInputs`` of one image, one person (host numpy, float32)."""
    from bench.models import make_inputs
    from bench.sampling import make_sampling_inputs

    step = make_inputs(config, realisid_config, batch=1, persons=1)
    return make_sampling_inputs(config, step, int(config.sampling.num_inference_steps))


def _result(cold_s: float, warm_s: float, peak_bytes: int | None, build_s: float) -> dict:
    return {"cold_s": cold_s, "warm_s": warm_s, "build_s": build_s,
            "peak_gib": None if peak_bytes is None else peak_bytes / 2**30}


# ------------------------------------------------------------------------------------------------ JAX
def jax_models(config, seed: int = 0):
    """``bench.models.Models`` (JAX side only) at the config's dtypes: the UNet drawn on the default device by one
    compiled program (eagerly each initialiser compiles on its own), the branches copied from it
    (``RealisID.from_unet``), the config's kernels applied."""
    from flax import nnx

    from bench.models import Models
    from realisid_jax.models.controlnet import _jit_init
    from realisid_jax.models.registry import dtypes
    from realisid_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
    from realisid_jax.realisid.branches import RealisIDConfig, branches_class
    from realisid_jax.realisid.components import Components, apply_kernel_config

    unet_config = UNet2DConditionConfig.from_dict(dict(config.model.unet))
    unet = _jit_init(lambda rngs: UNet2DConditionModel(unet_config, rngs=rngs, **dtypes(config)),
                     nnx.Rngs(seed).params())
    realisid_config = RealisIDConfig.from_config(config)
    realisid = branches_class(config).from_unet(unet, realisid_config, rngs=nnx.Rngs(seed + 1))
    apply_kernel_config(Components(unet=unet, vae=None, text_encoder=None, text_encoder_2=None, image_encoder=None,
                                   realisid=realisid), config)
    return Models(config, realisid_config, *nnx.split(unet), *nnx.split(realisid), None, None, None)


def measure_jax(config, repeat: int) -> dict:
    import jax

    from bench.sampling import jax_sampler
    from bench.timing import interleaved, timed

    models, build_s = timed(lambda: jax_models(config))
    run, _ = jax_sampler(models, _inputs(config, models.realisid_config))
    _, cold_s = timed(run)
    warm_s = interleaved({"jax": run}, repeat, warmup=0)["jax"]
    device = jax.devices()[0]
    stats = device.memory_stats() or {}  # None on a CPU
    setting = (f"{config.sampling.height}² px, {config.sampling.num_inference_steps} steps, 1 person, "
               f"{config.dtype}, JAX attention {config.attention_impl}")
    return {"device": device.device_kind, "versions": f"jax {jax.__version__}", "setting": setting,
            "jax": _result(cold_s, warm_s, stats.get("peak_bytes_in_use"), build_s)}


# ------------------------------------------------------------------------------------------------ PyTorch
def diffusers_sampler(models, inputs, config, device: str, dtype):
    """diffusers' ``StableDiffusionXLControlNetPipeline`` over the UNet and the two ControlNets, prompt
    embeddings given (no text encoders, no VAE: ``output_type="latent"``); the control images are a random
    landmark image (3 channels) and the person's box mask (1 channel) at the image size."""
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, StableDiffusionXLControlNetPipeline

    from bench.sampling import TEXT_SCALE
    from realisid_jax.schedulers import SDXL_SCHEDULER_CONFIG

    pipe = StableDiffusionXLControlNetPipeline(
        vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=models.torch_unet,
        controlnet=[models.torch_local, models.torch_global],
        scheduler=DDIMScheduler.from_config(SDXL_SCHEDULER_CONFIG), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device, dtype)  # noqa: E731
    prompt, negative, pooled, negative_pooled = (t(x) for x in inputs.text)
    size = int(config.sampling.height)
    x0, y0, x1, y1 = (round(v * size) for v in inputs.boxes[0, 0])
    mask = torch.zeros(1, 1, size, size, device=device, dtype=dtype)
    mask[..., y0:y1, x0:x1] = 1
    landmarks = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    latents = t(inputs.latents).permute(0, 3, 1, 2)

    def run():
        return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=negative_pooled, image=[landmarks, mask], height=size, width=size,
                    num_inference_steps=inputs.steps, guidance_scale=TEXT_SCALE, latents=latents,
                    output_type="latent", return_dict=False)[0]

    return run


def _build_torch(config, device: str, dtype):
    """``bench.models.build_models``' PyTorch models, drawn on the host in ``dtype`` (half the host memory and
    transfer of float32 for bf16; its seeded CPU generator rules out drawing them on the GPU), then moved."""
    import torch

    from bench.models import build_models

    torch.set_default_dtype(dtype)
    try:
        models = build_models(config, frameworks=("torch",))
    finally:
        torch.set_default_dtype(torch.float32)  # torch_residuals' constants are float32
    for net in (models.torch_unet, models.torch_local, models.torch_global):
        net.to(device)
    return models


def measure_torch(config, repeat: int, device: str) -> dict:
    """The same-work loop, then the diffusers pipeline, in one process: the models built once, the allocator's
    peak reset between the two."""
    import diffusers
    import torch

    from bench.run import set_threads
    from bench.sampling import torch_sampler
    from bench.timing import interleaved, timed

    set_threads()
    dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
    models, build_s = timed(lambda: _build_torch(config, device, dtype))
    inputs = _inputs(config, models.realisid_config)
    gpu = device == "cuda"
    sync = torch.cuda.synchronize if gpu else lambda: None
    result = {"device": torch.cuda.get_device_name() if gpu else "cpu",
              "versions": f"torch {torch.__version__}, diffusers {diffusers.__version__}",
              "attention": type(next(iter(models.torch_unet.attn_processors.values()))).__name__}
    samplers = {"torch": torch_sampler(models, inputs, device, dtype),
                "diffusers": diffusers_sampler(models, inputs, config, device, dtype)}
    for name, sampler in samplers.items():
        call = lambda: (sampler(), sync())  # noqa: E731, B023 - called inside this iteration only
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            _, cold_s = timed(call)
            warm_s = interleaved({name: call}, repeat, warmup=0)[name]
        result[name] = _result(cold_s, warm_s, torch.cuda.max_memory_allocated() if gpu else None, build_s)
    return result


# ------------------------------------------------------------------------------------------------ driver
def _child(framework: str, args: argparse.Namespace) -> dict:
    """Runs this module for one framework in a fresh process; its JSON result. JAX's platform is named, so a host
    without a working GPU backend fails rather than timing a CPU; the PyTorch process keeps JAX (its scheduler
    tables) on the CPU, where it cannot pre-allocate GPU memory."""
    platform = args.device if framework == "jax" else "cpu"
    env = {**os.environ, "JAX_PLATFORMS": platform,
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "bench.gpu_sampling", "--child", framework, "--config", args.config,
               "--repeat", str(args.repeat), "--device", args.device]
    command += [f"--{name}={value}" for name in ("steps", "size", "attention") if (value := getattr(args, name))]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line.removeprefix("BENCH_JSON "))
    raise RuntimeError(f"bench.gpu_sampling --child {framework} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def format_table(results: dict[str, dict], header: str) -> str:
    """One row per contender: cold s, warm s/image, peak GiB, build s and warm s over JAX's (>1: JAX faster)."""
    cells = [("contender", "work per step", "cold s", "warm s/img", "peak GiB", "build s", "vs JAX")]
    for name, r in results.items():
        cells.append((name, WORK[name], _fmt(r["cold_s"]), _fmt(r["warm_s"]), _fmt(r["peak_gib"]),
                      _fmt(r["build_s"]), f"{r['warm_s'] / results['jax']['warm_s']:.2f}x"))
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = [header, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells[1:]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="full-size SDXL RealisID sampling on one GPU: JAX against PyTorch")
    p.add_argument("--config", default="configs/sdxl.py", help="config file[:variant] or bench short name")
    p.add_argument("--steps", type=int, help="denoising steps (default: the config's, 30 for SDXL)")
    p.add_argument("--size", type=int, help="image side in pixels (default: the config's, 1024 for SDXL)")
    p.add_argument("--repeat", type=int, default=3, help="warm calls per contender (median)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--attention", help="JAX attention_impl (default: cudnn on cuda, the config's on cpu; "
                                       "'None' lets JAX pick)")
    p.add_argument("--child", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not args.attention:
        args.attention = "cudnn"
    if args.child:
        config = load_config(args.config, args.size, args.steps, args.attention)
        result = measure_jax(config, args.repeat) if args.child == "jax" else measure_torch(config, args.repeat,
                                                                                           args.device)
        print("BENCH_JSON " + json.dumps(result), flush=True)
        return 0
    jax_out = _child("jax", args)
    print(f"jax: {jax_out['jax']}", file=sys.stderr, flush=True)  # kept if the PyTorch half runs out of time
    torch_out = _child("torch", args)
    results = {"jax": jax_out["jax"], "torch": torch_out["torch"], "diffusers": torch_out["diffusers"]}
    header = (f"realisid-jax GPU sampling bench: {args.config}, {jax_out['setting']}; {jax_out['device']}; "
              f"{jax_out['versions']}, {torch_out['versions']}, PyTorch attention {torch_out['attention']}")
    print(format_table(results, header))
    ratio = results["torch"]["warm_s"] / results["jax"]["warm_s"]
    print(f"ratio PyTorch / JAX, same work, warm s/img: {ratio:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
