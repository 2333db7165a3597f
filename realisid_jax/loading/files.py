"""Locate and read PyTorch checkpoint files from local folders (no hub access, no pickled code run)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np


def read_json(path: Path) -> dict:
    """Reads a ``config.json``-style file. Raises FileNotFoundError naming the folder and file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found in {path.parent}")
    with open(path) as f:
        return json.load(f)


def weight_names(names: Sequence[str], variant: str | None) -> list[str]:
    """File names to look for, in order: each of ``names`` then its sharded index (``<name>.index.json``), with
    ``variant`` inserted before the last suffix as diffusers' / transformers' ``_add_variant`` do
    (``model.fp16.safetensors``, ``model.safetensors.index.fp16.json``)."""
    out = []
    for name in names:
        for candidate in (name, f"{name}.index.json"):
            out.append(_add_variant(candidate, variant))
    return out


def _add_variant(name: str, variant: str | None) -> str:
    if variant is None:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def folder_variants(folder: Path, names: Sequence[str]) -> list[str]:
    """The variants whose weights ``folder`` holds (``fp16`` for ``model.fp16.safetensors``), sorted."""
    found = set()
    for name in names:
        stem, suffix = name.rsplit(".", 1)
        patterns = (re.compile(rf"{re.escape(stem)}\.([^.\-]+)\.{re.escape(suffix)}"),
                    re.compile(rf"{re.escape(name)}\.index\.([^.]+)\.json"))
        for path in folder.iterdir():
            for pattern in patterns:
                match = pattern.fullmatch(path.name)
                if match:
                    found.add(match.group(1))
    return sorted(found)


def find_weights(folder: Path, names: Sequence[str], *, variant: str | None = None) -> list[Path]:
    """The weight files of one model in ``folder``: one file, or every shard its ``*.index.json`` lists.

    The rules are diffusers' ``_get_model_file`` / transformers' ``_get_resolved_checkpoint_files`` for local
    folders: ``names`` in preferred order (safetensors first), each as a single file or as a sharded index
    (``diffusion_pytorch_model.safetensors.index.json`` whose ``weight_map`` names the shards). With
    ``variant`` (``"fp16"``) that variant's files (``diffusion_pytorch_model.fp16.safetensors``), or, when the
    folder has none, its plain files with a one-line note (as ``DiffusionPipeline.from_pretrained`` does for
    components without the variant). Without it, a folder that holds no plain weights but exactly one variant
    loads that variant, with a one-line note on stdout.

    Raises:
      FileNotFoundError: no weights (the message lists the names looked for and what the folder holds), a
        shard an index lists is missing, or ``variant`` is absent (the folder's variants are named).
      ValueError: no plain weights but several variants, and ``variant`` not given.
    """
    looked_for = weight_names(names, variant)
    for name in looked_for:
        if (folder / name).is_file():
            return _shards(folder / name) if name.endswith(".json") else [folder / name]
    present = sorted(p.name for p in folder.iterdir())
    variants = folder_variants(folder, names)
    if variant is not None and any(name in present for name in weight_names(names, None)):
        print(f"note: {folder} has no {variant} weights; loading its plain files")
        return find_weights(folder, names)
    if variant is None and len(variants) == 1:
        print(f"note: {folder} holds only {variants[0]} weights; loading those (variant={variants[0]!r})")
        return find_weights(folder, names, variant=variants[0])
    if variant is None and variants:
        raise ValueError(f"{folder} holds no plain weights but the variants {variants}; choose one (--variant)")
    hint = f" (it holds the variants {variants})" if variants else ""
    raise FileNotFoundError(f"no weights file in {folder}: looked for {looked_for}, found {present}{hint}")


def _shards(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` (``{"weight_map": {key: shard file}}``) lists, in first-use order."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no weight_map: not a sharded-checkpoint index")
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{index.name} lists shards missing from {index.parent}: {missing}")
    return shards


class SafetensorsWeights(Mapping[str, np.ndarray]):
    """A read-only, lazy state dict over one or several ``.safetensors`` files (the shards of one checkpoint).

    Keys, shapes and dtypes come from the files' headers at construction; each tensor is read only when it is
    looked up, through a ``safe_open`` that is closed right after, so the file's mapped pages are released and
    the caller holds at most the tensors it keeps (loading streams one tensor at a time instead of holding a
    second full copy of the checkpoint). Values are host numpy arrays, bfloat16 as ``ml_dtypes.bfloat16``.

    Raises:
      ValueError: a file whose header cannot be parsed (naming the file), or a key present in two shards.
    """

    def __init__(self, paths: Sequence[Path]):
        self._files: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in paths:
            shapes = _safetensors_shapes(path)
            twice = sorted(set(shapes) & set(self._files))
            if twice:
                raise ValueError(f"{path} repeats keys of an earlier shard: {twice[:5]}")
            self._files.update(dict.fromkeys(shapes, path))
            self._shapes.update(shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape from the header, without reading it. Raises KeyError for an absent key."""
        return self._shapes[key]

    def subset(self, keys: Iterable[str]) -> SafetensorsWeights:
        """The same files restricted to ``keys``, still unread. Raises KeyError for an absent key."""
        out = object.__new__(SafetensorsWeights)
        out._files = {k: self._files[k] for k in keys}
        out._shapes = {k: self._shapes[k] for k in out._files}
        return out

    def __getitem__(self, key: str) -> np.ndarray:
        from safetensors import safe_open

        path = self._files[key]
        try:
            with safe_open(str(path), framework="numpy") as f:
                return f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read {key!r} from safetensors file {path}: {e}") from e

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape from a ``.safetensors`` header; ValueError naming the file when it cannot be parsed."""
    import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, which safetensors' numpy reader needs
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"cannot read safetensors file {path}: {e}") from e


def read_weights(paths: Sequence[Path]) -> Mapping[str, np.ndarray]:
    """The state dict of one checkpoint's files (its shards), merged: a lazy ``SafetensorsWeights`` when
    every file is ``.safetensors``, else ``read_state_dict`` of each file in one dict.

    Raises:
      ValueError: a key present in two shards, or as ``read_state_dict``.
    """
    if all(path.suffix == ".safetensors" for path in paths):
        return SafetensorsWeights(paths)
    state: dict[str, np.ndarray] = {}
    for path in paths:
        part = read_state_dict(path)
        twice = sorted(set(part) & set(state))
        if twice:
            raise ValueError(f"{path} repeats keys of an earlier shard: {twice[:5]}")
        state.update(part)
    return state


def read_state_dict(path: Path) -> Mapping[str, np.ndarray]:
    """Reads a PyTorch state dict of host numpy arrays (bfloat16 kept as ``ml_dtypes.bfloat16``).

    ``.safetensors`` gives a lazy ``SafetensorsWeights`` (header read now, each tensor on access);
    ``.bin``/``.pt`` a dict read with ``torch.load(weights_only=True)``, whose restricted unpickler runs no
    code from the file (requires the ``torch`` extra).

    Raises:
      ImportError: a ``.bin`` file without PyTorch installed.
      ValueError: the file cannot be parsed.
    """
    if path.suffix == ".safetensors":
        return SafetensorsWeights([path])
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a PyTorch pickle; install the torch extra (pip install "
                          f"'realisid-jax[torch]') or convert it to .safetensors") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read PyTorch checkpoint {path}: {e}") from e
    import ml_dtypes

    def to_numpy(t):
        if t.dtype == torch.bfloat16:
            return t.float().numpy().astype(ml_dtypes.bfloat16)
        return t.numpy()

    return {k: to_numpy(v) for k, v in state.items()}
