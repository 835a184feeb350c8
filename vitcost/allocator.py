"""PyTorch's CUDA caching allocator, replayed over a step's allocations and frees.

``max_memory_allocated`` counts tensors; what runs a GPU out of memory is what the caching
allocator has asked the driver for (``max_memory_reserved``): whole *segments*, inside which
freed blocks are cached for reuse and can be split, but which go back to the driver only
when entirely free. This module follows the allocator's rules (c10/cuda/CUDACachingAllocator.cpp,
torch 2.x, one stream) over the sequence of allocations and frees the memory replay writes
down (``vitcost.memory.trace``):

* every request is rounded up to 512 bytes; requests up to 1 MiB use the *small* pool, larger
  ones the *large* pool;
* a request takes the smallest cached free block of its pool that is large enough (ties: the
  lower address), split when what is left is at least 512 bytes (small pool) or more than
  1 MiB (large pool), else handed out whole;
* with no such block a new segment is requested: 2 MiB for a small request, 20 MiB below
  10 MiB, else the request rounded up to 2 MiB; a segment that does not fit in the memory
  left makes the allocator release every entirely free cached segment and try again, and
  only then fail (``OutOfMemory``);
* a freed block merges with free neighbours of its own segment, never across segments.

``expandable=True`` follows ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` instead: one
growing segment per pool, mapped in pages (2 MiB small, 20 MiB large) as blocks reach them;
free pages are unmapped only under memory pressure, so what is reserved is the pages live
blocks touch plus the cached ones.

Pure Python, no torch: every size in bytes.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import Optional, Sequence

MIB = 1 << 20
MIN_BLOCK = 512  # kMinBlockSize: every request is rounded up to this
SMALL_SIZE = MIB  # kSmallSize: the largest request the small pool serves
SMALL_BUFFER = 2 * MIB  # kSmallBuffer: a small-pool segment
LARGE_BUFFER = 20 * MIB  # kLargeBuffer: a segment for requests between 1 and 10 MiB
MIN_LARGE_ALLOC = 10 * MIB  # kMinLargeAlloc: from here a segment is the request itself
ROUND_LARGE = 2 * MIB  # kRoundLarge: ... rounded up to this


class OutOfMemory(Exception):
    """A segment the allocator needed did not fit, even after releasing its cache."""

    def __init__(self, request_bytes: int, reserved_bytes: int, allocated_bytes: int, capacity_bytes: int) -> None:
        self.request_bytes = request_bytes
        self.reserved_bytes = reserved_bytes
        self.allocated_bytes = allocated_bytes
        self.capacity_bytes = capacity_bytes
        super().__init__(f"out of memory: {request_bytes} bytes requested with {reserved_bytes} reserved "
                         f"({allocated_bytes} allocated) of {capacity_bytes}")


def round_size(nbytes: int) -> int:
    """A request as the allocator sizes it: at least 512 bytes, a multiple of 512."""
    return MIN_BLOCK if nbytes < MIN_BLOCK else -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(nbytes: int) -> int:
    """The ``cudaMalloc`` a request that found no cached block makes (rounded request)."""
    if nbytes <= SMALL_SIZE:
        return SMALL_BUFFER
    if nbytes < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-nbytes // ROUND_LARGE) * ROUND_LARGE


@dataclass
class Stats:
    """What the allocator's counters would read, bytes."""

    allocated: int = 0  # blocks handed out (``memory_allocated``)
    reserved: int = 0  # segments held (``memory_reserved``)
    requested: int = 0  # rounded requests of live tensors
    peak_allocated: int = 0
    peak_reserved: int = 0
    peak_requested: int = 0
    segments: int = 0  # cudaMalloc calls that succeeded
    releases: int = 0  # times the cache was released to retry a cudaMalloc


_SHIFT = 48  # a free block's sort key: size << 48 | address (addresses stay below 2**48)
_ADDR = (1 << _SHIFT) - 1


class _Block:
    __slots__ = ("small", "addr", "size", "free", "prev", "next")

    def __init__(self, small: bool, addr: int, size: int) -> None:
        self.small = small
        self.addr = addr
        self.size = size
        self.free = True
        self.prev: Optional[_Block] = None
        self.next: Optional[_Block] = None


class CachingAllocator:
    """The native allocator: segments from ``cudaMalloc``, blocks cached in two pools.

    ``run`` takes a stretch of events at once (one loop, for speed); ``malloc`` and
    ``free`` are one event each.
    """

    def __init__(self, capacity_bytes: Optional[int] = None) -> None:
        self.capacity = capacity_bytes  # None: the driver never says no
        self.stats = Stats()
        self._pools: tuple[list, list] = ([], [])  # free blocks, small and large: size << 48 | address
        self._free_at: dict[int, _Block] = {}  # addr -> free block
        self._live: dict[int, tuple[_Block, int]] = {}  # tensor key -> (block, rounded request)
        self._segments: dict[int, tuple[int, _Block]] = {}  # address -> (size, first block)
        self._next_addr = 0

    def malloc(self, key: int, nbytes: int) -> None:
        self.run((key,), (nbytes,))

    def free(self, key: int) -> None:
        self.run((key,), (0,))

    def run(self, keys: Sequence[int], sizes: Sequence[int]) -> None:
        """Events in order: ``sizes[i] > 0`` allocates tensor ``keys[i]``, ``0`` frees it."""
        st = self.stats
        allocated, requested = st.allocated, st.requested
        peak_allocated, peak_requested = st.peak_allocated, st.peak_requested
        small_pool, large_pool = self._pools
        free_at, live = self._free_at, self._live
        try:
            for key, nbytes in zip(keys, sizes):
                if nbytes:
                    size = MIN_BLOCK if nbytes < MIN_BLOCK else -(-nbytes // MIN_BLOCK) * MIN_BLOCK
                    small = size <= SMALL_SIZE
                    pool = small_pool if small else large_pool
                    i = bisect_left(pool, size << _SHIFT)
                    if i < len(pool):
                        block = free_at.pop(pool.pop(i) & _ADDR)
                    else:
                        st.allocated = allocated
                        block = self._new_segment(size, small)
                    rest = block.size - size
                    if rest >= MIN_BLOCK if small else rest > SMALL_SIZE:
                        tail = _Block(small, block.addr + size, rest)
                        tail.prev, tail.next = block, block.next
                        if block.next is not None:
                            block.next.prev = tail
                        block.next = tail
                        block.size = size
                        free_at[tail.addr] = tail
                        insort(pool, rest << _SHIFT | tail.addr)
                    block.free = False
                    live[key] = (block, size)
                    allocated += block.size
                    requested += size
                    if allocated > peak_allocated:
                        peak_allocated = allocated
                    if requested > peak_requested:
                        peak_requested = requested
                else:
                    block, size = live.pop(key)
                    allocated -= block.size
                    requested -= size
                    pool = small_pool if block.small else large_pool
                    prev, nxt = block.prev, block.next
                    if prev is not None and prev.free:
                        del pool[bisect_left(pool, prev.size << _SHIFT | prev.addr)]
                        del free_at[prev.addr]
                        prev.size += block.size
                        prev.next = nxt
                        if nxt is not None:
                            nxt.prev = prev
                        block = prev
                    if nxt is not None and nxt.free:
                        del pool[bisect_left(pool, nxt.size << _SHIFT | nxt.addr)]
                        del free_at[nxt.addr]
                        block.size += nxt.size
                        block.next = nxt.next
                        if nxt.next is not None:
                            nxt.next.prev = block
                    block.free = True
                    free_at[block.addr] = block
                    insort(pool, block.size << _SHIFT | block.addr)
        finally:
            st.allocated, st.requested = allocated, requested
            st.peak_allocated, st.peak_requested = peak_allocated, peak_requested

    def empty_cache(self) -> None:
        """Release every entirely free segment (``torch.cuda.empty_cache()``)."""
        for pool in self._pools:
            blocks = [self._free_at[key & _ADDR] for key in pool]
            for block in [b for b in blocks if b.prev is None and b.next is None]:
                del pool[bisect_left(pool, block.size << _SHIFT | block.addr)]
                del self._free_at[block.addr]
                self.stats.reserved -= self._segments.pop(block.addr)[0]

    def signature(self) -> tuple:
        """The state that decides what the allocator does next: every segment, in address
        order, as its blocks' sizes and whether each is free."""
        out = []
        for addr in sorted(self._segments):
            block, blocks = self._segments[addr][1], []
            while block is not None:
                blocks.append(block.size if block.free else -block.size)
                block = block.next
            out.append(tuple(blocks))
        return tuple(out)

    def _new_segment(self, size: int, small: bool) -> _Block:
        seg_bytes = SMALL_BUFFER if small else segment_size(size)
        st = self.stats
        if self.capacity is not None and st.reserved + seg_bytes > self.capacity:
            st.releases += 1
            self.empty_cache()
            if st.reserved + seg_bytes > self.capacity:
                raise OutOfMemory(size, st.reserved, st.allocated, self.capacity)
        st.segments += 1
        st.reserved += seg_bytes
        if st.reserved > st.peak_reserved:
            st.peak_reserved = st.reserved
        block = _Block(small, self._next_addr, seg_bytes)
        self._segments[block.addr] = (seg_bytes, block)
        self._next_addr += seg_bytes
        return block


class ExpandableAllocator:
    """``expandable_segments:True``: one growing segment per pool, mapped page by page.

    Blocks are carved best-fit from the segment's free ranges (split whenever anything is
    left: sizes are multiples of 512); a request that fits no free range extends the segment
    at its end (taking the free range there, if any). Pages are mapped as blocks reach them
    and stay mapped when freed, until mapping a new one would not fit: then every page no
    live block touches is unmapped, and only if that is not enough is it ``OutOfMemory``.
    """

    PAGES = (SMALL_BUFFER, LARGE_BUFFER)  # page size of the small and the large pool

    def __init__(self, capacity_bytes: Optional[int] = None) -> None:
        self.capacity = capacity_bytes
        self.stats = Stats()
        self._free: tuple[list, list] = ([], [])  # free ranges (size, start) per pool
        self._starts: tuple[dict, dict] = ({}, {})  # start -> size of each free range
        self._ends: tuple[dict, dict] = ({}, {})  # end -> start of each free range
        self._top = [0, 0]  # end of each pool's segment
        self._mapped: tuple[set, set] = (set(), set())
        self._users: tuple[dict, dict] = ({}, {})  # page -> live blocks on it
        self._live: dict[int, tuple[int, int, int]] = {}  # key -> (pool, start, size)

    def malloc(self, key: int, nbytes: int) -> None:
        size = round_size(nbytes)
        p = 0 if size <= SMALL_SIZE else 1
        free, starts, ends = self._free[p], self._starts[p], self._ends[p]
        i = bisect_left(free, (size, -1))
        if i < len(free):
            rsize, start = free.pop(i)
            del starts[start], ends[start + rsize]
            if rsize > size:
                self._add_free(p, start + size, rsize - size)
        else:  # extend the segment, from the free range at its end if there is one
            top = self._top[p]
            start = ends.get(top, top)
            if start != top:
                del free[bisect_left(free, (top - start, start))]
                del starts[start], ends[top]
            self._top[p] = start + size
        self._map(p, start, size)
        self._live[key] = (p, start, size)
        st = self.stats
        st.allocated += size
        st.requested += size
        st.peak_allocated = max(st.peak_allocated, st.allocated)
        st.peak_requested = max(st.peak_requested, st.requested)

    def run(self, keys: Sequence[int], sizes: Sequence[int]) -> None:
        malloc, free = self.malloc, self.free
        for key, nbytes in zip(keys, sizes):
            if nbytes:
                malloc(key, nbytes)
            else:
                free(key)

    def signature(self) -> tuple:
        return (tuple(map(tuple, self._free)), tuple(self._top), tuple(map(frozenset, self._mapped)))

    def free(self, key: int) -> None:
        p, start, size = self._live.pop(key)
        self.stats.allocated -= size
        self.stats.requested -= size
        page = self.PAGES[p]
        users = self._users[p]
        for k in range(start // page, (start + size - 1) // page + 1):
            users[k] -= 1
        end = start + size
        starts, ends, free = self._starts[p], self._ends[p], self._free[p]
        before = ends.get(start)
        if before is not None:  # merge with the free range that ends here
            bsize = start - before
            del free[bisect_left(free, (bsize, before))]
            del starts[before], ends[start]
            start = before
        after = starts.get(end)
        if after is not None:  # ... and with the one that starts here
            del free[bisect_left(free, (after, end))]
            del starts[end], ends[end + after]
            end += after
        self._add_free(p, start, end - start)

    def empty_cache(self) -> None:
        """Unmap every page no live block touches."""
        for p in (0, 1):
            idle = [k for k in self._mapped[p] if not self._users[p].get(k)]
            self._mapped[p].difference_update(idle)
            self.stats.reserved -= len(idle) * self.PAGES[p]

    def _add_free(self, p: int, start: int, size: int) -> None:
        self._starts[p][start] = size
        self._ends[p][start + size] = start
        insort(self._free[p], (size, start))

    def _map(self, p: int, start: int, size: int) -> None:
        page = self.PAGES[p]
        pages = range(start // page, (start + size - 1) // page + 1)
        mapped, users = self._mapped[p], self._users[p]
        new = [k for k in pages if k not in mapped]
        st = self.stats
        if new:
            need = len(new) * page
            if self.capacity is not None and st.reserved + need > self.capacity:
                st.releases += 1
                self.empty_cache()
                if st.reserved + need > self.capacity:
                    raise OutOfMemory(size, st.reserved, st.allocated, self.capacity)
            mapped.update(new)
            st.reserved += need
            st.segments += 1
            st.peak_reserved = max(st.peak_reserved, st.reserved)
        for k in pages:
            users[k] = users.get(k, 0) + 1


def run(keys: Sequence[int], sizes: Sequence[int], capacity_bytes: Optional[int] = None,
        expandable: bool = False) -> Stats:
    """Feed events through a fresh allocator: ``sizes[i] > 0`` allocates tensor ``keys[i]``
    of that many bytes, ``0`` frees it. Raises :class:`OutOfMemory` when a segment does not
    fit in ``capacity_bytes``."""
    alloc = ExpandableAllocator(capacity_bytes) if expandable else CachingAllocator(capacity_bytes)
    alloc.run(keys, sizes)
    return alloc.stats


MAX_STEPS = 8  # steps simulated at most before the state is taken as settled


def run_steps(first: tuple[Sequence[int], Sequence[int]], step: tuple[Sequence[int], Sequence[int]],
              capacity_bytes: Optional[int] = None, expandable: bool = False) -> Stats:
    """A first step, then the steady step again and again until the allocator's state at
    the end of a step is the state at the end of the step before: from then on every step
    does exactly the same, so the counters hold for any number of steps (at most
    ``MAX_STEPS`` are run). Raises :class:`OutOfMemory` as :func:`run` does."""
    alloc = ExpandableAllocator(capacity_bytes) if expandable else CachingAllocator(capacity_bytes)
    alloc.run(*first)
    before = alloc.signature()  # a first step no different from the rest (inference) may settle at once
    for _ in range(MAX_STEPS - 1):
        alloc.run(*step)
        now = alloc.signature()
        if now == before:
            break
        before = now
    return alloc.stats
