"""Roofline of a compiled TPU program: the TPU compiler's own cost analysis, completed where it has none.

``compiled.cost_analysis()`` gives ``flops`` and ``optimal_seconds`` (the compiler's roofline time: each op at the
chip's peak FLOP/s or HBM bandwidth, whichever bounds it). Two kinds of ops fall outside it, both custom calls:

- Pallas kernels (``tpu_custom_call``: the splash attention kernel) count 0 FLOPs and 0 s. Here each is
  estimated from its operands as attention (q, k, v of shape (..., L, D): 4·(...)·Lq·Lk·D FLOPs) and its
  operand and result bytes, at the chip's peak.
- ``ConcatBitcast`` calls (a concatenation the compiler lays out in place) count -1 s each, which made the
  roofline of whole sampling loops negative. Here the -1 s is taken back and the op costs its bytes read and
  written at HBM bandwidth.

The compiler counts a loop body once. That is the intended figure for a loop whose trip count is only known at
run time (the denoising steps: ``info`` multiplies by the steps itself), not for a loop with a constant trip count
inside the program (a ``lax.scan``: the persons' branch passes, scanned layers): each such loop's remaining
iterations are added from an estimate of its body read off the compiled HLO — convolutions (XLA:TPU's form of
every matmul) and dots at 2 FLOPs per multiply-add, each top-level op at the chip's peak or its operand and result
bytes at HBM bandwidth, whichever bounds it, splash kernels as above. Chip figures: Cloud TPU documentation (bf16 peak, HBM
bandwidth per chip), divided among the devices of a chip (a v4 chip's two TensorCores are two devices).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax

_GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip: HBM bytes, bf16 peak FLOP/s and HBM bytes/s."""

    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float


CHIPS = {  # by ``device_kind``
    "TPU v4": Chip(32 * _GIB, 275e12, 1200e9),
    "TPU v5 lite": Chip(16 * _GIB, 197e12, 819e9),
    "TPU v5": Chip(95 * _GIB, 459e12, 2765e9),
    "TPU v5p": Chip(95 * _GIB, 459e12, 2765e9),
    "TPU v6 lite": Chip(32 * _GIB, 918e12, 1640e9),
}


def device_chip(devices: list[jax.Device]) -> Chip:
    """The share of its chip that one device of ``devices`` (a TPU topology) has: HBM, peak and bandwidth
    divided among the devices with the same chip coordinates.

    Raises:
      ValueError: an unknown ``device_kind``.
    """
    first = devices[0]
    try:
        chip = CHIPS[first.device_kind]
    except KeyError:
        raise ValueError(f"unknown TPU chip {first.device_kind!r} (known: {', '.join(CHIPS)})") from None
    share = sum(1 for d in devices if tuple(d.coords) == tuple(first.coords))
    return Chip(chip.hbm_bytes // share, chip.peak_flops / share, chip.hbm_bandwidth / share)


@dataclasses.dataclass(frozen=True)
class Roofline:
    """A program's per-device cost. ``compiler_*``: the compiler's cost analysis of the ops it costs
    (``ConcatBitcast``'s -1 s each taken back); ``kernel_*``: the custom calls it does not cost, estimated at the
    chip's peak (``kernels`` of them)."""

    compiler_flops: float
    compiler_seconds: float
    kernel_flops: float
    kernel_seconds: float
    kernels: int
    loop_flops: float = 0.0
    loop_seconds: float = 0.0

    @property
    def flops(self) -> float:
        return self.compiler_flops + self.kernel_flops + self.loop_flops

    @property
    def seconds(self) -> float:
        return self.compiler_seconds + self.kernel_seconds + self.loop_seconds


_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8\w*)\[([\d,]*)\]")


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(type_text)]


def _bits(dtype: str) -> int:
    return 16 if dtype == "bf16" else 8 if dtype == "pred" or dtype.startswith("f8") else int(dtype[1:])


def _bytes(arrays) -> int:
    return sum(math.prod(shape) * _bits(dtype) // 8 for dtype, shape in arrays)


def _attention_flops(operands) -> float:
    """4·(...)·Lq·Lk·D of the first q, k, v (floating, same rank >= 3, same leading and last dims), else 0."""
    floats = [shape for dtype, shape in operands if dtype.startswith(("f", "bf")) and len(shape) >= 3]
    if len(floats) < 3:
        return 0.0
    q, k, v = floats[:3]
    if not (len(q) == len(k) == len(v) and q[:-2] == k[:-2] == v[:-2] and q[-1] == k[-1] and k[-2] == v[-2]):
        return 0.0
    return 4.0 * math.prod(q[:-1]) * k[-2] * q[-1]


def program_roofline(compiled, chip: Chip) -> Roofline:
    """The ``Roofline`` of ``compiled`` (a ``jax.stages.Compiled`` for a TPU device of ``chip``)."""
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    hlo = _Hlo(compiled.as_text())
    concat_seconds, concats, kernel_flops, kernel_seconds, kernels = 0.0, 0, 0.0, 0.0, 0
    for op in hlo.ops.values():
        target = op.opcode == "custom-call" and re.search(r'custom_call_target="(\w+)"', op.attributes)
        if not target:
            continue
        operands = [a for name in op.operands for a in hlo.arrays(name)]
        moved = _bytes(operands) + _bytes(_arrays(op.type))
        if target.group(1) == "ConcatBitcast":
            concats += 1
            concat_seconds += moved / chip.hbm_bandwidth
        elif target.group(1) == "tpu_custom_call":
            kernels += 1
            flops = _attention_flops(operands)
            kernel_flops += flops
            kernel_seconds += max(flops / chip.peak_flops, moved / chip.hbm_bandwidth)
    loop_flops, loop_seconds = _LoopCosts(hlo, chip).extra_iterations()
    return Roofline(compiler_flops=float(cost.get("flops", math.nan)),
                    compiler_seconds=float(cost.get("optimal_seconds", math.nan)) + concats + concat_seconds,
                    kernel_flops=kernel_flops, kernel_seconds=kernel_seconds, kernels=kernels,
                    loop_flops=loop_flops, loop_seconds=loop_seconds)


@dataclasses.dataclass(frozen=True)
class _Op:
    name: str
    type: str
    opcode: str
    args: str  # the text between the opcode's parentheses
    attributes: str

    @property
    def operands(self) -> list[str]:
        return re.findall(r"%([\w.\-]+)", self.args)

    def called(self, key: str) -> str | None:
        found = re.search(rf"\b{key}=%([\w.\-]+)", self.attributes)
        return found and found.group(1)


def _balanced(text: str, start: int) -> int:
    """The index of the parenthesis closing the one at ``text[start]``."""
    depth = 0
    for end in range(start, len(text)):
        depth += (text[end] == "(") - (text[end] == ")")
        if depth == 0:
            return end
    return len(text)


def _parse_op(line: str) -> _Op | None:
    """``[ROOT] %name = TYPE opcode(args), attributes`` (TYPE may be a tuple), or None."""
    head = re.match(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = ", line)
    if not head:
        return None
    rest = line[head.end():]
    if rest.startswith("("):
        end = _balanced(rest, 0)
        type_text, rest = rest[:end + 1], rest[end + 2:]
    else:
        type_text, _, rest = rest.partition(" ")
    call = re.match(r"([\w\-]+)\(", rest)
    if not call:
        return None
    end = _balanced(rest, call.end() - 1)
    return _Op(head.group(1), type_text, call.group(1), rest[call.end():end], rest[end + 1:])


class _Hlo:
    """A compiled module's text: its computations (name -> ops), the entry's name, every op by name. An op's
    attributes are its first line's (a Pallas kernel's backend config runs over several lines)."""

    def __init__(self, text: str):
        self.computations: dict[str, list[_Op]] = {}
        self.ops: dict[str, _Op] = {}
        self.entry = ""
        ops = None
        for line in text.splitlines():
            header = re.match(r"^(ENTRY )?%([\w.\-]+) \(.*\{\s*$", line)
            if header:
                ops = self.computations.setdefault(header.group(2), [])
                self.entry = header.group(2) if header.group(1) else self.entry
            elif line.rstrip() == "}":  # not "}}, metadata=...": a kernel's multi-line backend config goes on
                ops = None
            elif ops is not None and (op := _parse_op(line)):
                ops.append(op)
                self.ops[op.name] = op

    def trip_count(self, condition: str) -> int | None:
        """A scan's trip count: its condition's ``compare(counter, constant(N)), direction=LT``; None when the
        bound is not a constant (a loop over a traced number of steps)."""
        for op in self.computations.get(condition, ()):
            if op.opcode == "compare" and "direction=LT" in op.attributes:
                bounds = [self.ops[n] for n in op.operands if n in self.ops and self.ops[n].opcode == "constant"]
                if bounds and re.fullmatch(r"-?\d+", bounds[-1].args.strip()):
                    return int(bounds[-1].args)
        return None

    def arrays(self, name: str):
        return _arrays(self.ops[name].type) if name in self.ops else []


_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id"}


_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "compare", "select", "negate", "abs",
                "and", "or", "xor", "not", "clamp", "remainder", "power", "sign", "floor", "ceil",
                "round-nearest-even", "round-nearest-afz"}


class _LoopCosts:
    """FLOPs and roofline seconds of computations read off the HLO text, to add what the compiler leaves out of
    loops with a constant trip count (module docstring)."""

    def __init__(self, hlo: _Hlo, chip: Chip):
        self.hlo, self.chip = hlo, chip

    def extra_iterations(self) -> tuple[float, float]:
        """(FLOPs, seconds) of every constant-trip loop's iterations after its first, nesting included."""
        if not self.hlo.entry:
            return 0.0, 0.0
        full, once = self.cost(self.hlo.entry, True), self.cost(self.hlo.entry, False)
        return full[0] - once[0], full[1] - once[1]

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one instance per program
    def cost(self, computation: str, trips: bool) -> tuple[float, float]:
        flops = seconds = 0.0
        for op in self.hlo.computations.get(computation, ()):
            if op.opcode == "while":
                n = self.hlo.trip_count(op.called("condition")) or 1 if trips else 1
                body = self.cost(op.called("body"), trips)
                flops, seconds = flops + n * body[0], seconds + n * body[1]
            elif op.opcode not in _FREE:
                f = self.flops(op)
                moved = _bytes([a for n in op.operands for a in self.hlo.arrays(n)]) + _bytes(_arrays(op.type))
                flops, seconds = flops + f, seconds + max(f / self.chip.peak_flops, moved / self.chip.hbm_bandwidth)
        return flops, seconds

    def flops(self, op: _Op) -> float:
        """Multiply-adds x 2 of a convolution or dot, the attention of a splash kernel; summed through fusions."""
        if op.opcode == "fusion":
            return sum(self.flops(inner) for inner in self.hlo.computations.get(op.called("calls"), ()))
        if op.opcode == "convolution":
            return 2.0 * self._convolution_macs(op)
        if op.opcode == "dot":
            lhs = self.hlo.arrays(op.operands[0])[0][1]
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", op.attributes).group(1)
            size = math.prod(lhs[int(d)] for d in contracting.split(",") if d)
            return 2.0 * math.prod(_arrays(op.type)[0][1]) * size
        if op.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in op.attributes:
            return _attention_flops([a for n in op.operands for a in self.hlo.arrays(n)])
        if op.opcode in _ELEMENTWISE:  # one FLOP per output element; transcendentals count none, as in XLA
            return float(math.prod(_arrays(op.type)[0][1])) if _arrays(op.type) else 0.0
        if op.opcode == "reduce":  # the reducer once per input element
            return float(sum(math.prod(shape) for n in op.operands[:len(op.operands) // 2]
                             for _, shape in self.hlo.arrays(n)))
        return 0.0

    def _convolution_macs(self, op: _Op) -> float:
        """Multiply-adds of a convolution as XLA's cost analysis counts them: per output element, the kernel taps
        that land on an input element (not on padding or a hole of ``lhs_dilate``) x input features per group."""
        lhs_labels, kernel_labels, out_labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", op.attributes).groups()
        lhs, kernel, out = self.hlo.arrays(op.operands[0])[0][1], self.hlo.arrays(op.operands[1])[0][1], \
            _arrays(op.type)[0][1]
        found = re.search(r"window=\{([^}]*)\}", op.attributes)
        window = dict(re.findall(r"(\w+)=([\w\-]+)", found.group(1))) if found else {}

        def per_dim(key, default, i):
            return [int(x) for x in window[key].split("x")][i] if key in window else default

        macs = out[out_labels.index("b")] * out[out_labels.index("f")] * kernel[kernel_labels.index("i")]
        for i, dim in enumerate(sorted(c for c in out_labels if c.isdigit())):
            size_in, size_out, taps = lhs[lhs_labels.index(dim)], out[out_labels.index(dim)], \
                kernel[kernel_labels.index(dim)]
            stride, lhs_dilate, rhs_dilate = per_dim("stride", 1, i), per_dim("lhs_dilate", 1, i), \
                per_dim("rhs_dilate", 1, i)
            pad_low = int(window["pad"].split("x")[i].split("_")[0]) if "pad" in window else 0
            span = (size_in - 1) * lhs_dilate
            macs *= sum(1 for o in range(size_out) for t in range(taps)
                        if 0 <= (q := o * stride + t * rhs_dilate - pad_low) <= span and q % lhs_dilate == 0)
        return float(macs)
