"""The replay engine: live tensors by name, totals by category, the peak; and the trace.

A model (``vitcost.memory`` for the ViT family) drives a :class:`Replay` operator by
operator (``vitcost.ops``): ``alloc`` a tensor of so many bytes in a category, ``free`` it
when its last user is done. The replay keeps the live total and its largest value, with
what was live by category at that moment; a stretch (one block) can be recorded and
replayed shifted, which is how depth costs nothing. :class:`Trace` is the same engine
writing down every allocation and free in order, for the caching allocator
(``vitcost.allocator``). ``vitcost.program`` records the same calls with symbolic sizes.

Knows nothing of ViTs, torch, typer or rich. Every size in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

# Replay categories: weights, gradients, optimizer states, optimizer temporaries, inputs,
# saved for backward, forward temporaries, backward temporaries, autocast weight copies.
W, G, O, OT, I, S, F, B, WC = range(9)
CATEGORIES = ("weights", "gradients", "optimizer", "activations", "temporaries")
_REPORTED = ("weights", "gradients", "optimizer", "optimizer", "activations",
             "activations", "activations", "temporaries", "activations")

# The replay's categories by name, in the order the memory table lists them at the peak.
DETAIL = ("weights", "gradients", "optimizer_states", "optimizer_temporaries", "inputs", "saved",
          "forward_temporaries", "backward_temporaries", "autocast_copies")

CUDA_BLOCK_BYTES = 512  # the caching allocator rounds every tensor up to this


@dataclass(frozen=True)
class MemoryResult:
    """What the replay found. Every figure in bytes."""

    weights: int
    gradients: int
    optimizer_states: int
    inputs: int
    activations: int  # saved for backward at the end of the forward pass (0 under no_grad)
    autocast_copies: int  # low-precision weight copies autocast holds at the end of forward
    peak: int
    transient: int  # at the peak: temporaries of forward, backward and the optimizer step
    peak_phase: str
    at_peak: dict[str, int]  # MemTracker's categories live at the peak
    saved_by_component: dict[str, int]  # activations saved for backward, by component
    at_peak_detail: dict[str, int] | None = None  # the replay's own categories (``DETAIL``) live at the peak


class Replay:
    """Live tensors by name, totals by category, and the peak."""

    __slots__ = ("live", "cat", "total", "peak", "peak_cat", "peak_where", "where", "round_to", "sampling", "totals")

    def __init__(self, round_to: int) -> None:
        self.live: dict[str, tuple[int, int]] = {}
        self.cat = [0] * 9  # live bytes by category
        self.total = 0
        self.peak = 0
        self.peak_cat = self.cat[:]
        self.peak_where = ""
        self.where = ""
        self.round_to = round_to
        self.sampling = True
        self.totals: list[int] = []

    FULL = False  # replay every block (a trace for the allocator), not the first and last only

    def alloc_parts(self, name: str, nbytes: int, parts: tuple[int, ...], cat: int) -> None:
        """Tensors that the replay only ever adds up (every parameter's weight, state or
        gradient): one entry of ``nbytes``; a trace keeps the ``parts`` apart."""
        self.alloc(name, nbytes, cat)

    def alloc(self, name: str, nbytes: int, cat: int) -> None:
        if nbytes <= 0:
            return
        if self.round_to != 1:
            nbytes = _round_up(nbytes, self.round_to)
        self.live[name] = (nbytes, cat)
        self.cat[cat] += nbytes
        total = self.total = self.total + nbytes
        if self.sampling:
            self.totals.append(total)
            if total > self.peak:
                self.peak = total
                self.peak_cat = self.cat[:]
                self.peak_where = self.where

    def local(self) -> tuple[int, list[int], str, int, list[int], int]:
        """Start a stretch whose own peak is wanted: returns the state to resume from."""
        saved = (self.peak, self.peak_cat, self.peak_where, self.total, self.cat[:], len(self.totals))
        self.peak = -1
        return saved

    def end_local(self, saved) -> "_Stretch":
        """Close a stretch: its own peak, relative to where it started, and its net change."""
        peak, peak_cat, peak_where, total0, cat0, mark = saved
        stretch = _Stretch(
            peak=self.peak - total0,
            peak_cat=[a - b for a, b in zip(self.peak_cat, cat0)],
            where=self.peak_where,
            totals=[t - total0 for t in self.totals[mark:]],
            change=[a - b for a, b in zip(self.cat, cat0)],
        )
        if peak >= self.peak:
            self.peak, self.peak_cat, self.peak_where = peak, peak_cat, peak_where
        return stretch

    def replay_shifted(self, stretch: "_Stretch", old: str, new: str, after: bool = False) -> None:
        """The same stretch again (an identical block elsewhere, its phase named with ``new``
        for ``old``), from the current state, or with ``after`` from the state the
        stretch's net change leads to the current one."""
        total, cat = self.total, self.cat
        if after:
            total -= sum(stretch.change)
            cat = [a - b for a, b in zip(cat, stretch.change)]
        self.totals.extend(total + t for t in stretch.totals)
        if total + stretch.peak > self.peak:
            self.peak = total + stretch.peak
            self.peak_cat = [a + b for a, b in zip(cat, stretch.peak_cat)]
            self.peak_where = stretch.where.replace(old, new)

    def free(self, *names: str) -> None:
        for name in names:
            entry = self.live.pop(name, None)
            if entry is not None:
                self.cat[entry[1]] -= entry[0]
                self.total -= entry[0]

    def retag(self, name: str, cat: int) -> None:
        entry = self.live.get(name)
        if entry is not None:
            self.cat[entry[1]] -= entry[0]
            self.cat[cat] += entry[0]
            self.live[name] = (entry[0], cat)

    def rename(self, old: str, new: str) -> None:
        self.live[new] = self.live.pop(old)

    def free_matching(self, suffix: str) -> None:
        self.free(*[n for n in self.live if n.endswith(suffix)])


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


@dataclass
class _Stretch:
    """A stretch of the replay (one block's forward or backward), relative to its start."""

    peak: int
    peak_cat: list[int]
    where: str
    totals: list[int]
    change: list[int]


def memory_result(figures, peak: int, peak_cat, peak_where: str, components: dict[str, int]) -> MemoryResult:
    weights, gradients, states, inputs, saved, copies = figures
    at_peak = dict.fromkeys(CATEGORIES, 0)
    for cat, nbytes in enumerate(peak_cat):
        at_peak[_REPORTED[cat]] += nbytes
    return MemoryResult(
        weights=weights,
        gradients=gradients,
        optimizer_states=states,
        inputs=inputs,
        activations=saved,
        autocast_copies=copies,
        peak=peak,
        transient=peak_cat[F] + peak_cat[B] + peak_cat[OT],
        peak_phase=peak_where,
        at_peak=at_peak,
        saved_by_component=components,
        at_peak_detail=dict(zip(DETAIL, peak_cat)),
    )


class Trace(Replay):
    """A replay of every block that writes down each allocation and free in order, as
    ``(key, bytes)`` events (bytes 0: free ``key``), for ``vitcost.allocator``. Parameters,
    optimizer states and kept gradients are one tensor each, as PyTorch allocates them.
    Allocations of the ``skip`` names (tensors an earlier step made) are not written down.
    Sizes are as requested: the allocator rounds them itself."""

    FULL = True
    __slots__ = ("events", "keys", "parts", "counter", "skip")

    def __init__(self, counter, skip: frozenset = frozenset()) -> None:
        super().__init__(1)
        self.sampling = False  # the allocator reads the events; no totals or peak are kept here
        self.events: list[tuple[int, int]] = []
        self.keys: dict[str, int] = {}
        self.parts: dict[str, list[str]] = {}
        self.counter = counter
        self.skip = skip

    def alloc_parts(self, name: str, nbytes: int, parts: tuple[int, ...], cat: int) -> None:
        if not parts:
            self.alloc(name, nbytes, cat)
            return
        names = self.parts[name] = [f"{name}#{k}" for k in range(len(parts))]
        for part_name, part in zip(names, parts):
            self.alloc(part_name, part, cat)

    def alloc(self, name: str, nbytes: int, cat: int) -> None:
        if nbytes <= 0:
            return
        super().alloc(name, nbytes, cat)
        if name.partition("#")[0] not in self.skip:
            key = self.keys[name] = next(self.counter)
            self.events.append((key, self.live[name][0]))

    def free(self, *names: str) -> None:
        for name in names:
            parts = self.parts.pop(name, None)
            if parts:
                self.free(*parts)
                continue
            key = self.keys.pop(name, None)
            if key is not None and name in self.live:
                self.events.append((key, 0))
            super().free(name)

    def rename(self, old: str, new: str) -> None:
        super().rename(old, new)
        if old in self.keys:
            self.keys[new] = self.keys.pop(old)

    def end_step(self, persistent: frozenset, keep: tuple[int, ...] = ()) -> None:
        """The step is over: every tensor but the ``persistent`` ones (and categories ``keep``) goes."""
        for name, (_, cat) in list(self.live.items()):
            if name.partition("#")[0] not in persistent and cat not in keep:
                self.free(name)
