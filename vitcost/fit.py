"""Fit on a GPU: a step's allocations through the caching allocator, against the memory the
GPU leaves it.

The memory replay (``vitcost.memory``) writes down every allocation and free of three steps
from a fresh start (``memory.trace``); ``vitcost.allocator`` follows PyTorch's caching
allocator over them. A batch *fits* when every segment the allocator asks for fits in the
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
from typing import Optional

from vitcost.allocator import OutOfMemory, Stats, run
from vitcost.estimate import _UNBOUNDED, _bisect, max_batch_size
from vitcost.memory import trace
from vitcost.specs import Allocator, ViTSpec, Workload

ALLOCATORS = tuple(a.value for a in Allocator)

_LINES: dict[tuple, tuple] = {}
_LINES_MAX = 256
_MAX: dict[tuple, int] = {}
_MAX_MAX = 1 << 14


def _config_key(spec: ViTSpec, wl: Workload) -> tuple:
    """A configuration without its batch."""
    return (spec, wl.mode, wl.precision, wl.attention, wl.optimizer, wl.keep_grads, wl.checkpointing, wl.device)


def _lines(spec: ViTSpec, wl: Workload, one: bool) -> tuple:
    """The step's events as (keys, sizes at batch 0, sizes per image); batch 1 is its own."""
    key = _config_key(spec, wl) + (one,)
    found = _LINES.get(key)
    if found is None:
        if one:
            events, _ = trace(spec, wl.model_copy(update={"batch": 1}))
            found = (tuple(k for k, _ in events), tuple(n for _, n in events), (0,) * len(events))
        else:
            at2, _ = trace(spec, wl.model_copy(update={"batch": 2}))
            at3, _ = trace(spec, wl.model_copy(update={"batch": 3}))
            keys = tuple(k for k, _ in at2)
            if keys != tuple(k for k, _ in at3):
                raise AssertionError("a step traced at batch 2 and 3 made different tensors")
            per = tuple(n3 - n2 for (_, n2), (_, n3) in zip(at2, at3))
            found = (keys, tuple(n2 - 2 * m for (_, n2), m in zip(at2, per)), per)
        if len(_LINES) >= _LINES_MAX:
            _LINES.clear()
        _LINES[key] = found
    return found


def events(spec: ViTSpec, wl: Workload, batch: int, extra_bytes: int = 0) -> tuple[tuple, list]:
    """Keys and sizes of three steps at ``batch`` (sizes 0: frees); ``extra_bytes``: one
    more tensor made first and kept (DDP's gradient buckets)."""
    keys, base, per = _lines(spec, wl, batch == 1)
    sizes = [a + m * batch for a, m in zip(base, per)]
    if extra_bytes > 0:
        return (-1,) + keys, [extra_bytes] + sizes
    return keys, sizes


def allocator_stats(spec: ViTSpec, wl: Workload, batch: Optional[int] = None, allocator: str = "native",
                    extra_bytes: int = 0, capacity_bytes: Optional[int] = None) -> Stats:
    """The allocator's counters over three steps (``peak_reserved`` is what
    ``max_memory_reserved`` reads); with ``capacity_bytes``, raises ``OutOfMemory`` where a
    segment does not fit even after the cache is released."""
    keys, sizes = events(spec, wl, wl.batch if batch is None else batch, extra_bytes)
    return run(keys, sizes, capacity_bytes, expandable=allocator == Allocator.expandable.value)


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
    run first; below it, the allocator's own reserved peak with memory to spare, read as a
    line in the batch, gives the next guess, and the answer is bisected between a batch that
    fits and one that does not. Worked out once per configuration without its batch and
    kept; fitting is taken to be monotone in the batch.
    """
    key = _config_key(spec, wl) + (capacity_bytes, allocator, extra_bytes)
    found = _MAX.get(key)
    if found is None:
        found = _search(spec, wl, capacity_bytes, allocator, extra_bytes)
        if len(_MAX) >= _MAX_MAX:
            _MAX.clear()
        _MAX[key] = found
    return found


def _search(spec: ViTSpec, wl: Workload, capacity: int, allocator: str, extra: int) -> int:
    hi = max_batch_size(spec, wl, capacity - extra)
    if hi == 0 or hi >= _UNBOUNDED:
        return hi

    def fits(batch: int) -> bool:
        return fits_allocator(spec, wl, capacity, allocator, extra, batch)

    if fits(hi):
        return hi
    # hi does not fit: guess from the reserved peaks at hi and just below, read as a line
    lo = 0
    probe = hi
    for _ in range(3):
        b2 = max(1, probe * 7 // 8)
        if b2 >= probe:
            break
        r1 = allocator_stats(spec, wl, probe, allocator, extra).peak_reserved
        r2 = allocator_stats(spec, wl, b2, allocator, extra).peak_reserved
        slope = (r1 - r2) / (probe - b2)
        guess = b2 + int((capacity - r2) // slope) if slope > 0 else b2
        guess = max(1, min(guess, hi - 1))
        if fits(guess):
            lo = guess
            break
        hi = guess
        probe = guess
    if not lo:
        while hi > 1:  # halve until something fits
            mid = hi // 2
            if fits(mid):
                lo = mid
                break
            hi = mid
        if not lo:
            return 0 if not fits(1) else 1
    return _bisect(fits, lo, hi)


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

    def fits(self) -> bool:
        return self.workload.batch <= self.max_batch()

    def peak_reserved(self) -> int:
        s, w = self.spec, self.workload
        if self.fits():
            try:
                return allocator_stats(s, w, None, self.allocator, self.extra_bytes, self.capacity_bytes).peak_reserved
            except OutOfMemory:  # a batch below the largest that does not fit by itself
                pass
        return allocator_stats(s, w, None, self.allocator, self.extra_bytes).peak_reserved
