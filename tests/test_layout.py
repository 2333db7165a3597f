"""The folder tree shows the method, and imports point one way (top to bottom):

    cli                           `realisid <command>`
    commands/                     one module per command
    glyphs/                       the glyph world: renders, base models, scorer (uses what is below like any user)
    app/                          the web app's request handler and page
    training/                     trainer, step, state, checkpoints
    eval/, data/                  evaluation protocol; dataset preparation and input pipeline
    realisid/                     the method (Eqs. 3-8)
    loading/                      checkpoint formats -> models (and the pipeline folder's tokenizers)
    text/                         tokenizer, prompt encoding
    models/                       diffusers / transformers mirrors
    face/, schedulers/            host-side face analysis; samplers
    config                        config files
    sharding, assets, folders,    mesh and rules; offline assets; local folders only; errors in one line
    errors

Every import is read from the source (lazy ones inside functions included), so a deferred import cannot hide
an arrow that runs back up.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "realisid_jax"
LAYERS = [
    {"cli"},
    {"commands"},
    {"glyphs"},
    {"app"},
    {"training"},
    {"eval", "data"},
    {"realisid"},
    {"loading"},
    {"text"},
    {"models"},
    {"face", "schedulers"},
    {"config"},
    {"sharding", "assets", "folders", "errors"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("realisid_jax")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("realisid_jax"):
                found |= {f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names}
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in GRAPH} - {""}
    assert units <= set(RANK), f"place these in LAYERS: {sorted(units - set(RANK))}"


def test_imports_point_down():
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
              if _unit(m) and _unit(t) and _unit(m) != _unit(t) and RANK[_unit(t)] <= RANK[_unit(m)]]
    assert not upward, "imports that do not point down the layers:\n" + "\n".join(sorted(upward))


def test_no_module_cycles():
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            t = t if t in GRAPH else t.rpartition(".")[0]
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t in GRAPH and t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_method_is_one_folder():
    method = {p.stem for p in (PACKAGE / "realisid").glob("*.py")}
    assert {"ops", "branches", "conditions", "objective", "components", "pipeline"} <= method


@pytest.mark.parametrize("package", ["models", "loading", "text", "face", "schedulers", "realisid"])
def test_package_imports_in_isolation(package):
    """Each lower package imports on its own (nothing above it needed at import time)."""
    code = f"import sys, realisid_jax.{package}; import pkgutil, importlib\n" \
           f"for m in pkgutil.iter_modules(realisid_jax.{package}.__path__): " \
           f"importlib.import_module('realisid_jax.{package}.' + m.name)\n" \
           f"above = sorted({{n.split('.')[1] for n in sys.modules if n.startswith('realisid_jax.')}} & set({sorted(set().union(*LAYERS[:RANK[package]]))!r}))\n" \
           f"assert not above, above"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
