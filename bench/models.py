"""One RealisID denoising step in JAX and in PyTorch (diffusers), with the same config, weights and inputs.

The PyTorch reference does the work ``RealisID.residuals`` + the UNet do: the global ``ControlNetModel`` on
the whole latent for each of the K persons (folded into the batch) with its location mask, the local one on
each person's crop (bilinear, at ``local_latent_size``²), every local residual level relocated into its box,
the per-person sums, then ``UNet2DConditionModel`` with the residuals. Crop and relocation use the same
separable weight matrices as ``realisid_jax.realisid.ops`` (rewritten here in torch), so both sides compute the
same numbers and the bench reports their difference as a check that it times the same work.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from realisid_jax.models.controlnet import ControlNetModel
from realisid_jax.models.id_projection import IDProjection
from realisid_jax.models.layers import set_conv_impl
from realisid_jax.models.vae import VAE_SCALE_FACTOR
from realisid_jax.realisid.branches import RealisID, RealisIDConfig
from realisid_jax.models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel
from realisid_jax.loading.pretrained import from_state_dict

_MIN_EXTENT = 1e-6  # as realisid_jax.realisid.ops


@dataclasses.dataclass
class Models:
    """Both frameworks' models of one config (PyTorch in eval mode, JAX split once for ``jax.jit``)."""

    config: Any
    realisid_config: RealisIDConfig
    unet_def: nnx.GraphDef
    unet_state: nnx.State
    realisid_def: nnx.GraphDef
    realisid_state: nnx.State
    torch_unet: Any
    torch_local: Any
    torch_global: Any


def _torch_state(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _randomise_zero_convs(controlnet, generator: torch.Generator) -> None:
    """ControlNet's zero convs (cond-embedding output, residual convs) get small random weights, so that the
    branches' residuals are not all zero and the JAX/PyTorch check can fail."""
    zero = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block,
            *controlnet.controlnet_down_blocks]
    with torch.no_grad():
        for conv in zero:
            for p in conv.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def build_models(config, *, seed: int = 0, frameworks: tuple[str, ...] = ("jax", "torch")) -> Models:
    """diffusers UNet + two ControlNets (``from_unet``, zero convs randomised) and the same weights in JAX.

    ``frameworks=("jax",)`` builds random JAX models only, ``("torch",)`` the PyTorch ones only (the
    subprocess measurements of one framework); the other side's fields are None then. The JAX models use the
    config's XLA:CPU kernels (``attention_impl``, ``conv_impl``).
    """
    rcfg = RealisIDConfig.from_config(config)
    unet_cfg = UNet2DConditionConfig.from_dict(dict(config.model.unet))
    rngs = nnx.Rngs(seed)
    attention = dict(attention_impl=config.attention_impl)
    if "torch" not in frameworks:
        unet = UNet2DConditionModel(unet_cfg, rngs=rngs, **attention)
        realisid = RealisID(rcfg, rngs=rngs, **attention)
        return _split(config, rcfg, unet, realisid, None, None, None)
    import diffusers

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    t_unet = diffusers.UNet2DConditionModel(**dict(config.model.unet)).eval()
    branches = {}
    for name in ("local_branch", "global_branch"):
        branch = getattr(rcfg, name)
        net = diffusers.ControlNetModel.from_unet(
            t_unet, conditioning_channels=branch.conditioning_channels,
            conditioning_embedding_out_channels=tuple(branch.conditioning_embedding_out_channels)).eval()
        _randomise_zero_convs(net, generator)
        branches[name] = net
    if "jax" not in frameworks:
        return Models(config, rcfg, None, None, None, None, t_unet, branches["local_branch"],
                      branches["global_branch"])
    unet = from_state_dict(UNet2DConditionModel, unet_cfg, _torch_state(t_unet), source="bench torch unet",
                           **attention)
    realisid = RealisID.abstract(rcfg, **attention)
    for name, net in branches.items():
        setattr(realisid, name, from_state_dict(ControlNetModel, getattr(rcfg, name), _torch_state(net),
                                                source=f"bench torch {name}", **attention))
    realisid.id_projection = IDProjection(rcfg.id_projection, rngs=rngs, **attention)
    return _split(config, rcfg, unet, realisid, t_unet, branches["local_branch"], branches["global_branch"])


def _split(config, rcfg: RealisIDConfig, unet, realisid, *torch_models) -> Models:
    """``Models`` with the JAX models' convolutions set to the config's ``conv_impl`` and split for jax.jit."""
    for model in (unet, realisid):
        set_conv_impl(model, config.conv_impl)
    return Models(config, rcfg, *nnx.split(unet), *nnx.split(realisid), *torch_models)


# ------------------------------------------------------------------------------------------------ inputs
def make_inputs(config, rcfg: RealisIDConfig, *, batch: int, persons: int, valid_persons: int | None = None,
                seed: int = 0) -> dict[str, np.ndarray | dict | None]:
    """Host (numpy) inputs of one step, NHWC: latents, text context, per-person p_id, boxes, validity,
    landmark images and (SDXL) added conditions. Boxes tile the image left to right; ``valid_persons``
    (default all) marks the rest as padding."""
    rng = np.random.default_rng(seed)
    unet = dict(config.model.unet)
    h = w = int(config.sampling.height) // VAE_SCALE_FACTOR
    px = VAE_SCALE_FACTOR * rcfg.local_latent_size
    n_tokens, width = rcfg.id_projection.num_queries, rcfg.id_projection.output_dims
    edges = np.linspace(0.05, 0.95, persons + 1, dtype=np.float32)
    boxes = np.stack([np.array([edges[i] + 0.01, 0.2, edges[i + 1] - 0.01, 0.7], np.float32)
                      for i in range(persons)])
    valid = np.arange(persons) < (persons if valid_persons is None else valid_persons)
    inputs = dict(
        sample=rng.standard_normal((batch, h, w, unet["in_channels"]), np.float32),
        timestep=np.float32(500),
        context=rng.standard_normal((batch, 77, _cross_dim(unet)), np.float32),
        p_id=rng.standard_normal((batch, persons, n_tokens, width), np.float32),
        boxes=np.broadcast_to(boxes, (batch, persons, 4)).copy(),
        valid=np.broadcast_to(valid, (batch, persons)).copy(),
        landmark_images=rng.uniform(0, 1, (batch, persons, px, px, 3)).astype(np.float32),
        added=None,
    )
    if unet.get("addition_embed_type") == "text_time":
        pooled = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
        size = int(config.sampling.height)
        inputs["added"] = dict(text_embeds=rng.standard_normal((batch, pooled), np.float32),
                               time_ids=np.tile(np.array([[size, size, 0, 0, size, size]], np.float32), (batch, 1)))
    return inputs


def _cross_dim(unet: dict) -> int:
    dim = unet.get("cross_attention_dim", 1280)
    return dim[0] if isinstance(dim, (tuple, list)) else dim


# ------------------------------------------------------------------------------------------------ JAX
@functools.partial(jax.jit, static_argnames=("unet_def", "realisid_def"))
def jax_step(unet_def, realisid_def, unet_state, realisid_state, sample, timestep, context, p_id, boxes, valid,
             landmark_images, added):
    """ε of one denoising step: ``RealisID.residuals`` then the UNet with them. (B, h, w, 4) float32."""
    unet, realisid = nnx.merge(unet_def, unet_state), nnx.merge(realisid_def, realisid_state)
    down, mid = realisid.residuals(sample, timestep, p_id, boxes, valid, landmark_images, added)
    return unet(sample, timestep, context, added_cond_kwargs=added, down_block_additional_residuals=down,
                mid_block_additional_residual=mid)


def jax_args(models: Models, inputs: dict) -> tuple:
    """Device arguments of ``jax_step`` after its two static graph definitions."""
    arrays = {k: (jax.tree.map(jnp.asarray, v) if v is not None else None) for k, v in inputs.items()}
    return (models.unet_state, models.realisid_state, arrays["sample"], arrays["timestep"], arrays["context"],
            arrays["p_id"], arrays["boxes"], arrays["valid"], arrays["landmark_images"], arrays["added"])


def run_jax_step(models: Models, args: tuple) -> jax.Array:
    return jax_step(models.unet_def, models.realisid_def, *args).block_until_ready()


# ------------------------------------------------------------------------------------------------ PyTorch
def _filter(centres: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
    """(N, out, n) triangle weights of half-width max(step, 1) cells, rows summing to 1, centres clamped so the
    footprint stays inside the axis (``realisid.ops._filter``: bilinear when enlarging, antialiased when
    shrinking)."""
    half = step.clamp_min(1.0)[:, None]
    lo = torch.minimum(half - 1.0, torch.tensor((n - 1) / 2))
    hi = torch.maximum(n - half, torch.tensor((n - 1) / 2))
    centres = torch.maximum(torch.minimum(centres, hi), lo)
    distance = (centres[..., None] - torch.arange(n, dtype=torch.float32)).abs()
    weights = (1.0 - distance / half[..., None]).clamp_min(0.0)
    return weights / weights.sum(-1, keepdim=True)


def _coverage(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    start = torch.arange(n, dtype=torch.float32)
    overlap = torch.minimum(start + 1.0, hi[:, None] * n) - torch.maximum(start, lo[:, None] * n)
    return overlap.clamp(0.0, 1.0)


def _crop_weights(boxes: torch.Tensor, src: int, out: int, lo: int, hi: int) -> torch.Tensor:
    """(N, out, src) crop weights along one axis (``realisid.ops.crop_and_resize``)."""
    a, b = boxes[:, lo], boxes[:, hi]
    step = (b - a) * src / out
    coords = a[:, None] * src + (torch.arange(out, dtype=torch.float32) + 0.5) * step[:, None] - 0.5
    return _filter(coords, step, src)


def _relocate_weights(boxes: torch.Tensor, src: int, out: int, lo: int, hi: int) -> torch.Tensor:
    """(N, out, src) relocation weights along one axis (``realisid.ops.relocate``)."""
    a, b = boxes[:, lo], boxes[:, hi]
    step = src / ((b - a).clamp_min(_MIN_EXTENT) * out)
    coords = ((torch.arange(out, dtype=torch.float32) + 0.5) - a[:, None] * out) * step[:, None] - 0.5
    return _coverage(a, b, out)[..., None] * _filter(coords, step, src)


def _sum_persons(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    b, k = valid.shape
    x = x.reshape(b, k, *x.shape[1:])
    return torch.where(valid.reshape(b, k, 1, 1, 1), x, torch.zeros(())).sum(1)


def torch_residuals(models: Models, sample, timestep, p_id, boxes, valid, landmark_images, added):
    """``RealisID.residuals`` in PyTorch, NCHW: (down residuals, mid residual)."""
    rcfg = models.realisid_config
    b, _, h, w = sample.shape
    k = boxes.shape[1]
    size = rcfg.local_latent_size
    boxes = torch.where(valid[..., None], boxes, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    flat = boxes.reshape(b * k, 4)
    t = torch.full((b * k,), float(timestep))
    ctx = p_id.reshape(b * k, *p_id.shape[2:])
    folded = sample.repeat_interleave(k, 0)
    global_added = local_added = None
    if added is not None:
        global_added = {n: v.repeat_interleave(k, 0) for n, v in added.items()}
        px = VAE_SCALE_FACTOR * size
        bh = (flat[:, 3] - flat[:, 1]) * (VAE_SCALE_FACTOR * h)
        bw = (flat[:, 2] - flat[:, 0]) * (VAE_SCALE_FACTOR * w)
        zeros = torch.zeros_like(bh)
        local_added = {**global_added, "time_ids": torch.stack([bh, bw, zeros, zeros, zeros + px, zeros + px], -1)}
    mh, mw = VAE_SCALE_FACTOR * h, VAE_SCALE_FACTOR * w
    masks = (_coverage(flat[:, 1], flat[:, 3], mh)[:, :, None] * _coverage(flat[:, 0], flat[:, 2], mw)[:, None, :])
    g_down, g_mid = models.torch_global(folded, t, ctx, masks[:, None], added_cond_kwargs=global_added,
                                        return_dict=False)
    crops = torch.einsum("nyh,nchw,nxw->ncyx", _crop_weights(flat, h, size, 1, 3), folded,
                         _crop_weights(flat, w, size, 0, 2))
    marks = landmark_images.reshape(b * k, *landmark_images.shape[2:]).permute(0, 3, 1, 2)
    l_down, l_mid = models.torch_local(crops, t, ctx, marks, added_cond_kwargs=local_added, return_dict=False)
    inv_count = 1.0 / valid.sum(1).clamp_min(1).float().reshape(b, 1, 1, 1)
    total = []
    for loc, glob in zip((*l_down, l_mid), (*g_down, g_mid)):
        oh, ow = glob.shape[2:]
        sh, sw = loc.shape[2:]
        loc = torch.einsum("nyh,nchw,nxw->ncyx", _relocate_weights(flat, sh, oh, 1, 3), loc,
                           _relocate_weights(flat, sw, ow, 0, 2))
        total.append(rcfg.local_scale * _sum_persons(loc, valid)
                     + rcfg.global_scale * _sum_persons(glob, valid) * inv_count)
    return total[:-1], total[-1]


def torch_args(inputs: dict) -> tuple:
    """PyTorch tensors of one step's inputs (NCHW latents)."""
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x))  # noqa: E731
    added = None if inputs["added"] is None else {k: t(v) for k, v in inputs["added"].items()}
    return (t(inputs["sample"]).permute(0, 3, 1, 2).contiguous(), float(inputs["timestep"]), t(inputs["context"]),
            t(inputs["p_id"]), t(inputs["boxes"]), t(inputs["valid"]), t(inputs["landmark_images"]), added)


@torch.inference_mode()
def run_torch_step(models: Models, args: tuple) -> torch.Tensor:
    """ε of one denoising step in PyTorch: (B, 4, h, w)."""
    sample, timestep, context, p_id, boxes, valid, marks, added = args
    down, mid = torch_residuals(models, sample, timestep, p_id, boxes, valid, marks, added)
    return models.torch_unet(sample, timestep, context, added_cond_kwargs=added,
                             down_block_additional_residuals=down, mid_block_additional_residual=mid,
                             return_dict=False)[0]
