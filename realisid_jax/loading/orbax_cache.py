"""A cache of converted weights: one composite orbax checkpoint, one item per component's NNX state.

Converting a PyTorch checkpoint renames, transposes and casts every tensor on the host; the cache stores the
result in flax layout (tensorstore/OCDBT), so a later run restores each parameter straight onto its sharding:
every device reads only its own shard, with no full host copy per device. Layout of ``DIR``::

    DIR/unet/  DIR/vae/  DIR/text_encoder/  DIR/text_encoder_2/  DIR/image_encoder/  DIR/realisid/  DIR/meta/

``meta`` (JSON) holds the component names and each one's ``c.model`` section, checked on load, and what the
source carried besides weights: its tokenizers' pad tokens and its ``scheduler_config.json``, so that sampling
from the cache gives the source's images.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from realisid_jax.loading.errors import CheckpointMismatchError
from realisid_jax.models.registry import FROZEN, dtypes
from realisid_jax.sharding import DEFAULT_RULES, Rules, state_shardings

FORMAT_VERSION = 1
# Config sections each cached component is built from (compared on load: a different architecture fails).
_SECTIONS = {"realisid": ("unet", "id_projection", "local_branch", "global_branch")}


def _plain(value):
    """ConfigDicts / tuples -> JSON-able dicts / lists."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _describe(config, name: str) -> dict:
    """What the config says component ``name`` is: its ``c.model`` section(s), plus ``c.realisid`` for the
    branches."""
    sections = _SECTIONS.get(name, (name,))
    described = {section: _plain(config.model[section]) for section in sections}
    if name == "realisid":
        # branches_class names code, not weights (a subclass with other parameters fails the restore, naming
        # them): caches converted before the field existed stay valid.
        described["realisid"] = {k: v for k, v in _plain(config.realisid).items() if k != "branches_class"}
    return described


def _abstract(config, name: str, templates: Mapping[str, Callable[[], nnx.Module]]) -> nnx.Module:
    """Component ``name`` of ``config`` with ``ShapeDtypeStruct`` variables (only that one is traced): a frozen
    model of ``models.registry.FROZEN``, or ``templates[name]()`` for others (the RealisID branches)."""
    if name in templates:
        return templates[name]()
    cls, config_class = FROZEN[name]
    return cls.abstract(config_class.from_dict(dict(config.model[name])), **dtypes(config))


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _absolute(directory: str | os.PathLike) -> Path:
    return Path(directory).expanduser().absolute()  # orbax requires absolute paths


def save_converted(directory: str | os.PathLike, models: Mapping[str, nnx.Module], config, *,
                   pad_tokens: Sequence[str] | None = None, scheduler_config: Mapping | None = None) -> Path:
    """Writes ``models`` (name -> NNX module, e.g. ``unet``, ``vae``, ``realisid``) as one orbax checkpoint.

    Args:
      directory: must not exist yet (orbax refuses to overwrite a checkpoint).
      models: concrete models (any sharding); every variable of each is stored in its own dtype.
      config: the project config the models were built from; its model sections go into ``meta``.
      pad_tokens: the source's tokenizers' pad tokens, one per text encoder (None: the standard ones).
      scheduler_config: the source's ``scheduler/scheduler_config.json`` (None: SDXL's).

    Returns:
      The checkpoint directory (absolute).

    Raises:
      ValueError: ``directory`` exists.
    """
    path = _absolute(directory)
    if path.exists():
        raise ValueError(f"{path} exists; choose a new directory for the converted checkpoint")
    items = {name: ocp.args.PyTreeSave(nnx.state(model).to_pure_dict()) for name, model in models.items()}
    meta = {"format": FORMAT_VERSION, "components": list(models),
            "config": {name: _describe(config, name) for name in models},
            "pad_tokens": None if pad_tokens is None else list(pad_tokens),
            "scheduler_config": None if scheduler_config is None else dict(scheduler_config)}
    _checkpointer().save(path, ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)))
    return path


def read_meta(directory: str | os.PathLike) -> dict:
    """The cache's ``meta`` item: ``format``, ``components``, ``config``, ``pad_tokens`` and
    ``scheduler_config`` (None, or absent in older caches: the standard ones).

    Raises:
      FileNotFoundError: ``directory`` is no converted-weights checkpoint.
    """
    path = _absolute(directory)
    meta_file = path / "meta" / "metadata"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a converted-weights cache (no meta item); create one with "
                                f"`realisid convert`")
    return json.loads(meta_file.read_text())


def _stored_shapes(item: Path) -> dict[tuple[str, ...], tuple]:
    tree = ocp.PyTreeCheckpointHandler().metadata(item).tree
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {tuple(str(getattr(k, "key", k)) for k in p): tuple(leaf.shape) for p, leaf in leaves}


def _check_shapes(stored: dict, target: dict, source: str) -> None:
    """orbax would pad or truncate an array restored to another shape: compare first, list all differences."""
    flat = jax.tree_util.tree_flatten_with_path(target)[0]
    wanted = {tuple(str(getattr(k, "key", k)) for k in p): tuple(leaf.shape) for p, leaf in flat}
    missing = [".".join(k) for k in wanted if k not in stored]
    unexpected = [".".join(k) for k in stored if k not in wanted]
    wrong = [(".".join(k), stored[k], shape) for k, shape in wanted.items() if k in stored and stored[k] != shape]
    if missing or unexpected or wrong:
        raise CheckpointMismatchError(source, missing, unexpected, wrong)


def load_converted(directory: str | os.PathLike, config, *, mesh: Mesh | None = None,
                   rules: Rules = DEFAULT_RULES, components: Iterable[str] | None = None,
                   templates: Mapping[str, Callable[[], nnx.Module]] | None = None) -> dict[str, nnx.Module]:
    """Restores cached components, each parameter directly onto its sharding.

    Each model is built abstractly (``nnx.eval_shape``) from ``config``; the shardings of its variables come
    from ``sharding.state_shardings`` (or the first device without ``mesh``), and orbax reads every array
    with ``ArrayRestoreArgs(sharding=..., dtype=...)``: each device gets only its shard, cast on the fly to
    the config's ``param_dtype``.

    Args:
      directory: written by ``save_converted`` / ``realisid convert``.
      config: project config; its model sections must describe the cached architectures.
      mesh, rules: target mesh and logical-axis rules.
      components: names to restore (default: all cached).
      templates: name -> function building the abstract model, for components that are not frozen base models
        (``realisid.components.load_converted_components`` passes the branches').

    Returns:
      name -> model.

    Raises:
      FileNotFoundError: not a cache. KeyError: a requested component is not cached. ValueError: the config
      describes a component differently than when it was cached. CheckpointMismatchError: stored shapes differ.
    """
    path = _absolute(directory)
    meta = read_meta(path)
    names = list(components) if components is not None else meta["components"]
    for name in names:
        if name not in meta["components"]:
            raise KeyError(f"{path} caches {meta['components']}, not {name!r}")
        if _describe(config, name) != meta["config"][name]:
            raise ValueError(f"the config describes {name!r} differently than the cache {path} (cached: "
                             f"{meta['config'][name]}); convert again or use the config it was made with")
    checkpointer = _checkpointer()
    items, graphdefs, states = {}, {}, {}
    for name in names:
        graphdefs[name], states[name] = nnx.split(_abstract(config, name, templates or {}))
        target = states[name].to_pure_dict()
        _check_shapes(_stored_shapes(path / name), target, f"{path / name}")
        if mesh is not None:
            shardings = state_shardings(states[name], mesh, rules).to_pure_dict()
        else:
            shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), target)
        restore_args = jax.tree.map(
            lambda leaf, sharding: ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype),
            target, shardings)
        items[name] = ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
    restored = checkpointer.restore(path, ocp.args.Composite(**items))
    models = {}
    for name in names:
        states[name].replace_by_pure_dict(restored[name])
        models[name] = nnx.merge(graphdefs[name], states[name])
    return models
