"""``Components``: every model of a RealisID system in one NNX module (diffusers' ``pipeline.components``).

The frozen base (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2`` for SDXL, ``image_encoder``) and the
trainable ``realisid`` branches. The pipeline, the trainer, the memory plan and the training sample writer all
hold this one container: split once (``nnx.split``), merged once inside each jitted function.

``abstract_components`` builds it with ``nnx.eval_shape`` (parameter counts and shardings, no memory);
``random_components`` initialises it (tiny configs, tests and the embedded demo); ``pretrained_components``
loads the frozen models from diffusers / transformers folders straight onto their shardings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from realisid_jax.loading.branch_folders import load_branch_parts
from realisid_jax.loading.files import read_json
from realisid_jax.loading.lora import merge_loras
from realisid_jax.loading.orbax_cache import load_converted, read_meta
from realisid_jax.loading.pipeline_folder import load_model_folders
from realisid_jax.loading.single_file import load_single_file
from realisid_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from realisid_jax.models.clip_vision import CLIPVisionModelWithProjection
from realisid_jax.models.layers import set_conv_impl, set_weight_gathering
from realisid_jax.models.modeling_utils import init_rngs
from realisid_jax.models.registry import FROZEN, dtypes, frozen_configs
from realisid_jax.models.unet_2d_condition import UNet2DConditionModel
from realisid_jax.models.vae import AutoencoderKL
from realisid_jax.realisid.branches import RealisID, RealisIDConfig, branches_class
from realisid_jax.sharding import DEFAULT_RULES, Rules
from realisid_jax.text.tokenizer import load_tokenizer, standard_tokenizers

# The trainable part: the branch parameters (both ControlNets and the ID projection).
BRANCH_PARAMS = nnx.All(nnx.Param, nnx.PathContains("realisid"))


class Components(nnx.Module):
    """The models of one RealisID system.

    Attributes:
      unet, vae, text_encoder, text_encoder_2 (``None`` for SD 1.5), image_encoder: the frozen base (CLIP ViT;
        its penultimate hidden layer feeds the ID projection).
      realisid: ``RealisID``: local branch, global branch, ID projection (trained).
    """

    def __init__(self, *, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 text_encoder_2: CLIPTextModelWithProjection | None, image_encoder: CLIPVisionModelWithProjection,
                 realisid: RealisID):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.image_encoder = image_encoder
        self.realisid = realisid

    @property
    def text_encoders(self) -> tuple:
        """One text encoder for SD 1.5, two for SDXL."""
        return tuple(e for e in (self.text_encoder, self.text_encoder_2) if e is not None)

    def named(self) -> dict[str, nnx.Module]:
        """name -> model, for the models present (``text_encoder_2`` absent for SD 1.5)."""
        names = (*FROZEN, "realisid")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def _with_frozen(models: dict[str, nnx.Module], realisid: RealisID) -> Components:
    return Components(**{name: models.get(name) for name in FROZEN}, realisid=realisid)


def apply_kernel_config(components: Components, config: ml_collections.ConfigDict) -> None:
    """The config's kernel choices that are static attributes of the modules (read when a jit traces them):
    ``conv_impl`` for every convolution, ``mesh.gather_weights`` for every conv and linear layer. Call before
    ``nnx.split``; the pipeline, the trainer and the plans do."""
    set_conv_impl(components, config.conv_impl)
    set_weight_gathering(components, config.mesh.gather_weights)


def build_components(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> Components:
    """Randomly initialised components of ``config``, branches included (their own random init: shapes and
    shardings; a run's start copies them from the UNet, see ``random_components``). Traceable: call it under
    ``nnx.eval_shape`` or a jit with ``out_shardings`` to get them abstract or born sharded."""
    kw = dtypes(config)
    models = {name: cls(cfg, rngs=rngs, **kw) for name, (cls, cfg) in frozen_configs(config).items()}
    return _with_frozen(models, branches_class(config)(RealisIDConfig.from_config(config), rngs=rngs,
                                                       **dtypes(config, trainable=True)))


def abstract_branches(config: ml_collections.ConfigDict) -> RealisID:
    """The ``RealisID`` branches of ``config`` (of its ``realisid.branches_class``) with ``ShapeDtypeStruct``
    parameters."""
    return branches_class(config).abstract(RealisIDConfig.from_config(config), **dtypes(config, trainable=True))


def abstract_components(config: ml_collections.ConfigDict) -> Components:
    """Every model with ``ShapeDtypeStruct`` parameters: shapes, counts and shardings without memory."""
    return nnx.eval_shape(lambda: build_components(config, init_rngs(0)))


def random_components(config: ml_collections.ConfigDict, seed: int = 0) -> Components:
    """Randomly initialised frozen models with the branches copied from the UNet (ControlNet ``from_unet``: zero
    Z1/Z2 convs, so fresh branches change nothing). Tiny configs: full-size models need real weights."""
    rngs = nnx.Rngs(seed)
    kw = dtypes(config)
    models = {name: cls(cfg, rngs=rngs, **kw) for name, (cls, cfg) in frozen_configs(config).items()}
    return _with_frozen(models, branches_class(config).from_unet(models["unet"], RealisIDConfig.from_config(config),
                                                                 rngs=rngs))


def base_kind(base: str | Path) -> str:
    """What a ``--base`` / ``--pretrained`` path is: ``"single_file"`` (a Stability ``.safetensors``),
    ``"converted"`` (a ``realisid convert`` orbax cache) or ``"folder"`` (diffusers sub-folders)."""
    path = Path(base)
    if path.suffix == ".safetensors":
        return "single_file"
    if (path / "meta" / "metadata").is_file():
        return "converted"
    return "folder"


def load_base(base: str | Path, config: ml_collections.ConfigDict, *, image_encoder: str | Path | None = None,
              variant: str | None = None, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
              only: Sequence[str] | None = None) -> dict[str, nnx.Module]:
    """The frozen models ``config`` describes, from any accepted base (docs/weights.md).

    Args:
      base: a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ...: plain, variant, sharded or
        ``.bin``), a Stability single ``.safetensors`` file (SDXL / SD 1.5), or a ``realisid convert`` cache.
      image_encoder: a ``CLIPVisionModelWithProjection`` or ``CLIPModel`` folder; default the base's own.
      variant: weights variant of a folder base (``"fp16"``).
      mesh, rules: each parameter is placed straight onto its sharding (the cache restores onto it).
      only: load just these names of ``FROZEN`` (training from precomputed inputs: the UNet; precomputing them:
        the encoders); default all.

    Returns:
      name -> model, every model of ``FROZEN`` the config describes (and ``only`` names).

    Raises:
      FileNotFoundError / ValueError / CheckpointMismatchError: from the loader of that kind; a single file
      or cache without an image encoder and no ``image_encoder`` given.
    """
    described = [name for name in FROZEN if config.model.get(name) is not None and (only is None or name in only)]
    kind = base_kind(base)
    if kind == "folder":
        return load_model_folders(base, config, components=described, image_encoder=image_encoder,
                                  variant=variant, mesh=mesh, rules=rules)
    if kind == "single_file":
        models = load_single_file(base, config, components=[n for n in described if n != "image_encoder"],
                                  mesh=mesh, rules=rules)
    else:
        cached = read_meta(base)["components"]
        models = load_converted_components(base, config, mesh=mesh, rules=rules, components=[
            n for n in described if n in cached and (n != "image_encoder" or image_encoder is None)])
    if "image_encoder" in described and "image_encoder" not in models:
        if image_encoder is None:
            raise FileNotFoundError(f"{base} holds no image encoder; pass one (--image-encoder FOLDER)")
        models.update(load_model_folders(None, config, components=["image_encoder"], image_encoder=image_encoder,
                                         variant=variant, mesh=mesh, rules=rules))
    return models


def base_tokenizers(base: str | Path, config: ml_collections.ConfigDict) -> tuple:
    """One CLIP tokenizer per text encoder ``config`` describes, as ``base`` (see ``load_base``) comes with them:
    a folder's ``tokenizer/`` and ``tokenizer_2/`` (the standard one for a sub-folder it lacks), the pad tokens
    a converted cache recorded, the standard ones for a single file (``text.tokenizer.standard_tokenizers``:
    SDXL's second pads with ``!``).

    Raises:
      TokenizerError: a folder's tokenizer sub-folder does not hold the CLIP tokenizer.
    """
    names = ("tokenizer", "tokenizer_2")[:1 if config.model.get("text_encoder_2") is None else 2]
    kind = base_kind(base)
    if kind == "folder":
        standard = standard_tokenizers(len(names))
        return tuple(load_tokenizer(base, subfolder=name) if (Path(base) / name).is_dir() else standard[i]
                     for i, name in enumerate(names))
    return standard_tokenizers(len(names), read_meta(base).get("pad_tokens") if kind == "converted" else None)


def base_scheduler_config(base: str | Path) -> dict | None:
    """``base``'s noise-schedule config: a folder's ``scheduler/scheduler_config.json``, the one a converted cache
    recorded; None (the schedulers' default, SDXL's) for a single file or when there is none."""
    kind = base_kind(base)
    if kind == "folder":
        path = Path(base) / "scheduler" / "scheduler_config.json"
        return read_json(path) if path.is_file() else None
    return read_meta(base).get("scheduler_config") if kind == "converted" else None


def pretrained_components(config: ml_collections.ConfigDict, pretrained: str | Path, image_encoder: str | Path | None,
                          *, mesh: Mesh | None, rules: Rules, seed: int = 0, fresh_branches: bool = True,
                          variant: str | None = None, loras: Sequence[tuple[str | Path, float]] = (),
                          only: Sequence[str] | None = None) -> Components:
    """The frozen models of ``config`` from ``pretrained`` (any base ``load_base`` accepts: a diffusers folder,
    a single file or a converted cache) and the transformers CLIP vision folder ``image_encoder``
    (default ``pretrained/image_encoder``), each tensor placed straight onto its sharding; the ``loras``
    (``(file, scale)``) merged into the UNet and text encoders (``loading.lora.merge_loras``); fresh branches
    copied from that UNet, or abstract ones (``fresh_branches=False``: the trainer makes them only for a new run).
    ``only``: the frozen models to load (as ``load_base``), the others ``None``.

    Raises:
      FileNotFoundError, ValueError, CheckpointMismatchError: as ``load_model_folders`` (a missing sub-folder, a
      ``config.json`` that describes another architecture than ``config.model``, weights that do not fit).
      LoraError: a LoRA that does not fit (nothing merged).
    """
    models = load_base(pretrained, config, image_encoder=image_encoder, variant=variant, mesh=mesh, rules=rules,
                       only=only)
    merge_loras(models, loras)
    if fresh_branches:
        realisid = branches_class(config).from_unet(models["unet"], RealisIDConfig.from_config(config),
                                                    rngs=nnx.Rngs(seed))
    else:
        realisid = abstract_branches(config)
    return _with_frozen(models, realisid)


def load_converted_components(directory: str | Path, config: ml_collections.ConfigDict, *, mesh: Mesh | None = None,
                              rules: Rules = DEFAULT_RULES, components=None) -> dict[str, nnx.Module]:
    """``loading.orbax_cache.load_converted`` for every cached component, the ``realisid`` branches included
    (name -> model; see there for the arguments and errors)."""
    return load_converted(directory, config, mesh=mesh, rules=rules, components=components,
                          templates={"realisid": lambda: abstract_branches(config)})


def load_branches(folder: str | Path, *, realisid: RealisID | None = None, **kw) -> RealisID:
    """Trained branches from a ``loading.branch_folders.export_branches`` folder (``realisid export``).

    Args:
      folder: holds ``local_branch/``, ``global_branch/``, ``id_projection/`` and ``realisid.json``.
      realisid: model whose three parts are replaced (its ``config`` keeps the scales and crop size); default
        a ``RealisID`` whose config is read from the folders (``RealisIDConfig`` defaults otherwise).
      kw: ``dtype``, ``param_dtype``, ``attention_impl``, ``mesh``, ``rules`` as ``loading.from_pretrained``.

    Raises:
      FileNotFoundError: a part's folder, config or weights missing. CheckpointMismatchError: weights that do
      not fit.
    """
    parts, settings = load_branch_parts(folder, **kw)
    if realisid is None:
        config = RealisIDConfig(**{name: part.config for name, part in parts.items()}, **settings)
        realisid = RealisID.abstract(config, dtype=kw.get("dtype") or jnp.float32, param_dtype=kw.get("param_dtype"),
                                     attention_impl=kw.get("attention_impl", "xla"))
    for name, part in parts.items():
        setattr(realisid, name, part)
    return realisid
