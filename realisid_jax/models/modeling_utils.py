"""What every model shares: a config dataclass read from ``config.json``, abstract construction, and the PyTorch
names of its variables (``torch_key``), which ``realisid_jax.loading`` uses to import diffusers/transformers
checkpoints (diffusers' ``ModelMixin`` / ``ConfigMixin``; loading itself lives in ``loading.pretrained``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Self

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

VariablePath = tuple[str | int, ...]
_TORCH_NAME = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_key(path: VariablePath) -> str:
    """The PyTorch state-dict key of an NNX variable path."""
    *modules, leaf = path
    return ".".join(str(p) for p in (*modules, _TORCH_NAME.get(leaf, leaf)))


def freeze_nested(value):
    """Nested lists from ``config.json`` (e.g. per-layer transformer depths) as nested tuples (hashable)."""
    return tuple(freeze_nested(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base of the frozen config dataclasses; field names are the diffusers/transformers ``config.json`` keys."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """Builds the config from ``config.json`` contents; keys the model does not use are ignored, lists
        become tuples (configs are hashable, so they can be static jit arguments)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: freeze_nested(v) for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def count_params(model_or_state) -> int:
    """Number of parameters (``nnx.Param`` elements) of a model or state, abstract or concrete."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state))


def init_rngs(seed: int | jax.Array) -> nnx.Rngs:
    """``nnx.Rngs(seed)`` (same draws) for building models inside a trace (``eval_shape``, ``jit``).

    The RNG count lives in a Ref: updating a traced count otherwise makes flax read the tracer's ``.sharding``,
    whose error message walks the whole jaxpr on every draw. Tracing becomes quadratic in the number of
    parameters: SDXL UNet ``eval_shape`` took over 5 minutes instead of 9 s, the tiny SDXL frozen models 12.8 s
    instead of 1.8 s.
    """
    with nnx.var_defaults(ref=True):
        return nnx.Rngs(seed)


def fast_compile_options() -> dict:
    """XLA options for programs whose speed does not matter, on CPU: no LLVM optimisation. Random initialisers
    run once (optimising their threefry code took minutes for a tiny model under load); a memory plan only
    needs buffer assignment, which precedes code generation."""
    return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}


def abstract_module(build: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    """``nnx.eval_shape`` of ``build(rngs)``: the module with ``ShapeDtypeStruct`` parameters, no memory."""
    return nnx.eval_shape(lambda: build(init_rngs(0)))


class PretrainedMixin:
    """What ``loading.pretrained.from_pretrained`` needs of a model class ``cls(config, *, rngs, dtype, param_dtype,
    attention_impl)``: its config class, weight file names, PyTorch key names and buffers to ignore."""

    config_class: ClassVar[type[ModelConfig]]
    weights_names: ClassVar[tuple[str, ...]] = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    # Regexes of checkpoint keys that are buffers, not parameters.
    ignore_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def torch_key(cls, path: VariablePath) -> str:
        """NNX path -> PyTorch key; the identity rename unless a class's tree differs from PyTorch's."""
        return torch_key(path)

    @classmethod
    def rename_checkpoint(cls, state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Normalises a checkpoint's keys before they are matched; the identity unless a class accepts several
        on-disk layouts (transformers 5 saves ``CLIPTextModel`` without the ``text_model.`` prefix)."""
        return state_dict

    @classmethod
    def abstract(cls, config: ModelConfig, *, dtype=jnp.float32, param_dtype=None, attention_impl: str | None = "xla"):
        """The model with ``ShapeDtypeStruct`` parameters: shapes, counts and shardings without memory."""

        return abstract_module(lambda rngs: cls(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype or dtype,
                                                attention_impl=attention_impl))

