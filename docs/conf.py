"""Sphinx configuration: MyST Markdown pages, executed Jupytext guides (myst-nb), the API reference from the
Google-style docstrings (autodoc, autosummary, napoleon). Built by ``make docs`` into ``docs/_build/html``."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The executed guides run tiny programs on the CPU, where compiling dominates: XLA's backend optimisation is
# skipped (as the test suite does) and nothing is fetched from a model hub. The guide kernels inherit these.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

project = "realisid-jax"
author = "realisid-jax authors"
copyright = "realisid-jax authors, Apache-2.0"
release = version = "0.1.0"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints"]
templates_path = ["_templates"]

# MyST: $...$ maths, ::: fences, definition lists, header anchors for links to sections.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# myst-nb: an executed page runs when its code changed (otherwise its outputs come from the cache); a cell that
# raises fails the build.
nb_execution_mode = "cache"
# One cache for `make docs` and tests/test_docs.py, whatever the output folder.
nb_execution_cache_path = str(Path(__file__).resolve().parent / "_build" / ".jupyter_cache")
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_output_stderr = "remove"  # progress bars and library logging; errors still fail the build

# API reference.
autosummary_generate = True
autosummary_ignore_module_all = False
autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, not attribute entries that would duplicate dataclass fields
napoleon_use_rtype = False

html_theme = "furo"
html_title = "realisid-jax"
html_static_path = []
