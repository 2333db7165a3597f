"""Which XLA:CPU kernels (``attention_impl``, ``conv_impl``) a CPU config uses: measured per CPU, not constants.

The kernels that win depend on the CPU and the shapes (XLA:CPU's own convolution runs a 3x3 conv of a 2x2x1280
map at 2 GFLOP/s on an AVX-512 EPYC, im2col at 21; docs/benchmarks.md, "XLA:CPU kernels by CPU"). A CPU config
therefore calls :func:`apply` with the choice measured on each instruction-set class; ``realisid tune-cpu``
measures the candidates on this CPU at the config's shapes and writes the winner to a cache file, which
:func:`apply` prefers. The cache is a JSON file,
``$REALISID_CPU_KERNELS`` or ``~/.cache/realisid_jax/cpu_kernels.json``::

    {"<cpu key>": {"<shape key>": {"attention_impl": "xla", "conv_impl": "xla", "seconds": {...}}}}

``REALISID_CPU_KERNELS=off`` ignores the cache (the configs' per-ISA defaults only). A ``--config.attention_impl``
/ ``--config.conv_impl`` override on the command line still wins over both (applied after ``get_config``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from realisid_jax.models.layers import CONV_IMPLS

ATTENTION_IMPLS = ("xla", "chunked")  # the XLA:CPU kernels of models.layers.attention
ISA_CLASSES = ("avx512", "avx2", "baseline")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """One choice of the config's two kernel fields."""

    attention_impl: str
    conv_impl: str

    def __str__(self) -> str:
        return f"{self.attention_impl}/{self.conv_impl}"


CANDIDATES = tuple(Kernels(a, c) for a in ATTENTION_IMPLS for c in CONV_IMPLS)


# ------------------------------------------------------------------------------------------ which CPU
def cpu_info(cpuinfo: str | None = None) -> tuple[str, frozenset[str]]:
    """(model name, ISA flags) of this CPU from ``/proc/cpuinfo`` (text given for tests); ("unknown", {})
    where there is none (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip(), value.strip())
    return fields.get("model name", "unknown"), frozenset(fields.get("flags", "").split())


def isa_class(flags: frozenset[str]) -> str:
    """``avx512`` (AVX-512 F/BW/VL: XLA's and oneDNN's 512-bit kernels), ``avx2`` or ``baseline``."""
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "baseline"


def cpu_key(cpuinfo: str | None = None, cores: int | None = None) -> str:
    """The cache's CPU key: model, ISA class and core count (virtual machines often report only "AMD EPYC",
    so the model name alone does not tell an AVX2 host from an AVX-512 one), e.g. ``AMD EPYC|avx512|2``."""
    model, flags = cpu_info(cpuinfo)
    return f"{model}|{isa_class(flags)}|{cores or os.cpu_count()}"


def shape_key(config) -> str:
    """The cache's shape key of a config: UNet widths, heads, latent sizes and the training batch, e.g.
    ``unet=320,640,1280,1280 heads=8 latent=32/32 batch=1``."""
    unet = config.model["unet"]
    heads = unet.get("attention_head_dim")
    heads = ",".join(map(str, heads)) if isinstance(heads, (tuple, list)) else str(heads)
    return (f"unet={','.join(map(str, unet['block_out_channels']))} heads={heads} "
            f"latent={int(config.sampling.height) // 8}/{int(config.train.resolution) // 8} "
            f"batch={int(config.train.batch_size)}")


# ------------------------------------------------------------------------------------------ the cache
def cache_path() -> Path | None:
    """The cache file, or None where ``REALISID_CPU_KERNELS=off``."""
    env = os.environ.get("REALISID_CPU_KERNELS", "")
    if env.lower() == "off":
        return None
    return Path(env) if env else Path.home() / ".cache" / "realisid_jax" / "cpu_kernels.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: the defaults, as on a CPU never tuned
    return data if isinstance(data, dict) else {}


def lookup(cpu: str, shapes: str, path: Path | None = None) -> Kernels | None:
    """The cached choice for (``cpu``, ``shapes``), or None."""
    path = path or cache_path()
    entry = _read(path).get(cpu, {}).get(shapes) if path else None
    try:
        choice = Kernels(entry["attention_impl"], entry["conv_impl"])
    except (TypeError, KeyError):
        return None
    return choice if choice in CANDIDATES else None


def record(cpu: str, shapes: str, choice: Kernels, seconds: Mapping[Kernels, float], path: Path) -> None:
    """Writes ``choice`` and the measured ``seconds`` per candidate for (``cpu``, ``shapes``) into ``path``,
    keeping every other entry."""
    data = _read(path)
    data.setdefault(cpu, {})[shapes] = dict(attention_impl=choice.attention_impl, conv_impl=choice.conv_impl,
                                            seconds={str(k): round(v, 4) for k, v in seconds.items()},
                                            measured=time.strftime("%Y-%m-%d"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)  # atomic: a config loading at the same time reads the old file or the new, never half


def choose(config, defaults: Mapping[str, Kernels], fallback: Kernels, *, cpu: str | None = None) -> Kernels:
    """The kernels for ``config`` on this CPU: the cache's measured choice, else ``defaults[isa class]``
    (measured on such a CPU), else ``fallback``."""
    cpu = cpu or cpu_key()
    cached = lookup(cpu, shape_key(config))
    return cached or defaults.get(cpu.split("|")[1], fallback)


def apply(config, defaults: Mapping[str, Kernels], fallback: Kernels) -> Kernels:
    """Sets ``config.attention_impl`` / ``config.conv_impl`` to :func:`choose`'s kernels (what the CPU configs
    call at the end of ``get_config``) and returns them."""
    choice = choose(config, defaults, fallback)
    config.attention_impl, config.conv_impl = choice.attention_impl, choice.conv_impl
    return choice


# ------------------------------------------------------------------------------------------ the measurement
def median_seconds(runs: Mapping[Kernels, Callable[[], object]], repeat: int,
                   clock: Callable[[], float] = time.perf_counter) -> dict[Kernels, float]:
    """Median seconds of each candidate's ``run`` (which blocks until done), called round-robin ``repeat``
    times after one untimed round (compilation, caches), so a change of machine load hits all alike."""
    for run in runs.values():
        run()
    times: dict[Kernels, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):
        for k, run in runs.items():
            start = clock()
            run()
            times[k].append(clock() - start)
    return {k: statistics.median(t) for k, t in times.items()}


def fastest(seconds: Mapping[Kernels, float], prefer: Kernels, margin: float = 0.03) -> Kernels:
    """The fastest candidate, but ``prefer`` (XLA's own kernels) unless another beats it by more than
    ``margin`` (a fraction): a win inside the noise of a shared machine is not worth the less common path."""
    best = min(seconds, key=seconds.get)
    if prefer in seconds and seconds[best] > seconds[prefer] * (1 - margin):
        return prefer
    return best
