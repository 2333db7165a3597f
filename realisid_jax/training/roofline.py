"""Roofline of a compiled TPU program: the TPU compiler's own cost analysis, completed where it has none.

``compiled.cost_analysis()`` gives ``flops`` and ``optimal_seconds`` (the compiler's roofline time: each op at the
chip's peak FLOP/s or HBM bandwidth, whichever bounds it). Two kinds of ops fall outside it, both custom calls:

- Pallas kernels (``tpu_custom_call``: the splash attention kernel) count 0 FLOPs and 0 s. Here each is
  estimated from its operands as attention (q, k, v of shape (..., L, D): 4·(...)·Lq·Lk·D FLOPs) and its
  operand and result bytes, at the chip's peak.
- ``ConcatBitcast`` calls (a concatenation the compiler lays out in place) count -1 s each, which made the
  roofline of whole sampling loops negative. Here the -1 s is taken back and the op costs its bytes read and
  written at HBM bandwidth.

A loop body is counted once, as the compiler counts it. Chip figures: Cloud TPU documentation (bf16 peak, HBM
bandwidth per chip), divided among the devices of a chip (a v4 chip's two TensorCores are two devices).
"""

from __future__ import annotations

import dataclasses
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

    @property
    def flops(self) -> float:
        return self.compiler_flops + self.kernel_flops

    @property
    def seconds(self) -> float:
        return self.compiler_seconds + self.kernel_seconds


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (\(.*?\)|\S+) [\w\-]+\(")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8\w*)\[([\d,]*)\]")
_CUSTOM_CALL = re.compile(r'custom-call\(([^)]*)\), custom_call_target="(\w+)"')


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
    text = compiled.as_text()
    types = {m.group(1): m.group(2) for m in map(_INSTRUCTION.match, text.splitlines()) if m}
    concat_seconds, concats, kernel_flops, kernel_seconds, kernels = 0.0, 0, 0.0, 0.0, 0
    for line in text.splitlines():
        call, own = _CUSTOM_CALL.search(line), _INSTRUCTION.match(line)
        if not (call and own):
            continue
        operands = [a for name in re.findall(r"%([\w.\-]+)", call.group(1)) for a in _arrays(types.get(name, ""))]
        moved = _bytes(operands) + _bytes(_arrays(own.group(2)))
        if call.group(2) == "ConcatBitcast":
            concats += 1
            concat_seconds += moved / chip.hbm_bandwidth
        elif call.group(2) == "tpu_custom_call":
            kernels += 1
            flops = _attention_flops(operands)
            kernel_flops += flops
            kernel_seconds += max(flops / chip.peak_flops, moved / chip.hbm_bandwidth)
    return Roofline(compiler_flops=float(cost.get("flops", math.nan)),
                    compiler_seconds=float(cost.get("optimal_seconds", math.nan)) + concats + concat_seconds,
                    kernel_flops=kernel_flops, kernel_seconds=kernel_seconds, kernels=kernels)
