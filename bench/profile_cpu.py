"""Per-op CPU profile of the denoising step (JAX and PyTorch side by side) and of the training step (JAX).

    python -m bench.profile_cpu [--config mid] [--persons 1] [--repeat 2] [--top 15] [--train tiny]
        [--train-override KEY=VALUE ...]

JAX: ``jax.profiler`` traces ``repeat`` calls of the compiled step; XLA:CPU's thunk runtime records one event
per executed HLO instruction (fusions, library convolutions and matmuls, loops), named as in the compiled
program's text, so each op's self time (a loop's body ops subtracted from the loop) is joined with its opcode,
shape and what it fuses. PyTorch: ``torch.profiler`` over the same number of calls, self CPU time per ``aten::``
op. Both are grouped into the same categories (convolution, matmul, attention, normalisation, elementwise /
data movement) for the side-by-side table. Times are per call (summed over ops, ms); the wall time of one call
is printed with each profile, since XLA:CPU can run independent ops concurrently.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

CATEGORIES = ("convolution", "matmul", "attention", "normalisation", "elementwise / data movement", "loop / other")

# One HLO instruction of the compiled program's text: name, result shape, opcode, and the rest of the line.
_HLO_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+(?:\{[^}]*\})?|\([^=]*?\))\s+([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# The fused opcodes an op's description names (the rest are elementwise).
_SHOWN = {"convolution", "dot", "batched-dot", "reduce", "concatenate", "pad", "transpose", "exponential"}


@dataclasses.dataclass(frozen=True)
class HloOp:
    """One instruction of a compiled XLA program: ``opcode``, result ``shape`` (HLO text, e.g.
    ``f32[1,32,32,320]{3,2,1,0}``), the opcodes it fuses (``fused``: empty unless a fusion), the JAX op path of
    its metadata (``op_name``)."""

    name: str
    opcode: str
    shape: str
    fused: frozenset[str]
    op_name: str

    @property
    def category(self) -> str:
        """One of ``CATEGORIES``: by the heaviest opcode it runs (a convolution fused with a bias is a conv)."""
        ops = self.fused | {self.opcode}
        if "attention" in self.op_name or "batched-dot" in ops:
            return "attention"
        if "convolution" in ops:
            return "convolution"
        if "dot" in ops:
            return "matmul"
        if self.opcode in ("while", "call", "conditional"):
            return "loop / other"
        if "reduce" in ops or "rsqrt" in ops:
            return "normalisation"
        return "elementwise / data movement"

    def describe(self) -> str:
        """``opcode[+fused ops] shape`` without the layout, e.g. ``fusion(convolution,add) f32[1,32,32,320]``."""
        heavy = sorted(self.fused & _SHOWN)
        inner = f"({','.join(heavy)})" if heavy else ""
        return f"{self.opcode}{inner} {self.shape.split('{')[0]}"


def _opcode(opcode: str, rest: str) -> str:
    """``batched-dot`` for a dot with batch dimensions (attention's QK^T and PV: the model's linear layers and
    1x1 / im2col convolutions are plain 2-D dots), else the opcode."""
    return "batched-dot" if opcode == "dot" and "lhs_batch_dims" in rest else opcode


def hlo_ops(text: str) -> dict[str, HloOp]:
    """Every instruction of a compiled program's text (``compiled.as_text()``) by name, with the opcodes of the
    computations it calls (recursively: a fusion's body, a loop's body)."""
    lines_of: dict[str, list[tuple[str, str, str, str]]] = collections.defaultdict(list)
    computation = ""
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head and "=" not in line.split("(")[0]:
            computation = head.group(1)
            continue
        m = _HLO_LINE.match(line)
        if m:
            lines_of[computation].append(m.groups())

    @functools.cache
    def opcodes(comp: str) -> frozenset[str]:
        found = set()
        for _, _, opcode, rest in lines_of.get(comp, ()):
            found.add(_opcode(opcode, rest))
            for called in _CALLS.findall(rest):
                found |= opcodes(called)
        return frozenset(found)

    ops = {}
    for comp_lines in lines_of.values():
        for name, shape, opcode, rest in comp_lines:
            calls = _CALLS.findall(rest) if opcode == "fusion" else ()
            called = frozenset().union(*(opcodes(c) for c in calls))
            op_name = _OP_NAME.search(rest)
            ops[name] = HloOp(name, _opcode(opcode, rest), shape, called, op_name.group(1) if op_name else "")
    return ops


def _self_times(events: Iterable) -> dict[str, list[int]]:
    """name -> [self ns, count] of the (possibly nested) events of one trace line: a loop's time without the
    time of the ops it ran."""
    out: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    stack: list[list] = []  # [name, end_ns, child_ns]
    for e in sorted(events, key=lambda e: (e.start_ns, -e.duration_ns)):
        while stack and e.start_ns >= stack[-1][1]:
            name, _, child = stack.pop()
            out[name][0] -= child
        if stack:
            stack[-1][2] += e.duration_ns
        out[e.name][0] += e.duration_ns
        out[e.name][1] += 1
        stack.append([e.name, e.start_ns + e.duration_ns, 0])
    for name, _, child in stack:
        out[name][0] -= child
    return out


@dataclasses.dataclass
class OpTime:
    """One op's time per call (``ms``), calls per step (``count``), ``category``, ``what`` it is."""

    what: str
    category: str
    ms: float
    count: float


def jax_profile(fn: Callable[[], object], program_text: str, repeat: int) -> tuple[list[OpTime], float]:
    """(ops by self time, wall ms per call) of ``repeat`` traced calls of ``fn`` (which blocks), after one
    untimed call; ``program_text`` is the compiled program's ``as_text()``."""
    import jax
    from jax.profiler import ProfileData

    ops = hlo_ops(program_text)
    fn()
    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir)
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        wall = (time.perf_counter() - start) / repeat * 1e3
        jax.profiler.stop_trace()
        data = ProfileData.from_file(sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))[-1])
    totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for plane in data.planes:
        for line in plane.lines:
            events = [e for e in line.events if e.name in ops]
            for name, (ns, count) in _self_times(events).items():
                totals[name][0] += ns
                totals[name][1] += count
    rows = [OpTime(f"{ops[n].describe()}  [{n}]", ops[n].category, ns / 1e6 / repeat, count / repeat)
            for n, (ns, count) in totals.items()]
    return sorted(rows, key=lambda r: -r.ms), wall


_TORCH_CATEGORY = (
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("convolution", ("conv",)),
    ("matmul", ("addmm", "aten::mm", "bmm", "matmul", "linear", "einsum")),
    ("normalisation", ("group_norm", "layer_norm", "batch_norm")),
)


def torch_category(name: str) -> str:
    """The ``CATEGORIES`` entry of an ``aten::`` op name."""
    for category, keys in _TORCH_CATEGORY:
        if any(k in name for k in keys):
            return category
    return "elementwise / data movement"


def torch_profile(fn: Callable[[], object], repeat: int) -> tuple[list[OpTime], float]:
    """(ops by self CPU time, wall ms per call) of ``repeat`` profiled calls of ``fn`` after one untimed."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        wall = (time.perf_counter() - start) / repeat * 1e3
    rows = [OpTime(e.key, torch_category(e.key), e.self_cpu_time_total / 1e3 / repeat, e.count / repeat)
            for e in prof.key_averages() if e.self_cpu_time_total > 0]
    return sorted(rows, key=lambda r: -r.ms), wall


def by_category(rows: list[OpTime]) -> dict[str, float]:
    """category -> ms per call."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for r in rows:
        out[r.category] += r.ms
    return out


def format_side_by_side(title: str, profiles: dict[str, tuple[list[OpTime], float]], top: int) -> str:
    """Markdown: the categories of each profile in columns, then each profile's top ops."""
    names = list(profiles)
    cats = {n: by_category(rows) for n, (rows, _) in profiles.items()}
    out = [f"### {title}", "", "| category | " + " | ".join(f"{n} ms (share)" for n in names) + " |",
           "|---|" + "---|" * len(names)]
    for c in CATEGORIES:
        cells = []
        for n in names:
            total = sum(cats[n].values()) or 1.0
            cells.append(f"{cats[n][c]:.1f} ({cats[n][c] / total:.0%})")
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    out.append("| **sum of ops / wall per call** | "
               + " | ".join(f"{sum(cats[n].values()):.1f} / {profiles[n][1]:.1f}" for n in names) + " |")
    for n in names:
        rows, _ = profiles[n]
        total = sum(r.ms for r in rows) or 1.0
        out += ["", f"{n}, top {top} ops by self time:", "", "| op | category | calls | ms | share |",
                "|---|---|---|---|---|"]
        out += [f"| `{r.what}` | {r.category} | {r.count:g} | {r.ms:.1f} | {r.ms / total:.1%} |" for r in rows[:top]]
    return "\n".join(out)


def profile_step(config_name: str, persons: int, repeat: int, top: int) -> str:
    """The denoising step of ``bench.models`` (B = 1, K = ``persons``), JAX and PyTorch."""
    from bench.models import build_models, jax_args, jax_step, make_inputs, run_jax_step, run_torch_step, torch_args
    from bench.run import load, set_threads

    set_threads()
    config = load(config_name)
    models = build_models(config)
    inputs = make_inputs(config, models.realisid_config, batch=1, persons=persons)
    ja, ta = jax_args(models, inputs), torch_args(inputs)
    text = jax_step.lower(models.unet_def, models.realisid_def, *ja).compile().as_text()
    profiles = {"JAX": jax_profile(lambda: run_jax_step(models, ja), text, repeat),
                "PyTorch": torch_profile(lambda: run_torch_step(models, ta), repeat)}
    title = (f"Denoising step, config {config_name}, K={persons} (attention_impl={config.attention_impl}, "
             f"conv_impl={config.conv_impl})")
    return format_side_by_side(title, profiles, top)


def profile_train(config_name: str, repeat: int, top: int, overrides: Iterable[str] = ()) -> str:
    """The trainer's jitted step (``bench.training``) of the config with ``overrides`` (``KEY=VALUE``), JAX
    only."""
    from bench.run import ROOT, SHORT_NAMES
    from bench.training import trainer
    from realisid_jax.config import load_config

    path = ROOT / "configs" / SHORT_NAMES[config_name] if config_name in SHORT_NAMES else config_name
    config = load_config(path, list(overrides))
    run, batch, compiled = trainer(config)
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost).get("flops", 0.0)
    title = (f"Training step, config {config_name}, batch {batch}, {flops / 1e9:.1f} GFLOP by XLA's cost analysis "
             f"(attention_impl={config.attention_impl}, "
             f"conv_impl={config.conv_impl}, remat={config.train.remat}, "
             f"precomputed_inputs={config.train.precomputed_inputs})")
    return format_side_by_side(title, {"JAX": jax_profile(run, compiled.as_text(), repeat)}, top)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="mid", help="the step's config: tiny | mid | PATH ('' skips the step)")
    p.add_argument("--persons", type=int, default=1)
    p.add_argument("--train", default="", help="also profile the training step of this config (tiny | PATH)")
    p.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override of the training step (e.g. train.precomputed_inputs=True)")
    p.add_argument("--repeat", type=int, default=2, help="profiled calls (after one untimed)")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    from realisid_jax.cli import choose_platform

    choose_platform()
    if args.config:
        print(profile_step(args.config, args.persons, args.repeat, args.top), flush=True)
    if args.train:
        print("\n" + profile_train(args.train, args.repeat, args.top, args.train_override), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
