"""A first run prints only the project's own lines: ``realisid sample`` (the tiny config, as ``make demo`` runs
it) and ``realisid faces``, started in a subprocess as a user starts them on this host, write to stderr their
notes, warnings and progress bars and nothing else — no TPU-runtime (libtpu) or TensorFlow Lite start-up text.
And a test run that skips the browser test for want of Chromium ends by saying how to install it."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from skimage import data

import conftest

ROOT = Path(__file__).resolve().parents[1]
# One stderr line of the project: a note or warning, or a tqdm progress bar ("denoising:  50%|#####  | 1/2 ...").
PROJECT_LINE = re.compile(r"(note|warning): .+|\w[\w ]*: +\d+%\|.*")


def _realisid(*args: str) -> subprocess.CompletedProcess:
    # A user's environment: without the TPU settings the test modules put in this process (tests/test_tpu_aot.py)
    # or a platform choice; the compile flags and cache of conftest.py stay (they only make it faster).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TPU_") and k not in ("JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU_LOAD")}
    return subprocess.run([sys.executable, "-m", "realisid_jax.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.usefixtures("face_models")
def test_sample_writes_only_its_own_lines_to_stderr(tmp_path):
    proc = _realisid("sample", "--config", "configs/sdxl.py:tiny", "--out", str(tmp_path), "--steps", "1",
                     "--height", "64", "--width", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "image_000.png").is_file()
    foreign = [line for line in re.split(r"[\r\n]+", proc.stderr) if line and not PROJECT_LINE.fullmatch(line)]
    assert not foreign, "not the project's lines:\n" + "\n".join(foreign)
    assert "denoising:" in proc.stderr  # the progress bar is there


@pytest.mark.usefixtures("face_models")
def test_faces_writes_nothing_to_stderr(tmp_path):
    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    proc = _realisid("faces", str(tmp_path / "astronaut.png"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    assert "1 face(s)" in proc.stdout


@pytest.mark.parametrize("reason, says", [
    ("no chromium / chromedriver (apt-get install chromium chromium-driver)", True),
    ("MediaPipe model files unavailable: offline", False),  # Chromium would not help
])
def test_a_run_without_chromium_ends_with_the_command_that_installs_it(reason, says):
    report = SimpleNamespace(nodeid="tests/test_app_browser.py::test_generate_in_the_browser",
                             longrepr=("tests/test_app_browser.py", 77, f"Skipped: {reason}"))
    lines = []
    reporter = SimpleNamespace(stats={"skipped": [report]}, write_line=lambda line, **_: lines.append(line))
    summary = conftest.pytest_terminal_summary(reporter)
    next(summary)  # the rest of the summary is written here
    with pytest.raises(StopIteration):
        summary.send(None)
    assert [conftest.BROWSER_SETUP in line for line in lines] == ([True] if says else [])
