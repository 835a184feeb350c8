"""The time engine: a step's kernels (``vitcost.kernels``) priced on a device's rates.

Pure: no torch, typer or rich. Each kernel takes the longer of its compute and its memory
traffic (a roofline), plus a fixed cost per launch on the device:

* a matmul runs at the dtype's dense peak times the large-matmul efficiency, times how well
  its output tiles fill the device: ``ceil(m / tile) * ceil(n / tile) * batch`` tiles are
  spread over the compute units in waves, and a partial tile or a partial last wave does the
  work of a full one (tile and wave quantization). A matmul with fewer tiles than units
  splits its reduction (split-K), as cuBLAS does, when the reduction is long;
* a fused attention kernel runs at the peak times the attention efficiency, over the
  sequence padded to the kernel's tile (FlashAttention computes whole tiles);
* everything else moves its bytes at the achievable memory bandwidth.

The host dispatches every kernel; on a GPU it runs ahead of the device (asynchronously), so
a step takes the longer of the device's sum and the host's; on a CPU the two add up.
Multi-GPU data parallel adds the gradient all-reduce, overlapped with backward: only what
backward does not hide is added (and the last bucket, which waits for backward to end).
FSDP all-gathers each group's parameters (in forward; in backward again when blocks reshard
after forward) and reduce-scatters its gradients, each behind the compute of its pass: only
what the pass does not hide is added, and never less than the root's all-gather, which
nothing precedes, or its reduce-scatter, which waits for backward to end. HSDP all-reduces
each rank's shard of the gradients across the replica groups behind backward too.
Every time is in seconds; every rate per second.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
import math
from typing import Mapping, NamedTuple, Optional

from vitcost.kernels import FLASH, GEMM, GROUPS, Kernel

# Groups of the breakdown, in the order they are shown.
BREAKDOWN = GROUPS + ("communication", "launch")

# DDP's last bucket: the all-reduce that cannot start before backward ends (25 MiB default).
DDP_LAST_BUCKET_BYTES = 25 * 2**20


@dataclass(frozen=True)
class Rates:
    """What the time engine needs of a device; each figure's source is the profile's."""

    matmul_flops_per_s: float  # dense peak of the matmul dtype
    matmul_efficiency: float  # what large matmuls reach, of the peak
    attention_efficiency: float  # what a fused attention kernel's matmuls reach, of the peak
    memory_bytes_per_s: float  # achievable streaming bandwidth
    kernel_seconds: float  # fixed device time per launch
    host_seconds: float  # host dispatch per launch
    compute_units: int  # SMs (GPU) or cores (CPU)
    tile: int  # output tile edge of a matmul (0: no tile or wave quantization)
    attention_tile: int  # sequence tile of the fused attention kernel (0: none)
    asynchronous: bool  # the host runs ahead of the device (CUDA)
    gpus: int = 1
    allreduce_bytes_per_s: float = 0.0  # bus bandwidth of a ring all-reduce (0: one GPU)
    # elements per second of pointwise operators that may be bound by arithmetic ("gelu/4": GELU
    # on fp32), as a probe measured them on a CPU; an operator not here is bound by its bytes
    pointwise_elems_per_s: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepTime:
    step_seconds: float
    breakdown_seconds: dict[str, float]
    phase_seconds: dict[str, float]
    device_seconds: float
    host_seconds: float
    launches: int
    allreduce_seconds: float = 0.0  # the whole all-reduce, hidden or not
    allgather_seconds: float = 0.0  # ZeRO-1's parameters after the step, never hidden
    overlapped: bool = True
    # FSDP: the all-gathers and reduce-scatters of one micro-step, hidden or not
    fsdp_gather_seconds: float = 0.0
    fsdp_reduce_seconds: float = 0.0


@dataclass(frozen=True)
class FsdpTraffic:
    """What FSDP moves in one micro-step, in bytes of the collectives' full (unsharded) size."""

    gather_bytes: int  # every group's parameters, all-gathered in forward
    regather: bool  # and again in backward (blocks reshard after forward)
    reduce_bytes: int  # every group's gradients, reduce-scattered in backward
    root_gather_bytes: int  # the root group's all-gather, which no compute precedes
    root_reduce_bytes: int  # the root's reduce-scatter, when backward ends
    replica_seconds: float = 0.0  # HSDP: the shard's all-reduce across replica groups


def scaled(rates: Rates, ratio: float) -> Rates:
    """Rates under which every step takes ``ratio`` times as long: what a measured
    measured/predicted step-time ratio (``calibrate --save``) does to a profile."""
    return replace(rates, matmul_efficiency=rates.matmul_efficiency / ratio,
                   attention_efficiency=rates.attention_efficiency / ratio,
                   memory_bytes_per_s=rates.memory_bytes_per_s / ratio, kernel_seconds=rates.kernel_seconds * ratio,
                   host_seconds=rates.host_seconds * ratio, allreduce_bytes_per_s=rates.allreduce_bytes_per_s / ratio)


def tile_utilisation(m: int, n: int, k: int, batch: int, rates: Rates) -> float:
    """The share of the device's issued work that is useful, for an m x n output (times batch)
    made in tiles of ``tile`` over ``compute_units`` in waves."""
    t, units = rates.tile, rates.compute_units
    if not t or not units:
        return 1.0
    tiles = math.ceil(m / t) * math.ceil(n / t) * batch
    useful = m * n * batch / (tiles * t * t)
    if tiles < units and k >= 2 * t:
        # split-K: the reduction is cut so that every unit has a piece, no piece under 2 tiles deep
        tiles *= min(math.ceil(units / tiles), k // (2 * t))
    waves = math.ceil(tiles / units)
    return useful * tiles / (waves * units)


def kernel_seconds(kern: Kernel, rates: Rates) -> float:
    """One run of a kernel on the device, without its launch cost."""
    return _seconds(kern.kind, kern.bytes, kern.macs, kern.m, kern.n, kern.k, kern.batch, kern.tokens, kern.op,
                    kern.elems, rates)


def _seconds(kind: str, nbytes: int, macs: int, m: int, n: int, k: int, batch: int, tokens: int, op: str,
             elems: int, rates: Rates) -> float:
    memory = nbytes / rates.memory_bytes_per_s
    if kind == GEMM:
        rate = rates.matmul_flops_per_s * rates.matmul_efficiency * tile_utilisation(m, n, k, batch, rates)
        return max(2 * macs / rate, memory)
    if kind == FLASH:
        padded = macs
        if rates.attention_tile:
            ratio = math.ceil(tokens / rates.attention_tile) * rates.attention_tile / tokens
            padded = macs * ratio * ratio
        return max(2 * padded / (rates.matmul_flops_per_s * rates.attention_efficiency), memory)
    rate = rates.pointwise_elems_per_s.get(op) if op else None
    return max(elems / rate, memory) if rate else memory


class Line(NamedTuple):
    """A kernel whose bytes, MACs and shape are affine in the batch: each figure's value at
    batch 0 and its slope (``vitcost.kernels.at_batch``'s lines, kept for pricing)."""

    group: str
    phase: str
    kind: str
    tokens: int
    launches: int  # per step (times count)
    count: int
    op: str
    figures: tuple[tuple[int, int], ...]  # (at batch 0, per image) of bytes, macs, m, n, k, batch, elems


_FIGURES = ("bytes", "macs", "m", "n", "k", "batch", "elems")


def lines_of(at2: tuple[Kernel, ...], at3: tuple[Kernel, ...]) -> tuple[Line, ...]:
    """The lines through a step's kernels at batches 2 and 3."""
    out = []
    for k2, k3 in zip(at2, at3):
        # at batch 0: f(2) - 2 (f(3) - f(2))
        figures = tuple((3 * getattr(k2, f) - 2 * getattr(k3, f), getattr(k3, f) - getattr(k2, f)) for f in _FIGURES)
        out.append(Line(k2.group, k2.phase, k2.kind, k2.tokens, k2.launches * k2.count, k2.count, k2.op, figures))
    return tuple(out)


def allgather_seconds(nbytes: int, rates: Rates) -> float:
    """Every rank ends with all ``nbytes`` of which it had 1/g: each receives (g - 1) / g of
    them (a ring all-gather, or ZeroRedundancyOptimizer's broadcasts from every rank)."""
    g = rates.gpus
    if g <= 1 or not rates.allreduce_bytes_per_s:
        return 0.0
    return nbytes * (g - 1) / g / rates.allreduce_bytes_per_s


def step_time_at(lines: tuple[Line, ...], batch: int, rates: Rates, grad_bytes: int = 0,
                 gather_bytes: int = 0, micro_steps: int = 1, fsdp: Optional[FsdpTraffic] = None) -> StepTime:
    """:func:`step_time` of the kernels the lines give at ``batch``."""
    def runs():
        for line in lines:
            (b0, bs), (c0, cs), (m0, ms), (n0, ns), (k0, ks), (t0, ts), (e0, es) = line.figures
            seconds = _seconds(line.kind, b0 + bs * batch, c0 + cs * batch, m0 + ms * batch, n0 + ns * batch,
                               k0 + ks * batch, t0 + ts * batch, line.tokens, line.op, e0 + es * batch, rates)
            yield line.group, line.phase, seconds * line.count, line.launches
    return _total(runs(), rates, grad_bytes, gather_bytes, micro_steps, fsdp)


def step_time(kernels: tuple[Kernel, ...], rates: Rates, grad_bytes: int = 0, gather_bytes: int = 0,
              micro_steps: int = 1, fsdp: Optional[FsdpTraffic] = None) -> StepTime:
    """Price a step: per group, per phase, the launches, and (``gpus`` > 1, training) the
    all-reduce of ``grad_bytes`` not hidden behind backward, and the all-gather of
    ``gather_bytes`` after the optimizer step (ZeRO-1's parameters: nothing hides it).
    ``micro_steps``: gradient accumulation runs forward and backward so many times before
    the one optimizer step; the all-reduce hides behind the last backward only. ``fsdp``:
    FSDP's collectives instead, every micro-step (see :class:`FsdpTraffic`)."""
    return _total(((k.group, k.phase, kernel_seconds(k, rates) * k.count, k.launches * k.count) for k in kernels),
                  rates, grad_bytes, gather_bytes, micro_steps, fsdp)


def allreduce_seconds(grad_bytes: int, rates: Rates) -> float:
    """A ring all-reduce of ``grad_bytes`` over ``gpus``: each GPU sends and receives
    2 (g - 1) / g of the bytes, at the bus bandwidth (NCCL's busbw convention)."""
    g = rates.gpus
    if g <= 1 or not rates.allreduce_bytes_per_s:
        return 0.0
    return grad_bytes * 2 * (g - 1) / g / rates.allreduce_bytes_per_s


def _fsdp_seconds(fsdp: FsdpTraffic, phases: dict[str, float], micro_steps: int,
                  rates: Rates) -> tuple[float, float, float]:
    """FSDP's exposed communication over the step, and one micro-step's all-gathers and
    reduce-scatters in all. A ring all-gather or reduce-scatter moves (g - 1) / g of the
    bytes through each GPU, at the bus bandwidth."""
    forward = phases.get("forward", 0.0) / micro_steps
    backward = (phases.get("backward", 0.0) + phases.get("recompute", 0.0)) / micro_steps
    gather = allgather_seconds(fsdp.gather_bytes, rates)
    reduce = allgather_seconds(fsdp.reduce_bytes, rates)
    exposed_forward = max(gather - forward, allgather_seconds(fsdp.root_gather_bytes, rates))
    in_backward = (gather if fsdp.regather else 0.0) + reduce + fsdp.replica_seconds
    exposed_backward = max(in_backward - backward, allgather_seconds(fsdp.root_reduce_bytes, rates))
    return micro_steps * (exposed_forward + exposed_backward), gather * (2 if fsdp.regather else 1), reduce


def _total(runs, rates: Rates, grad_bytes: int, gather_bytes: int = 0, micro_steps: int = 1,
           fsdp: Optional[FsdpTraffic] = None) -> StepTime:
    """Sum (group, phase, seconds, launches) of every kernel into a step."""
    groups = dict.fromkeys(BREAKDOWN, 0.0)
    phases: dict[str, float] = {}
    launches = 0
    for group, phase, seconds, n in runs:
        if phase != "optimizer":
            seconds, n = seconds * micro_steps, n * micro_steps
        groups[group] += seconds
        phases[phase] = phases.get(phase, 0.0) + seconds
        launches += n
    device_launch = launches * rates.kernel_seconds
    work = sum(groups.values())
    device = work + device_launch
    host = launches * rates.host_seconds
    if rates.asynchronous:
        launch = device_launch + max(0.0, host - device)
    else:
        launch = device_launch + host
    groups["launch"] = launch
    allreduce = allreduce_seconds(grad_bytes, rates)
    if allreduce:
        backward = (phases.get("backward", 0.0) + phases.get("recompute", 0.0)) / micro_steps  # the last one's
        last = allreduce_seconds(min(grad_bytes, DDP_LAST_BUCKET_BYTES), rates)
        groups["communication"] = max(allreduce - backward, last)
    gather = allgather_seconds(gather_bytes, rates)
    groups["communication"] += gather
    fsdp_gather = fsdp_reduce = 0.0
    if fsdp is not None and rates.gpus > 1:
        exposed, fsdp_gather, fsdp_reduce = _fsdp_seconds(fsdp, phases, micro_steps, rates)
        groups["communication"] += exposed
    return StepTime(step_seconds=sum(groups.values()), breakdown_seconds=groups, phase_seconds=phases, allgather_seconds=gather,
                    device_seconds=device, host_seconds=host, launches=launches, allreduce_seconds=allreduce,
                    fsdp_gather_seconds=fsdp_gather, fsdp_reduce_seconds=fsdp_reduce)


@dataclass(frozen=True)
class RunCost:
    """A training run: ``epochs`` over ``dataset_size`` samples at a global batch."""

    steps: int
    run_seconds: float
    run_gpu_hours: float
    run_cost: Optional[float] = None


def run_cost(step_seconds: float, global_batch: int, gpus: int, epochs: float, dataset_size: int,
             price_per_gpu_hour: Optional[float] = None) -> RunCost:
    """Steps of ``ceil(dataset_size / global_batch)`` per epoch (the last batch partial, priced as
    a full one), their wall time, GPU-hours over every GPU, and the price of those hours."""
    # rounded first: 100 steps x 1.1 epochs is 110.00000000000001 in binary floating point
    steps = math.ceil(round(math.ceil(dataset_size / global_batch) * epochs, 6))
    seconds = steps * step_seconds
    hours = seconds / 3600 * gpus
    return RunCost(steps=steps, run_seconds=seconds, run_gpu_hours=hours,
                   run_cost=None if price_per_gpu_hour is None else hours * price_per_gpu_hour)
