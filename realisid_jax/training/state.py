"""Train state, born sharded: the frozen models, RealisID's branches (from the UNet) and the optimiser state.

The train state is a plain dict pytree (what orbax saves and the step donates)::

    {"step": int32 (), "params": nested dict of the RealisID module's nnx.Param arrays,
     "opt_state": optax state over "params", "rng": uint32 (2,) base PRNG key}

Nothing big is materialised unsharded: shapes come from ``nnx.eval_shape`` / ``jax.eval_shape``, shardings from
the logical axis names (``state_shardings``); the frozen models are created by a jit with those
``out_shardings`` (or loaded straight onto them), the branches are copies of the sharded UNet, the optimiser
state is initialised by a jit with ``out_shardings``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from realisid_jax.data.precomputed import ENCODERS
from realisid_jax.models.layer_scan import set_scan_layers
from realisid_jax.models.modeling_utils import fast_compile_options, init_rngs
from realisid_jax.realisid.branches import RealisIDConfig, branches_class
from realisid_jax.realisid.components import (
    BRANCH_PARAMS,
    Components,
    apply_kernel_config,
    build_components,
    pretrained_components,
)
from realisid_jax.sharding import Rules, state_shardings

TrainState = dict[str, Any]


@dataclasses.dataclass
class ModelSetup:
    """What the step needs besides the train state: the ``Components`` container split once.

    Attributes:
      graphdef: the ``Components`` graph definition; rematerialisation flags are baked in.
      frozen_inputs: every variable but the branch parameters (the frozen models' state and the branches'
        non-parameter state), sharded, never donated.
      frozen_shardings: their shardings (same structure).
      param_shardings: shardings of the branch parameters (pure dict, the train state's ``params``).
    """

    graphdef: nnx.GraphDef
    frozen_inputs: nnx.State
    frozen_shardings: nnx.State
    param_shardings: dict


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def remat_policy(name: str) -> Callable | None:
    """The ``jax.checkpoint_policies`` entry ``config.train.remat_policy`` names (e.g. ``"nothing_saveable"``:
    recompute the whole block; ``"dots_with_no_batch_dims_saveable"``: keep the matmul outputs).

    Raises:
      ValueError: no such policy.
    """
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None or name.startswith("_"):
        raise ValueError(f"train.remat_policy: jax.checkpoint_policies has no {name!r}")
    return policy


def enable_remat(components: Components, policy: Callable | None = None) -> None:
    """Rematerialises every block of the networks the backward pass goes through under ``policy``: the frozen
    UNet (gradients reach the branches through its skips) and both ControlNets."""
    for net in (components.unet, components.realisid.local_branch, components.realisid.global_branch):
        net.enable_gradient_checkpointing(policy)


def training_components(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> Components:
    """``build_components`` as the step holds them: with ``train.precomputed_inputs`` without the VAE, the text
    encoders and the image encoder (``None``; built and dropped, so the UNet's random values do not change)."""
    return without_encoders(build_components(config, rngs), config)


def without_encoders(components: Components, config: ml_collections.ConfigDict) -> Components:
    """``components`` with the frozen encoders set to ``None`` when ``train.precomputed_inputs``, in place."""
    if config.train.precomputed_inputs:
        for name in ENCODERS:
            setattr(components, name, None)
    return components


def split_components(components: Components, config: ml_collections.ConfigDict
                     ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, branch params, the rest)`` of (abstract or concrete) components, with the config's
    kernel choices (``apply_kernel_config``), ``train.scan_layers`` and, with ``train.remat``, every block
    rematerialised under ``train.remat_policy``."""
    apply_kernel_config(components, config)
    set_scan_layers(components, config.train.scan_layers)
    if config.train.remat:
        enable_remat(components, remat_policy(config.train.remat_policy))
    return nnx.split(components, BRANCH_PARAMS, ...)


def build_models(config: ml_collections.ConfigDict, mesh: Mesh, rules: Rules, *, pretrained: Path | None = None,
                 image_encoder: Path | None = None, variant: str | None = None,
                 loras: Sequence[tuple[str | Path, float]] = ()) -> tuple[ModelSetup, dict, Callable[[], dict]]:
    """Frozen models, born sharded on ``mesh`` (random: a jit with ``out_shardings``; or loaded from
    ``pretrained`` / ``image_encoder`` straight onto their shardings, with ``variant`` and the ``loras`` merged:
    ``realisid.components.pretrained_components``), and the branches' shapes. With ``train.precomputed_inputs``
    the VAE, text encoders and image encoder are neither built nor loaded (``image_encoder`` is not read).

    Returns:
      ``(setup, abstract_params, make_params)``: the branch parameters' shapes (pure dict of
      ``ShapeDtypeStruct``) and a function giving their initial values, sharded: both ControlNets copied from
      the frozen UNet (``from_unet`` of ``config.realisid.branches_class``, eager: its copies keep the UNet's
      shardings, the new small parts are then moved onto theirs). A resumed run does not call it.

    Raises:
      ValueError: only one of ``pretrained`` / ``image_encoder`` given (raw inputs), or ``loras`` without them.
    """
    precomputed = bool(config.train.precomputed_inputs)
    if not precomputed and (pretrained is None) != (image_encoder is None):
        raise ValueError("pass both --pretrained and --image-encoder, or neither (random weights)")
    seed = int(config.train.seed)
    if pretrained is None and loras:
        raise ValueError("--lora needs --pretrained: a LoRA is made for real weights")
    if pretrained is None:
        def random_split():
            return split_components(training_components(config, init_rngs(seed)), config)

        graphdef, abstract_params, abstract_rest = nnx.eval_shape(random_split)
        frozen_shardings = state_shardings(abstract_rest, mesh, rules)
        init = jax.jit(lambda: random_split()[2], out_shardings=frozen_shardings).lower()
        rest = init.compile(compiler_options=fast_compile_options())()
        unet = nnx.merge(graphdef, abstract_params, rest).unet
    else:
        components = pretrained_components(config, pretrained, None if precomputed else image_encoder, mesh=mesh,
                                           rules=rules, fresh_branches=False, variant=variant, loras=loras,
                                           only=("unet",) if precomputed else None)
        graphdef, abstract_params, rest = split_components(components, config)
        frozen_shardings = state_shardings(rest, mesh, rules)
        unet = components.unet
    branch_params = abstract_params["realisid"]
    param_shardings = state_shardings(branch_params, mesh, rules)
    branch_config = RealisIDConfig.from_config(config)
    branches_cls = branches_class(config)

    def make_params() -> dict:
        branches = branches_cls.from_unet(unet, branch_config, rngs=nnx.Rngs(seed + 1))
        # Copies of a UNet stored in frozen_param_dtype (bf16) become the branches' param_dtype (fp32 masters).
        return jax.tree.map(lambda x, a, sharding: _onto(x.astype(a.dtype), sharding),
                            nnx.state(branches, nnx.Param).to_pure_dict(), branch_params.to_pure_dict(),
                            param_shardings.to_pure_dict())

    setup = ModelSetup(graphdef=graphdef, frozen_inputs=rest, frozen_shardings=frozen_shardings,
                       param_shardings=param_shardings.to_pure_dict())
    return setup, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), branch_params.to_pure_dict()), \
        make_params


def _onto(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    # The new weights (condition encoders, projection, zero convs) live on one local device. On multi-host they
    # cannot be transferred from there to a global sharding; the same host value on every process can.
    if len(x.sharding.device_set) == 1 < len(sharding.device_set):
        x = np.asarray(x)
    return jax.device_put(x, sharding)


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_params: dict, param_shardings: dict,
                        mesh: Mesh) -> Any:
    """Shardings of ``optimizer.init(params)``: moments shard like their parameters, counters replicate."""
    abstract = jax.eval_shape(optimizer.init, abstract_params)
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract, param_shardings,
                                 transform_non_params=lambda _: replicated(mesh))


def train_state_shardings(optimizer: optax.GradientTransformation, params: dict, setup: ModelSetup,
                          mesh: Mesh) -> TrainState:
    """Shardings of the whole train state (``params`` concrete or abstract)."""
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return {"step": replicated(mesh), "params": setup.param_shardings,
            "opt_state": opt_state_shardings(optimizer, abstract_params, setup.param_shardings, mesh),
            "rng": replicated(mesh)}


def init_train_state(optimizer: optax.GradientTransformation, params: dict, shardings: TrainState,
                     seed: int) -> TrainState:
    """Step 0: the branches' initial ``params`` (donated), fresh optimiser state, ``PRNGKey(seed)`` (a raw
    uint32 key, so that it checkpoints as a plain array)."""

    return jax.jit(lambda p: initial_train_state(optimizer, p, seed), out_shardings=shardings,
                   donate_argnums=0)(params)


def initial_train_state(optimizer: optax.GradientTransformation, params: dict, seed: int) -> TrainState:
    """The step-0 train state of ``params`` (traceable; see the module docstring for its layout)."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params),
            "rng": jax.random.PRNGKey(seed)}


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """Each leaf as ``ShapeDtypeStruct(shape, dtype, sharding=...)`` (trees of the same structure)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def abstract_train_state(optimizer: optax.GradientTransformation, abstract_params: dict, shardings: TrainState,
                         seed: int) -> TrainState:
    """``ShapeDtypeStruct`` with its sharding for every leaf of the train state: a checkpoint's restore target."""
    return with_shardings(jax.eval_shape(lambda p: initial_train_state(optimizer, p, seed), abstract_params), shardings)
