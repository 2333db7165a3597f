"""Benchmarks of realisid-jax against the PyTorch (diffusers) reference; prints one table.

    python -m bench.run [--config tiny|mid|PATH] [--only step,sample,train,compile,memory,mfu] [--repeat N]

Sections (each comparison in one process, JAX and PyTorch runs interleaved, medians):
  step     one denoising step (UNet + both RealisID branches), K = 1 and K = 4 persons, B = 1 image
  sample   guided sampling (3 predictions per step, ``pipeline._denoise``), images/s; recompilation check
  train    the trainer's jitted step, samples/s (JAX only: there is no PyTorch trainer to compare with)
  compile  compile time of the step and the sampling loop, cold and from the persistent cache (subprocesses)
  memory   XLA ``memory_analysis`` of the compiled step; peak RSS of one step per framework (subprocesses)
  mfu      XLA ``cost_analysis`` FLOPs / step time, against a timed large float32 matmul (the machine's peak)
Both frameworks use every core: XLA:CPU's intra-op pool and ``torch.set_num_threads(os.cpu_count())``.
PyTorch's OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, see ``bench/__init__.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import interleaved, load_average, timed
from realisid_jax.cli import choose_platform

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("step", "sample", "train", "compile", "memory", "mfu")
PERSONS = (1, 4)
MATMUL = 2048


# Short names of the benchmark configs: variants of the model families' config files.
SHORT_NAMES = {"tiny": "sdxl.py:tiny", "mid": "sd15.py:mid"}


def load(name: str):
    """A config by short name (``tiny``, ``mid``) or path (``FILE.py[:variant]``)."""
    from realisid_jax.config import load_config

    return load_config(ROOT / "configs" / SHORT_NAMES[name] if name in SHORT_NAMES else name)


def set_threads() -> int:
    """PyTorch's intra-op threads = the cores XLA:CPU uses (all of them)."""
    import torch

    torch.set_num_threads(os.cpu_count())
    return torch.get_num_threads()


@dataclasses.dataclass
class Row:
    section: str
    item: str
    jax: float | None = None
    torch: float | None = None
    unit: str = ""
    higher_is_better: bool = False
    note: str = ""

    def advantage(self) -> float | None:
        """How many times better JAX is than PyTorch (>1: JAX faster / more throughput / less memory)."""
        if self.jax is None or self.torch is None or not self.jax or not self.torch:
            return None
        return self.jax / self.torch if self.higher_is_better else self.torch / self.jax


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def format_table(rows: list[Row], header: str) -> str:
    cells = [("section", "measurement", "unit", "JAX", "PyTorch", "JAX adv.", "note")]
    for r in rows:
        adv = r.advantage()
        cells.append((r.section, r.item, r.unit, _fmt(r.jax), _fmt(r.torch), "-" if adv is None else f"{adv:.2f}x",
                      r.note))
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = [header, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells[1:]]
    return "\n".join(lines)


class Bench:
    """Runs the sections of one config, sharing the models and the step timings between them."""

    def __init__(self, config_name: str, repeat: int, persons: tuple[int, ...] = PERSONS):
        from bench.models import build_models

        self.name, self.repeat, self.persons = config_name, repeat, persons
        self.config = load(config_name)
        self.threads = set_threads()
        self.models, self.build_s = timed(lambda: build_models(self.config))
        self.step_times: dict[int, tuple[float, float]] = {}
        self.rows: list[Row] = []

    def _inputs(self, persons: int, seed: int = 0):
        from bench.models import make_inputs

        return make_inputs(self.config, self.models.realisid_config, batch=1, persons=persons, seed=seed)

    # ------------------------------------------------------------------------------------------- sections
    def step(self):
        from bench.models import jax_args, jax_step, run_jax_step, run_torch_step, torch_args

        for k in self.persons:
            inputs = self._inputs(k)
            ja, ta = jax_args(self.models, inputs), torch_args(inputs)
            out, first_s = timed(lambda: run_jax_step(self.models, ja))  # noqa: B023
            ref = run_torch_step(self.models, ta).permute(0, 2, 3, 1).numpy()
            err = float(np.max(np.abs(np.asarray(out) - ref)) / max(1.0, np.max(np.abs(ref))))
            med = interleaved({"jax": lambda: run_jax_step(self.models, ja),  # noqa: B023
                               "torch": lambda: run_torch_step(self.models, ta)}, self.repeat)  # noqa: B023
            self.step_times[k] = (med["jax"], med["torch"])
            self.rows.append(Row("step", f"denoising step, K={k}", med["jax"], med["torch"], "s",
                                 note=f"max|dJAX-torch|/max(1,max|torch|)={err:.1e}; first JAX call {first_s:.1f}s"))
        before = jax_step._cache_size()
        other = self._inputs(self.persons[-1], seed=1)
        other["timestep"] = np.float32(17)
        run_jax_step(self.models, jax_args(self.models, other))
        self.rows.append(Row("step", "recompiles (new latents/timestep/boxes)", jax_step._cache_size() - before,
                             unit="count"))

    def sample(self):
        from bench.sampling import jax_sampler, make_sampling_inputs, torch_sampler

        steps = int(self.config.sampling.num_inference_steps)
        inputs = make_sampling_inputs(self.config, self._inputs(1), steps)
        run_jax, denoise = jax_sampler(self.models, inputs)
        run_torch = torch_sampler(self.models, inputs)
        _, first_s = timed(run_jax)
        med = interleaved({"jax": run_jax, "torch": run_torch}, max(1, self.repeat // 2))
        n = inputs.latents.shape[0]
        self.rows.append(Row("sample", f"guided sampling, {steps} steps, K=1", n / med["jax"], n / med["torch"],
                             "img/s", higher_is_better=True,
                             note=f"first JAX call {first_s:.1f}s (compile + run)"))
        before = denoise._cache_size()
        rng = np.random.default_rng(7)
        run_jax(latents=rng.standard_normal(inputs.latents.shape, np.float32))
        run_jax(text=jax.tree.map(lambda x: None if x is None else x + 1, inputs.text))
        run_jax(boxes=np.clip(inputs.boxes + 0.05, 0, 1))
        self.rows.append(Row("sample", "recompiles (new seed/prompt/boxes)", denoise._cache_size() - before,
                             unit="count"))

    def train(self):
        from bench.training import trainer

        run, batch, compiled = trainer(self.config)
        med = interleaved({"jax": run}, max(1, self.repeat // 2))
        self.rows.append(Row("train", f"training step, batch {batch}", batch / med["jax"], unit="samples/s",
                             higher_is_better=True, note="no PyTorch trainer to compare"))
        mem = compiled.memory_analysis()
        self.rows.append(Row("train", "XLA temp memory of the step", mem.temp_size_in_bytes / 2**20, unit="MiB"))

    def compile(self):
        with tempfile.TemporaryDirectory() as cache:
            cold = _child(["compile", "--config", self.name, "--cache-dir", cache])
            warm = _child(["compile", "--config", self.name, "--cache-dir", cache])
        self.rows.append(Row("compile", "trace+lower step, K=1", cold["step_lower_s"], unit="s"))
        for key, what in (("step_compile_s", "step, K=1"), ("sample_compile_s", "sampling loop")):
            self.rows.append(Row("compile", f"compile {what}, cold", cold[key], unit="s"))
            self.rows.append(Row("compile", f"compile {what}, persistent cache", warm[key], unit="s"))

    def memory(self):
        from bench.models import jax_args, jax_step

        for k in self.persons:
            lowered = jax_step.lower(self.models.unet_def, self.models.realisid_def,
                                     *jax_args(self.models, self._inputs(k)))
            mem = lowered.compile().memory_analysis()
            self.rows.append(Row("memory", f"XLA step K={k}: temp / args / out", mem.temp_size_in_bytes / 2**20,
                                 unit="MiB", note=f"args {mem.argument_size_in_bytes / 2**20:.0f} MiB, out "
                                                  f"{mem.output_size_in_bytes / 2**20:.2f} MiB"))
        k = self.persons[-1]
        rss = {fw: _child(["rss", "--config", self.name, "--framework", fw, "--persons", str(k)])
               for fw in ("jax", "torch")}
        self.rows.append(Row("memory", f"process RSS with models built, K={k}", rss["jax"]["models_rss_mib"],
                             rss["torch"]["models_rss_mib"], "MiB"))
        self.rows.append(Row("memory", f"peak RSS over 2 steps, K={k}", rss["jax"]["peak_rss_mib"],
                             rss["torch"]["peak_rss_mib"], "MiB",
                             note="JAX includes compilation" + ("" if rss["jax"]["peak_reset"] else
                                                                "; peak not reset after the build")))

    def mfu(self):
        from bench.models import jax_args, jax_step, run_jax_step, run_torch_step, torch_args

        peak = matmul_peak()
        self.rows.append(Row("mfu", f"peak: {MATMUL}^3 float32 matmul", peak["jax"] / 1e9, peak["torch"] / 1e9,
                             "GFLOP/s", higher_is_better=True, note="the machine's measured peak is the larger"))
        best = max(peak.values())
        for k in self.persons:
            inputs = self._inputs(k)
            ja = jax_args(self.models, inputs)
            compiled = jax_step.lower(self.models.unet_def, self.models.realisid_def, *ja).compile()
            flops = _flops(compiled)
            if k not in self.step_times:
                ta = torch_args(inputs)
                med = interleaved({"jax": lambda: run_jax_step(self.models, ja),  # noqa: B023
                                   "torch": lambda: run_torch_step(self.models, ta)}, self.repeat)  # noqa: B023
                self.step_times[k] = (med["jax"], med["torch"])
            t_jax, t_torch = self.step_times[k]
            self.rows.append(Row("mfu", f"step K={k}: achieved FLOP/s ({flops / 1e9:.1f} GFLOP)",
                                 flops / t_jax / 1e9, flops / t_torch / 1e9, "GFLOP/s", higher_is_better=True,
                                 note=f"MFU JAX {flops / t_jax / best:.0%}, PyTorch {flops / t_torch / best:.0%}"))

    def run(self, sections) -> str:
        for name in sections:
            getattr(self, name)()
        header = (f"realisid-jax bench, config {self.name}: float32, XLA:CPU and PyTorch {self.threads} threads, "
                  f"{load_average()} (at the end), models built in {self.build_s:.1f}s, jax {jax.__version__}")
        return format_table(self.rows, header)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def matmul_peak(n: int = MATMUL, repeat: int = 5) -> dict[str, float]:
    """FLOP/s of an n x n x n float32 matmul in JAX and PyTorch (median of ``repeat``, interleaved)."""
    import torch

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    ta = torch.randn(n, n)
    med = interleaved({"jax": lambda: mm(a).block_until_ready(), "torch": lambda: ta @ ta}, repeat)
    return {k: 2 * n**3 / v for k, v in med.items()}


def _child(args: list[str]) -> dict:
    """Runs ``python -m bench.child ARGS`` and returns its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)  # one CPU device, as here: no simulated devices inherited from a test
    proc = subprocess.run([sys.executable, "-m", "bench.child", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line.removeprefix("BENCH_JSON "))
    raise RuntimeError(f"bench.child {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="realisid-jax benchmarks against the PyTorch reference")
    p.add_argument("--config", default="tiny", help="tiny | mid | path to a config file")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions per contender (medians)")
    p.add_argument("--persons", default=",".join(map(str, PERSONS)), help="person counts K of the step sections")
    args = p.parse_args(argv)
    choose_platform()  # before JAX's first device use, as the CLI does: no TPU-runtime start-up text on a CPU host
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    persons = tuple(int(k) for k in args.persons.split(","))
    print(Bench(args.config, args.repeat, persons).run(sections), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
