"""Fit on a GPU: a step's allocations through the caching allocator, against the memory the
GPU leaves it.

The memory replay (``vitcost.memory``) writes down every allocation and free of a first step
and of a steady step (``memory.trace``); ``vitcost.allocator`` follows PyTorch's caching
allocator over the first step and the steady one repeated until its state repeats. A batch *fits* when every segment the allocator asks for fits in the
usable memory (the GPU's memory less the CUDA context and the library workspaces), after
releasing its cache when one does not, as PyTorch does before it raises out-of-memory.

Which tensors a step makes does not depend on its batch (from batch 2 on), and every tensor's
size is ``a + m * batch``; so a configuration's events are written down twice, at batch 2
and 3, and read at any batch as those lines (exact: the allocator rounds each request
itself). The largest batch is searched with the allocator, from above: no batch whose
tensors alone exceed the usable memory can fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from vitcost.allocator import OutOfMemory, Stats, round_size, run_steps, segment_size
from vitcost.estimate import _UNBOUNDED, max_batch_size
from vitcost.program import config_key, peak_at
from vitcost.memory import trace
from vitcost.specs import Allocator, ViTSpec, Workload

ALLOCATORS = tuple(a.value for a in Allocator)

_LINES: dict[tuple, tuple] = {}
_LINES_MAX = 256
_MAX: dict[tuple, int] = {}
_MAX_MAX = 1 << 14


def _lines(spec: ViTSpec, wl: Workload, one: bool) -> tuple:
    """The first and the steady step's events as (keys, sizes at batch 0, sizes per image);
    batch 1 is its own."""
    key = config_key(spec, wl) + (one,)
    found = _LINES.get(key)
    if found is None:
        if one:
            found = tuple((tuple(k for k, _ in part), tuple(n for _, n in part), (0,) * len(part))
                          for part in trace(spec, wl.model_copy(update={"batch": 1})))
        else:
            at2 = trace(spec, wl.model_copy(update={"batch": 2}))
            at3 = trace(spec, wl.model_copy(update={"batch": 3}))
            found = []
            for p2, p3 in zip(at2, at3):
                keys = tuple(k for k, _ in p2)
                if keys != tuple(k for k, _ in p3):
                    raise AssertionError("a step traced at batch 2 and 3 made different tensors")
                per = tuple(n3 - n2 for (_, n2), (_, n3) in zip(p2, p3))
                found.append((keys, tuple(n2 - 2 * m for (_, n2), m in zip(p2, per)), per))
            found = tuple(found)
        if len(_LINES) >= _LINES_MAX:
            _LINES.clear()
        _LINES[key] = found
    return found


def events(spec: ViTSpec, wl: Workload, batch: int, extra_bytes: int = 0) -> tuple[tuple, tuple]:
    """(keys, sizes) of the first and of the steady step at ``batch`` (sizes 0: frees);
    ``extra_bytes``: one more tensor made first and kept (DDP's gradient buckets)."""
    (k1, a1, m1), (k2, a2, m2) = _lines(spec, wl, batch == 1)
    first = [a + m * batch for a, m in zip(a1, m1)]
    steady = [a + m * batch for a, m in zip(a2, m2)]
    if extra_bytes > 0:
        return ((-1,) + k1, [extra_bytes] + first), (k2, steady)
    return (k1, first), (k2, steady)


def allocator_stats(spec: ViTSpec, wl: Workload, batch: Optional[int] = None, allocator: str = "native",
                    extra_bytes: int = 0, capacity_bytes: Optional[int] = None) -> Stats:
    """The allocator's counters from a fresh start over a first step and steady steps until
    its state repeats (``peak_reserved`` is what ``max_memory_reserved`` reads); with
    ``capacity_bytes``, raises ``OutOfMemory`` where a segment does not fit even after the
    cache is released."""
    first, steady = events(spec, wl, wl.batch if batch is None else batch, extra_bytes)
    return run_steps(first, steady, capacity_bytes, expandable=allocator == Allocator.expandable.value)


def fits_allocator(spec: ViTSpec, wl: Workload, capacity_bytes: int, allocator: str = "native",
                   extra_bytes: int = 0, batch: Optional[int] = None) -> bool:
    """Whether the steps run without the allocator running out of ``capacity_bytes``."""
    try:
        allocator_stats(spec, wl, batch, allocator, extra_bytes, capacity_bytes)
    except OutOfMemory:
        return False
    return True


def max_batch_allocator(spec: ViTSpec, wl: Workload, capacity_bytes: int, allocator: str = "native",
                        extra_bytes: int = 0) -> int:
    """Largest per-GPU batch whose steps run within ``capacity_bytes`` (0: not even one image).

    From above: the tensors alone (``max_memory_allocated``) bound it, and that batch is
    run first; below it, ``_search`` steps down and bisects. Worked out once per
    configuration without its batch and kept. Near the boundary fitting need not be monotone
    in the batch (the allocator's segments can fall either way): the answer is then a batch
    that fits next to one that does not, the first such found from above.
    """
    key = config_key(spec, wl) + (capacity_bytes, allocator, extra_bytes)
    found = _MAX.get(key)
    if found is None:
        found = _search(spec, wl, capacity_bytes, allocator, extra_bytes)
        if len(_MAX) >= _MAX_MAX:
            _MAX.clear()
        _MAX[key] = found
    return found


def _margin(spec: ViTSpec, wl: Workload, batch: int, capacity: int, allocator: str, extra: int) -> int:
    """Bytes to spare at ``batch`` (>= 0: it fits; the capacity less the reserved peak), or
    short (< 0: how far the segment that did not fit went past the capacity)."""
    try:
        return capacity - allocator_stats(spec, wl, batch, allocator, extra, capacity).peak_reserved
    except OutOfMemory as oom:
        return min(-1, capacity - oom.reserved_bytes - segment_size(round_size(oom.request_bytes)))


def _search(spec: ViTSpec, wl: Workload, capacity: int, allocator: str, extra: int) -> int:
    """The largest batch that fits, below the tensors-only bound.

    Where the bound does not fit, the search steps down by as many images as the shortfall
    is worth in tensor bytes (at least one, doubling while it still does not fit), then
    bisects between the batch that fit and the one that did not: a few allocator runs.
    """
    hi = max_batch_size(spec, wl, capacity - extra)
    if hi == 0 or hi >= _UNBOUNDED:
        return hi
    m = _margin(spec, wl, hi, capacity, allocator, extra)
    if m >= 0:
        return hi
    per_image = max(1, peak_at(spec, wl, hi) - peak_at(spec, wl, max(1, hi - 1)))
    step = 1
    while True:
        step = max(step, -(-(-m) // per_image))
        probe = max(1, hi - step)
        m = _margin(spec, wl, probe, capacity, allocator, extra)
        if m >= 0:
            lo = probe
            break
        if probe == 1:
            return 0
        hi, step = probe, 2 * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _margin(spec, wl, mid, capacity, allocator, extra) >= 0:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class Solver:
    """The allocator's figures for one report, worked out when first asked."""

    spec: ViTSpec
    workload: Workload
    capacity_bytes: int
    allocator: str
    extra_bytes: int = 0

    def max_batch(self) -> int:
        return max_batch_allocator(self.spec, self.workload, self.capacity_bytes, self.allocator, self.extra_bytes)

    @cached_property
    def _at_batch(self) -> tuple[bool, int]:
        """Whether the asked batch fits, and the reserved peak: on this GPU's memory when it
        fits, else with memory to spare (what it would need)."""
        s, w = self.spec, self.workload
        try:
            stats = allocator_stats(s, w, None, self.allocator, self.extra_bytes, self.capacity_bytes)
            return True, stats.peak_reserved
        except OutOfMemory:
            return False, allocator_stats(s, w, None, self.allocator, self.extra_bytes).peak_reserved

    def fits(self) -> bool:
        return self._at_batch[0]

    def peak_reserved(self) -> int:
        return self._at_batch[1]
