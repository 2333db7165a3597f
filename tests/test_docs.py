"""The documentation site builds with no warning, its executed guides included (``make docs``).

The build is what ``make docs`` runs, ``sphinx-build -W --keep-going``, into a fresh folder with a fresh
environment, so that a warning of any page (a docstring that does not render, a broken reference, a guide cell
that raises) fails this test. The guides' outputs are cached by their code in ``docs/_build/.jupyter_cache``
(myst-nb), shared with ``make docs``: a guide runs again only when it changed (about a minute on 2 CPU cores).
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPHINX = Path(sys.executable).parent / "sphinx-build"


def test_docs_build_without_warnings(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [str(SPHINX), "-W", "--keep-going", "-q", "-E", "-b", "html", "-d", str(tmp_path / "doctrees"),
         str(ROOT / "docs"), str(tmp_path / "html")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout[-5000:]}\n{result.stderr[-10000:]}"
    html = tmp_path / "html"
    for page in ("index", "getting-started", "method", "guides/extending", "benchmarks", "api", "glyphs",
                 "_autosummary/realisid_jax.realisid.branches"):
        assert (html / f"{page}.html").is_file(), page
    # The guide ran in this build or an earlier one with the same code: its outputs are on the page.
    guide = (html / "guides" / "extending.html").read_text()
    assert "identical residuals at initialisation" in guide
    assert "head_branch" in guide and "uint8" in guide
