"""Test set-up: 8 simulated CPU devices for every sharded path, and no model hub; a run that skips the browser
test ends with the command that installs Chromium."""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: compiling dominates every test, and LLVM's optimisation is a large part of a CPU compile (~35%
# for the small UNets of test_unet.py; 18 s -> 1.5 s for a ControlNet initialiser). Subprocesses inherit the
# flag, so their programs hit the cache below.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# Must run before any backend use: every sharded path is tested on (1), (8,1,1), (2,4,1), (2,2,2).
jax.config.update("jax_num_cpu_devices", 8)

# Compiled programs are cached on disk (per user, across runs and xdist workers; the key covers the program, the
# devices and the jax version): the trainer tests compile the same tiny step in several processes.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), f"realisid_jax_tests_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "5")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


@pytest.fixture(scope="session")
def face_models():
    """Fetches the MediaPipe model files (``realisid_jax.assets``); skips the test when they are unavailable."""
    from realisid_jax import assets

    try:
        assets.fetch(["face_detection_short_range.tflite", "face_landmark.tflite"])
    except assets.AssetError as err:
        pytest.skip(f"MediaPipe model files unavailable: {err}")


# What a fresh machine lacks for the web app's browser test (.ci/run installs the same, as root).
BROWSER_SETUP = "sudo apt-get install -y chromium chromium-driver"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
    """After the summary, one line when the browser test was skipped for want of Chromium: the command that
    installs it."""
    result = yield
    if any(r.nodeid.split("::")[0].endswith("test_app_browser.py") and "chromium" in str(r.longrepr)
           for r in terminalreporter.stats.get("skipped", [])):
        terminalreporter.write_line(f"the browser test was skipped (no chromium / chromedriver); to run it: "
                                    f"{BROWSER_SETUP}", yellow=True)
    return result
