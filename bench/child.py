"""Measurements that need a fresh process; ``bench.run`` starts them and reads the JSON line they print.

    python -m bench.child compile --config tiny --cache-dir DIR   # compile times, persistent cache in DIR
    python -m bench.child rss --config tiny --framework jax|torch --persons K
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux ``clear_refs`` 5); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def compile_times(config_name: str, cache_dir: str, persons: int) -> dict:
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from bench.models import build_models, jax_args, jax_step, make_inputs
    from bench.run import load
    from bench.sampling import jax_sampler, make_sampling_inputs

    config = load(config_name)
    models = build_models(config, frameworks=("jax",))
    inputs = make_inputs(config, models.realisid_config, batch=1, persons=persons)
    start = time.perf_counter()
    lowered = jax_step.lower(models.unet_def, models.realisid_def, *jax_args(models, inputs))
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    step_s = time.perf_counter() - start
    run, _ = jax_sampler(models, make_sampling_inputs(config, inputs, int(config.sampling.num_inference_steps)))
    start = time.perf_counter()
    run()  # trace + compile + one sampling run
    first_sample_s = time.perf_counter() - start
    start = time.perf_counter()
    run()
    sample_s = time.perf_counter() - start
    return {"step_lower_s": lower_s, "step_compile_s": step_s, "sample_compile_s": first_sample_s - sample_s}


def peak_rss(config_name: str, framework: str, persons: int) -> dict:
    from bench.models import build_models, jax_args, make_inputs, run_jax_step, run_torch_step, torch_args
    from bench.run import load, set_threads

    set_threads()
    config = load(config_name)
    models = build_models(config, frameworks=(framework,))
    inputs = make_inputs(config, models.realisid_config, batch=1, persons=persons)
    if framework == "jax":
        args = jax_args(models, inputs)
        step = lambda: run_jax_step(models, args)  # noqa: E731
    else:
        args = torch_args(inputs)
        step = lambda: run_torch_step(models, args)  # noqa: E731
    before = _status_mib("VmRSS")
    reset = _reset_peak_rss()
    for _ in range(2):
        step()
    return {"models_rss_mib": before, "peak_rss_mib": _status_mib("VmHWM"), "peak_reset": reset}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["compile", "rss"])
    p.add_argument("--config", default="tiny")
    p.add_argument("--cache-dir")
    p.add_argument("--framework", choices=["jax", "torch"], default="jax")
    p.add_argument("--persons", type=int, default=1)
    args = p.parse_args(argv)
    if args.mode == "compile":
        result = compile_times(args.config, args.cache_dir, args.persons)
    else:
        result = peak_rss(args.config, args.framework, args.persons)
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
