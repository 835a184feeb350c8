"""The memory replay, compiled once per model structure.

Which tensors a step allocates and frees, and in what order, depends on a configuration's
*structure* (prefix tokens, pooling, precision, kernel, optimizer, checkpointing, depth
1, 2 or more, batch 1 or more); its *sizes* (batch, tokens, width, heads, MLP width,
classes, image, patch, depth) only scale the tensors. So the replay (``vitcost.memory``) is run once per structure
with every size a symbol: a tensor's byte count is then a product of named sizes
(``_Poly``), and every live total a sum of those tensors, each rounded as the allocator
rounds it (``_Vec``). A total that is no larger than another one in every term can never
be the peak, whatever the sizes; the few totals left are compiled into one Python function.
A report at any batch, resolution or width of that structure is then a few dozen integer
operations, and exactly what the replay gives (tests/test_program.py holds the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Callable, Optional

from vitcost import memory
from vitcost.ops import Shapes
from vitcost.replay import CUDA_BLOCK_BYTES, MemoryResult, Replay, memory_result
from vitcost.specs import Device, ViTSpec, Workload

# The sizes a program takes, in order: ``ops.Shapes`` says what each one is, and the depth.
SHAPE_SIZES = ("b", "n", "d", "f", "h", "patches", "image", "conv_w", "pos", "classes", "registers",
               "lse_n", "n128", "hd32", "params", "grads", "states", "kept", "opt_tmp")
SIZES = SHAPE_SIZES + ("depth",)


class _Terms:
    """A sum of terms with integer coefficients; the terms are what subclasses say."""

    __slots__ = ("terms",)

    def __init__(self, terms: dict) -> None:
        self.terms = terms

    @classmethod
    def _of(cls, value) -> "_Terms":
        if isinstance(value, cls):
            return value
        if isinstance(value, int):
            if value and cls.ONE is None:
                raise TypeError(f"{cls.__name__} has no plain-number term")
            return cls({cls.ONE: value} if value else {})
        return NotImplemented

    def __add__(self, other):
        other = self._of(other)
        if other is NotImplemented:
            return other
        terms = dict(self.terms)
        for key, coef in other.terms.items():
            coef += terms.get(key, 0)
            if coef:
                terms[key] = coef
            else:
                terms.pop(key, None)
        return type(self)(terms)

    __radd__ = __add__

    def __neg__(self):
        return type(self)({k: -c for k, c in self.terms.items()})

    def __sub__(self, other):
        other = self._of(other)
        return other if other is NotImplemented else self + -other

    def __rsub__(self, other):
        return -self + other

    def __bool__(self) -> bool:
        return bool(self.terms)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Terms) and type(other) is type(self) and other.terms == self.terms

    def __hash__(self) -> int:
        return hash(frozenset(self.terms.items()))


class _Poly(_Terms):
    """A tensor's byte count before the sizes are known: products of named sizes."""

    ONE: tuple[str, ...] = ()

    @classmethod
    def var(cls, name: str) -> "_Poly":
        return cls({(name,): 1})

    def __mul__(self, other):
        if isinstance(other, int):
            return _Poly({k: c * other for k, c in self.terms.items()} if other else {})
        if not isinstance(other, _Poly):
            return NotImplemented
        terms: dict[tuple[str, ...], int] = {}
        for k1, c1 in self.terms.items():
            for k2, c2 in other.terms.items():
                key = tuple(sorted(k1 + k2))
                terms[key] = terms.get(key, 0) + c1 * c2
        return _Poly({k: c for k, c in terms.items() if c})

    __rmul__ = __mul__

    def source(self) -> str:
        return " + ".join("*".join([str(c)] + list(k)) if k else str(c)
                          for k, c in sorted(self.terms.items())) or "0"


class _Vec(_Terms):
    """Bytes as a sum of tensors, each rounded as allocated: ``{tensor index: count}``."""

    ONE = None  # a sum of tensors takes no plain number but 0

    def __mul__(self, other):
        if not isinstance(other, int):
            return NotImplemented
        return _Vec({k: c * other for k, c in self.terms.items()} if other else {})

    __rmul__ = __mul__

    def source(self, name: Callable[[int], str]) -> str:
        """Python for this sum, term ``k`` named ``name(k)``."""
        return " + ".join(f"{c}*{name(k)}" if c != 1 else name(k) for k, c in sorted(self.terms.items())) or "0"


@dataclass
class _RecordedStretch:
    """Events of a stretch of the replay, the state it started from, and its net change."""

    events: list
    total0: "_Vec"
    cat0: tuple
    change: list


class _Recorder(Replay):
    """A replay that writes down, instead of adding up: every live total and category as a
    ``_Vec``, over the distinct tensor sizes (``atoms``) it has seen."""

    __slots__ = ("atoms", "index", "events")

    def __init__(self) -> None:
        super().__init__(1)
        self.cat = [_Vec({}) for _ in self.cat]
        self.total = _Vec({})
        self.atoms: list[_Poly] = []
        self.index: dict[_Poly, int] = {}
        self.events: list[tuple[_Vec, tuple[_Vec, ...], str]] = []

    def alloc(self, name: str, nbytes, cat: int) -> None:
        if not isinstance(nbytes, _Vec):
            poly = _Poly._of(nbytes)
            if not poly:
                return
            if any(c <= 0 for c in poly.terms.values()):
                raise AssertionError(f"{name}: a tensor size with a negative term: {poly.source()}")
            k = self.index.get(poly)
            if k is None:
                k = self.index[poly] = len(self.atoms)
                self.atoms.append(poly)
            nbytes = _Vec({k: 1})
        elif not nbytes:
            return
        self.live[name] = (nbytes, cat)
        self.cat[cat] = self.cat[cat] + nbytes
        self.total = self.total + nbytes
        if self.sampling:
            self.events.append((self.total, tuple(self.cat), self.where))

    def local(self):
        return len(self.events), self.total, tuple(self.cat)

    def end_local(self, saved) -> _RecordedStretch:
        mark, total0, cat0 = saved
        return _RecordedStretch(self.events[mark:], total0, cat0, [c - c0 for c, c0 in zip(self.cat, cat0)])

    def replay_shifted(self, stretch: _RecordedStretch, old: str, new: str, after: bool = False) -> None:
        total, cat = self.total, tuple(self.cat)
        if after:
            total = total - sum(stretch.change, _Vec({}))
            cat = tuple(c - d for c, d in zip(cat, stretch.change))
        shift = total - stretch.total0
        for t, cats, where in stretch.events:
            # the categories are only worked out for the few events that can be the peak
            self.events.append((t + shift, (cat, stretch.cat0, cats), where.replace(old, new)))


def _categories(cats) -> tuple[_Vec, ...]:
    """An event's live bytes by category, from ``_Recorder.replay_shifted``'s form too."""
    if len(cats) == 3 and isinstance(cats[0], tuple):
        base, origin, at = cats
        return tuple(b + c - o for b, o, c in zip(base, origin, _categories(at)))
    return cats


_FIELD = 32  # bits per count when a total's counts are packed into one integer
_GUARD = 1 << (_FIELD - 1)


def _candidates(totals: list[_Vec], width: int) -> list[int]:
    """Indexes of the totals that can be the peak for some sizes, in replay order.

    Every term of a total is a positive size, so a total with at least the count of every
    term another one has is at least as large, whatever the sizes: the other one is
    dropped, and of equal totals only the first stays (the replay's peak is the first
    largest total). Counts are packed into one integer each, ``_FIELD`` bits a term, so
    that one subtraction compares all of them.
    """
    offset = _GUARD >> 1
    base = sum(offset << (_FIELD * k) for k in range(width))
    guards = sum(_GUARD << (_FIELD * k) for k in range(width))
    packed = [base + sum(c << (_FIELD * k) for k, c in total.terms.items()) for total in totals]

    def covers(big: int, small: int) -> bool:  # every count of ``big`` >= that of ``small``
        return (big | guards) - small & guards == guards

    first: dict[int, int] = {}
    for i, counts in enumerate(packed):
        # an event followed by an allocation with nothing freed between is below the next
        if i + 1 < len(packed) and packed[i + 1] != counts and covers(packed[i + 1], counts):
            continue
        first.setdefault(counts, i)
    # a total that covers another has a larger sum of counts, so it is seen first
    order = sorted(first.values(), key=lambda i: (-sum(totals[i].terms.values()), i))
    kept: list[int] = []
    for i in order:
        if not any(covers(packed[k], packed[i]) for k in kept):
            kept.append(i)
    return sorted(kept)


@dataclass
class Program:
    """One structure's replay as a function of its sizes."""

    run: Callable  # (*SIZES) -> (candidate totals, winner, tensor sizes, figures, components)
    wheres: tuple[str, ...]  # the phase of each candidate; "{last}" stands for the last block
    categories: tuple[tuple[_Vec, ...], ...]  # each candidate's live bytes by replay category
    components: tuple[str, ...]
    tensors: int  # distinct tensor sizes; a term ``k >= tensors`` is depth times size ``k - tensors``
    source: str
    events: int  # allocations the replay records
    _cats: dict = field(default_factory=dict)

    def categories_at(self, k: int, sizes: tuple[int, ...], depth: int) -> tuple[int, ...]:
        """Live bytes by replay category at candidate ``k``, given the tensor sizes."""
        fn = self._cats.get(k)
        if fn is None:
            body = ", ".join(c.source(self._term("a[{}]", "depth*a[{}]")) for c in self.categories[k])
            fn = self._cats[k] = eval(f"lambda a, depth: ({body},)")
        return fn(sizes, depth)

    def where(self, k: int, depth: int) -> str:
        return self.wheres[k].replace("{last}", str(depth - 1))

    def _term(self, plain: str, deep: str) -> Callable[[int], str]:
        n = self.tensors
        return lambda k: plain.format(k) if k < n else deep.format(k - n)


def _symbolic_shapes(spec: ViTSpec, wl: Workload, one: bool) -> Shapes:
    concrete = memory.shapes_of(spec, wl.model_copy(update={"batch": 1 if one else 2}))
    sym = {name: _Poly.var(name) for name in SHAPE_SIZES}
    # a size that is zero for this structure stays zero: no tensor of it is made
    for name in ("classes", "registers", "states", "kept", "opt_tmp"):
        if not getattr(concrete, name):
            sym[name] = 0
    return Shapes(**sym, one=concrete.one, one_head=concrete.one_head, res=concrete.res, lo=concrete.lo,
                  par=concrete.par, stat=concrete.stat, amp=concrete.amp, cuda=concrete.cuda)


class _Recording:
    """A structure replayed with symbolic sizes: its events as totals, categories and
    phases; the step's figures; the saved activations by component; the tensor sizes."""

    def __init__(self, spec: ViTSpec, wl: Workload, one: bool) -> None:
        r = _Recorder()
        figures, components = memory.replay_step(r, spec, wl, _symbolic_shapes(spec, wl, one))
        self.atoms = r.atoms
        self.totals = [t for t, _, _ in r.events]
        self.cats = [c for _, c, _ in r.events]
        self.wheres = [w for _, _, w in r.events]
        self.figures = [_Vec._of(x) if isinstance(x, int) else x for x in figures]
        self.components = components


def _lift(at3, at4, tensors: int):
    """Counts read at depth 3 and 4 as ``a + m * depth``: ``m`` is kept as term ``k + tensors``."""
    if isinstance(at3, _Poly):  # a figure that is a size itself, not a sum of tensors
        return at3
    terms: dict[int, int] = {}
    for k in at3.terms.keys() | at4.terms.keys():
        c3, c4 = at3.terms.get(k, 0), at4.terms.get(k, 0)
        slope = c4 - c3
        if c3 - 3 * slope:
            terms[k] = c3 - 3 * slope
        if slope:
            terms[k + tensors] = slope
    return _Vec(terms)


def _record(spec: ViTSpec, wl: Workload, one: bool) -> _Recording:
    """The recording of ``spec``'s structure; from depth 3 on, with the depth a symbol too.

    Blocks past the first and before the last are replayed as lumps whose counts grow by
    one block per block, so every count is affine in the depth: two recordings, at depth 3
    and 4, fix it for every depth from 3 on (tests/test_program.py checks it at others).
    """
    if spec.depth < 3:
        return _Recording(spec, wl, one)
    rec, at4 = (_Recording(spec.model_copy(update={"depth": depth}), wl, one) for depth in (3, 4))
    if rec.atoms != at4.atoms or len(rec.totals) != len(at4.totals):
        raise AssertionError("a structure replayed at depth 3 and 4 made different tensors")
    n = len(rec.atoms)
    rec.totals = [_lift(a, b, n) for a, b in zip(rec.totals, at4.totals)]
    rec.cats = [(a, b) for a, b in zip(rec.cats, at4.cats)]  # lifted for the candidates only
    rec.figures = [_lift(a, b, n) for a, b in zip(rec.figures, at4.figures)]
    rec.components = {k: _lift(_Vec._of(v), _Vec._of(at4.components[k]), n) for k, v in rec.components.items()}
    wheres = [w.replace("blocks.2", "blocks.{last}") for w in rec.wheres]
    if wheres != [w.replace("blocks.3", "blocks.{last}") for w in at4.wheres]:
        raise AssertionError("a structure replayed at depth 3 and 4 went through different phases")
    rec.wheres = wheres
    return rec


def compile_program(spec: ViTSpec, wl: Workload, one: bool) -> Program:
    """Replay ``spec``/``wl``'s structure with symbolic sizes and compile what it found."""
    rec = _record(spec, wl, one)
    n = len(rec.atoms)
    keep = _candidates(rec.totals, 2 * n)
    block = CUDA_BLOCK_BYTES if wl.device == Device.cuda else 1
    lines = [f"def run({', '.join(SIZES)}):"]
    for k, atom in enumerate(rec.atoms):
        expr = atom.source()
        lines.append(f"    a{k} = -(-({expr}) // {block}) * {block}" if block != 1 else f"    a{k} = {expr}")
    deep = sorted({k - n for v in [*rec.totals, *rec.figures, *rec.components.values()]
                   if isinstance(v, _Vec) for k in v.terms if k >= n})
    lines += [f"    A{k} = depth * a{k}" for k in deep]
    name = lambda k: f"a{k}" if k < n else f"A{k - n}"
    # each candidate total as the one before it plus what changed between them
    steps, prev = [], _Vec({})
    for i in keep:
        steps.append((rec.totals[i] - prev).source(name))
        prev = rec.totals[i]
    lines.append(f"    t = list(accumulate(({', '.join(steps)},)))")
    lines.append("    k = t.index(max(t))")
    atoms = ", ".join(f"a{k}" for k in range(n))
    figs = ", ".join(_source(x, name) for x in rec.figures)
    comps = ", ".join(_source(x, name) for x in rec.components.values())
    lines.append(f"    return t, k, ({atoms},), ({figs},), ({comps}{',' if comps else ''})")
    source = "\n".join(lines) + "\n"
    namespace: dict = {"accumulate": accumulate}
    exec(compile(source, "<vitcost program>", "exec"), namespace)
    categories = []
    for i in keep:
        cats = rec.cats[i]
        if spec.depth >= 3:
            cats = tuple(_lift(a, b, n) for a, b in zip(_categories(cats[0]), _categories(cats[1])))
        categories.append(_categories(cats))
    return Program(run=namespace["run"], wheres=tuple(rec.wheres[i] for i in keep),
                   categories=tuple(categories), components=tuple(rec.components), tensors=n,
                   source=source, events=len(rec.totals))


def _source(x, name: Callable[[int], str]) -> str:
    return x.source(name) if isinstance(x, _Vec) else x.source() if isinstance(x, _Poly) else str(int(x))


# --- evaluating -------------------------------------------------------------------------------

_PROGRAMS: dict[tuple, Program] = {}
_USES: dict[tuple, int] = {}  # evaluations of a structure not yet compiled
_PREPARED: dict[tuple, tuple[Program, tuple[int, ...]]] = {}
_PREPARED_MAX = 1 << 16

# A structure is replayed until it has been evaluated this many times, then compiled: a
# compile costs ~8 ms, about fifty replays, so one `vitcost plan` (a handful of evaluations)
# never pays it and a sweep pays it once per structure.
COMPILE_AFTER = 16


def structure_key(spec: ViTSpec, wl: Workload, one: Optional[bool] = None) -> tuple:
    """What decides which tensors a step makes: configurations that agree on it share a
    program. ``one``: at batch 1 (else ``wl.batch`` says)."""
    return (min(spec.depth, 3), spec.class_token, spec.dist_token, spec.registers > 0, spec.pos_embed,
            spec.pos_embed_prefix, spec.pooling, spec.classes > 0, spec.qkv_bias, spec.layer_scale, spec.impl,
            spec.mask_token, spec.mlp, spec.video, spec.distillation, spec.heads == 1,
            wl.mode, wl.precision, wl.attention, wl.optimizer, wl.accumulates, wl.checkpointing, wl.device,
            wl.shards_optimizer, wl.batch == 1 if one is None else one)


def config_key(spec: ViTSpec, wl: Workload) -> tuple:
    """A configuration without its batch: what the caches of per-batch answers are keyed by."""
    return (spec, wl.mode, wl.precision, wl.attention, wl.optimizer, wl.keep_grads, wl.checkpointing, wl.device,
            wl.strategy, wl.ranks, wl.rank, wl.grad_accum)


def _prepared(spec: ViTSpec, wl: Workload, one: bool) -> Optional[tuple[Program, tuple[int, ...]]]:
    """The structure's program and the sizes but the batch, per configuration without its
    batch; None while the structure is still replayed (see ``COMPILE_AFTER``)."""
    if spec.mae is not None or spec.swin is not None or spec.drop_path or spec.pos_grid or wl.fsdp:
        # blocks that differ (MAE's two stacks; drop path but on the first; FSDP's buffers at
        # the first and last block): replayed in full
        return None
    key = config_key(spec, wl) + (one,)
    prepared = _PREPARED.get(key)
    if prepared is not None:
        return prepared
    structure = structure_key(spec, wl, one)
    program = _PROGRAMS.get(structure)
    if program is None:
        uses = _USES[structure] = _USES.get(structure, 0) + 1
        if uses < COMPILE_AFTER:
            return None
        program = _PROGRAMS[structure] = compile_program(spec, wl, one)
    if len(_PREPARED) >= _PREPARED_MAX:
        _PREPARED.clear()
    sh = memory.shapes_of(spec, wl if (wl.batch == 1) == one else wl.model_copy(update={"batch": 1 if one else 2}))
    prepared = _PREPARED[key] = program, tuple(getattr(sh, name) for name in SHAPE_SIZES[1:]) + (spec.depth,)
    return prepared


def estimate_memory(spec: ViTSpec, wl: Workload) -> MemoryResult:
    """The memory of one step of ``spec``/``wl``: what ``memory.replay_memory`` finds, from
    the structure's compiled program once there is one."""
    prepared = _prepared(spec, wl, wl.batch == 1)
    if prepared is None:
        return memory.replay_memory(spec, wl)[0]
    program, sizes = prepared
    totals, k, atoms, figures, components = program.run(wl.batch, *sizes)
    depth = spec.depth
    return memory_result(figures, totals[k], program.categories_at(k, atoms, depth), program.where(k, depth),
                                dict(zip(program.components, components)))


def candidate_totals(spec: ViTSpec, wl: Workload, *batches: int) -> list[list[int]]:
    """For each batch (``wl.batch`` is not read), totals whose largest is the peak; for
    batches that are all 1 or all above 1 they are the same totals, index for index: the
    program's candidates, or every total of the replay while there is no program."""
    one = batches[0] == 1
    if any((b == 1) != one for b in batches):
        raise ValueError("candidate_totals: batch 1 and larger batches have different totals")
    prepared = _prepared(spec, wl, one)
    if prepared is None:
        return [list(memory.replay_memory(spec, wl.model_copy(update={"batch": b}))[1]) for b in batches]
    program, sizes = prepared
    return [program.run(b, *sizes)[0] for b in batches]


def peak_at(spec: ViTSpec, wl: Workload, batch: int) -> int:
    """The peak at another batch size (``wl.batch`` is not read)."""
    return max(candidate_totals(spec, wl, batch)[0])
