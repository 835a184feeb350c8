"""CI budgets: a file of named configurations with limits, checked without a GPU.

A budget file (YAML or JSON; schema in ``docs/budgets.schema.json``, prose in
``docs/ci.md``) names configurations — everything :func:`vitcost.plan` accepts — and the
limits each must stay within. :func:`export` evaluates every entry into the JSON of
``plan --json`` (a baseline to commit); :func:`check` evaluates them again and lists each
limit broken, each figure grown past ``max_regression`` against a baseline, and each
measured peak (from ``vitcost calibrate --out``) that breaks a memory limit.

Units: bytes are bytes; GiB are 2**30 bytes; GMACs are 1e9 multiply-accumulates of the
forward pass of one image; percentages are of the GPU's usable memory (what PyTorch's
tensors may use on one GPU, the figure ``plan`` fits against). Memory figures are per GPU.

Pure: no torch, typer or rich. Every problem with a file raises a one-line
:class:`~vitcost.errors.BudgetFileError` naming the file, the entry and the field.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vitcost.errors import BudgetFileError, ConfigError, ProfileError, UnknownNameError
from vitcost.files import load_json, load_yaml, read_text
from vitcost.specs import (AttentionKernel, Checkpointing, Device, Impl, Mlp, Mode, Optimizer, Pooling, PosEmbed, Precision,
                           Strategy)

SCHEMA_VERSION = 1
GIB = 2**30

# the figures the regression rule compares, as paths into the report of ``plan --json``
REGRESSION_FIGURES = ("memory_bytes.peak", "memory_bytes.activations", "macs.forward_per_image")

_IMAGE = re.compile(r"^\s*\d+\s*(?:[xX]\s*\d+\s*)?$")


# --- the file ----------------------------------------------------------------------------------


_GPU_LIMITS = ("peak_memory_percent", "min_headroom_bytes", "min_headroom_gib", "min_max_batch_size")


_MAX_BYTES = 1 << 50  # 1 PiB: no GPU comes near
_MAX_GIB = float(1 << 20)


class Limits(BaseModel):
    """What one configuration must stay within; a limit left out is not checked."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"not": {"anyOf": [
        {"required": ["peak_memory_bytes", "peak_memory_gib"]},
        {"required": ["min_headroom_bytes", "min_headroom_gib"]},
    ]}})

    peak_memory_bytes: Optional[int] = Field(None, ge=0, le=_MAX_BYTES, strict=True, description="Largest allowed peak memory per GPU, bytes.")
    peak_memory_gib: Optional[float] = Field(None, ge=0, le=_MAX_GIB, strict=True, allow_inf_nan=False, description="Largest allowed peak memory per GPU, GiB (2**30 bytes).")
    peak_memory_percent: Optional[float] = Field(None, gt=0, le=100, strict=True, allow_inf_nan=False, description="Largest allowed peak memory, percent of the GPU's usable memory (needs gpu).")
    min_headroom_bytes: Optional[int] = Field(None, ge=0, le=_MAX_BYTES, strict=True, description="Smallest allowed usable memory left at the peak, bytes (needs gpu).")
    min_headroom_gib: Optional[float] = Field(None, ge=0, le=_MAX_GIB, strict=True, allow_inf_nan=False, description="Smallest allowed usable memory left at the peak, GiB (needs gpu).")
    must_fit: Optional[bool] = Field(None, strict=True, description="true: the peak must fit the GPU's usable memory (needs gpu); false checks nothing.")
    max_gmacs_per_image: Optional[float] = Field(None, ge=0, le=1e12, strict=True, allow_inf_nan=False, description="Largest allowed forward MACs per image, in GMACs (1e9).")
    min_max_batch_size: Optional[int] = Field(None, ge=0, le=1 << 40, strict=True, description="Smallest allowed largest-batch-that-fits (global batch; needs gpu).")

    @model_validator(mode="after")
    def _one_unit_each(self) -> "Limits":
        for a, b in (("peak_memory_bytes", "peak_memory_gib"), ("min_headroom_bytes", "min_headroom_gib")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ValueError(f"give {a} or {b}, not both")
        return self

    def needing_gpu(self) -> list[str]:
        """The limits set here that only a GPU profile can check."""
        return [k for k in _GPU_LIMITS if getattr(self, k) is not None] + (["must_fit"] if self.must_fit else [])


PositiveInt = Annotated[int, Field(gt=0, le=1 << 40, strict=True)]  # plan's own bounds are tighter
NonNegativeInt = Annotated[int, Field(ge=0, le=1 << 40, strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]


class BudgetEntry(BaseModel):
    """One named configuration (the keyword arguments of ``vitcost.plan``) and its limits.

    A key left out takes ``plan``'s default (vit-b, batch 8, train, amp-bf16, sdpa, adamw).
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={  # the limits a GPU profile checks need one
        "if": {"required": ["limits"], "properties": {"limits": {"anyOf": [
            *({"required": [k]} for k in _GPU_LIMITS),
            {"required": ["must_fit"], "properties": {"must_fit": {"const": True}}},
        ]}}},
        "then": {"required": ["gpu"], "properties": {"gpu": {"type": "string"}}},
    })

    name: str = Field(min_length=1, description="Unique name of the entry; the JUnit test case name.")
    model: Optional[str] = Field(None, min_length=1, description="Preset (vit-ti ... vit-G) or timm-style name (vit_base_patch16_384).")
    image: Optional[Union[PositiveInt, Annotated[str, Field(pattern=_IMAGE.pattern)]]] = Field(
        None, description="Image size: 384 or \"HxW\" (\"384x256\").")
    patch: Optional[PositiveInt] = Field(None, description="Patch size in pixels.")
    batch: Optional[PositiveInt] = Field(None, description="Global batch size (split over the GPUs of a multi-GPU profile).")
    mode: Optional[Mode] = Field(None, description="train: a full optimizer step; infer: a no_grad forward.")
    precision: Optional[Precision] = None
    attention: Optional[AttentionKernel] = None
    optimizer: Optional[Optimizer] = None
    keep_grads: Optional[StrictBool] = Field(None, description="zero_grad(set_to_none=False): gradients stay allocated.")
    checkpointing: Optional[Checkpointing] = None
    strategy: Optional[Strategy] = Field(None, description="ddp (the default) or zero1: how the step is spread over GPUs.")
    gpus: Optional[PositiveInt] = Field(None, le=65536, description="GPUs the step is spread over (overrides the profile's count).")
    nodes: Optional[PositiveInt] = Field(None, le=65536, description="Nodes of a node profile (8xa100, 8xh100).")
    grad_accum: Optional[PositiveInt] = Field(None, le=4096, description="Micro-steps per optimizer step (gradient accumulation).")
    device: Optional[Device] = Field(None, description="Replay rules: cuda (the default) or cpu.")
    strict: Optional[StrictBool] = Field(None, description="An image not divisible by the patch is an error.")
    gpu: Optional[str] = Field(None, min_length=1, description="GPU profile name or alias, or a path to a YAML profile relative to the budget file.")
    dim: Optional[PositiveInt] = None
    depth: Optional[PositiveInt] = None
    heads: Optional[PositiveInt] = None
    mlp_ratio: Optional[float] = Field(None, gt=0, le=64, strict=True, allow_inf_nan=False)
    mlp_hidden: Optional[PositiveInt] = None
    channels: Optional[PositiveInt] = None
    class_token: Optional[StrictBool] = None
    dist_token: Optional[StrictBool] = None
    registers: Optional[NonNegativeInt] = None
    pos_embed: Optional[PosEmbed] = None
    pos_embed_prefix: Optional[StrictBool] = None
    pooling: Optional[Pooling] = None
    classes: Optional[NonNegativeInt] = None
    qkv_bias: Optional[StrictBool] = None
    layer_scale: Optional[StrictBool] = None
    impl: Optional[Impl] = None
    mlp: Optional[Mlp] = None
    drop_path: Optional[StrictBool] = None
    distillation: Optional[StrictBool] = None
    limits: Limits = Field(default_factory=Limits)

    @field_validator("image", mode="before")
    @classmethod
    def _image(cls, value: Any) -> Any:
        ok = (isinstance(value, int) and not isinstance(value, bool) and value > 0) or (
            isinstance(value, str) and _IMAGE.match(value) and all(int(n) > 0 for n in re.split(r"[xX]", value)))
        if value is not None and not ok:
            raise ValueError(f"expected a size like 384 or \"384x256\", got {value!r}")
        return value

    @model_validator(mode="after")
    def _gpu_for_gpu_limits(self) -> "BudgetEntry":
        needing = self.limits.needing_gpu()
        if needing and self.gpu is None:
            raise ValueError(f"limits.{needing[0]} needs a GPU: add gpu: <profile name or path>")
        return self

    def plan_kwargs(self, base_dir: Path) -> dict[str, Any]:
        """The keyword arguments of :func:`vitcost.plan`; a GPU path is taken relative to ``base_dir``."""
        kw = self.model_dump(mode="json", exclude_none=True, exclude={"name", "limits"})
        if "gpu" in kw:
            kw["gpu"] = resolve_gpu(kw["gpu"], base_dir)
        return kw


class BudgetFile(BaseModel):
    """A vitcost budget file: configurations CI holds to their limits."""

    model_config = ConfigDict(extra="forbid", title="vitcost budget file")

    version: Literal[1] = Field(1, description="Version of the budget file format.")
    budgets: list[BudgetEntry] = Field(min_length=1, description="The configurations, each with its limits.")

    @model_validator(mode="after")
    def _unique_names(self) -> "BudgetFile":
        seen: dict[str, int] = {}
        for i, entry in enumerate(self.budgets, 1):
            if entry.name in seen:
                raise ValueError(f"duplicate entry name {entry.name!r} (entries {seen[entry.name]} and {i})")
            seen[entry.name] = i
        return self


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a budget file, as committed in docs/budgets.schema.json."""
    schema = _drop_titles(BudgetFile.model_json_schema())
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _drop_titles(node: Any, top: bool = True) -> Any:
    """Pydantic's generated per-field titles ("Peak Memory Gib") say nothing the key does not."""
    if isinstance(node, dict):
        return {k: _drop_titles(v, False) for k, v in node.items() if top or k != "title" or not isinstance(v, str)}
    if isinstance(node, list):
        return [_drop_titles(v, False) for v in node]
    return node


def resolve_gpu(gpu: str, base_dir: Path) -> str:
    """A profile path relative to the budget file's directory; a profile name unchanged."""
    from vitcost.profiles import _is_path

    if not _is_path(gpu):
        return gpu
    path = Path(gpu).expanduser()
    return str(path if path.is_absolute() else base_dir / path)


# --- reading files -----------------------------------------------------------------------------


def _read_text(path: Path, what: str = "") -> str:
    return read_text(path, BudgetFileError, f"{path}: {what}")


def _json_loads(path: Path, text: str) -> Any:
    return load_json(text, str(path), BudgetFileError)


def _parse_data(path: Path, text: str) -> Any:
    """YAML, or JSON for a ``.json`` file (no key twice in a mapping, in either)."""
    if path.suffix.lower() == ".json":
        return _json_loads(path, text)
    return load_yaml(text, str(path), BudgetFileError)


def load_budget_file(path: Union[str, Path]) -> BudgetFile:
    """Read and validate a budget file; raises :class:`BudgetFileError` with one line."""
    path = Path(path)
    data = _parse_data(path, _read_text(path))
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise BudgetFileError(f"{path}: expected a mapping with a 'budgets' list, got {got}")
    try:
        return BudgetFile.model_validate(data)
    except ValidationError as err:
        raise BudgetFileError(f"{path}: {_one_line(err, data)}") from None


def _entry_label(data: Any, index: int) -> str:
    entries = data.get("budgets") if isinstance(data, dict) else None
    raw = entries[index] if isinstance(entries, list) and index < len(entries) else None
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"entry {name!r}" if isinstance(name, str) and name else f"entry #{index + 1}"


def _one_line(err: ValidationError, data: Any) -> str:
    """The first problem as "entry 'x': limits.peak_memory_gib: message (and N more)"."""
    errors = sorted(err.errors(), key=lambda e: (e["type"] != "extra_forbidden", [str(p) for p in e["loc"]]))
    first = errors[0]
    loc = list(first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    where = []
    if len(loc) >= 2 and loc[0] == "budgets" and isinstance(loc[1], int):
        where.append(_entry_label(data, loc[1]))
        loc = loc[2:]
        model: type[BaseModel] = BudgetEntry
    else:
        model = BudgetFile
    # a union's member names (``int``, ``constrained-str``) are not keys of the file
    keys = [str(p) for p in loc if first["type"] == "extra_forbidden" or isinstance(p, int) or p in _ALL_KEYS]
    if keys[:1] == ["limits"]:
        model = Limits
    key = ".".join(keys)
    if first["type"] == "missing":
        message = f"{key}: missing key"
    elif first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(keys[-1], list(model.model_fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        message = f"{key}: unknown key{hint}"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        message = f"{key}: {msg}" if key else msg
    return ": ".join(where + [message + more])


_ALL_KEYS = set(BudgetFile.model_fields) | set(BudgetEntry.model_fields) | set(Limits.model_fields)


# --- evaluation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    """One limit broken: ``actual`` against ``limit`` by ``excess``, all in ``unit``
    (``actual`` and ``excess`` are None for a measured step that ran out of memory)."""

    entry: str
    figure: str
    actual: Optional[float]
    limit: float
    excess: Optional[float]
    unit: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"entry": self.entry, "figure": self.figure, "actual": self.actual, "limit": self.limit,
                "excess": self.excess, "unit": self.unit, "message": self.message}


@dataclass(frozen=True)
class Evaluated:
    """One entry evaluated: its limits and the report of ``plan --json``."""

    name: str
    limits: Limits
    report: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "limits": self.limits.model_dump(exclude_none=True), "report": self.report}


@dataclass(frozen=True)
class EntryResult:
    """An evaluated entry and what it broke."""

    evaluated: Evaluated
    violations: tuple[Violation, ...]
    measured_peak_bytes: Optional[int] = None

    @property
    def name(self) -> str:
        return self.evaluated.name

    @property
    def passed(self) -> bool:
        return not self.violations

    @property
    def peak_limit_bytes(self) -> Optional[int]:
        """The tightest of the peak-memory limits, in bytes (None when there is none)."""
        caps = _peak_caps(self.evaluated.limits, _usable(self.evaluated.report))
        return min(caps) if caps else None

    def to_dict(self) -> dict[str, Any]:
        return {**self.evaluated.to_dict(), "passed": self.passed,
                "measured_peak_bytes": self.measured_peak_bytes,
                "violations": [v.to_dict() for v in self.violations]}


@dataclass(frozen=True)
class CheckResult:
    """Every entry of a budget file checked; ``notes`` say what was not compared and why."""

    budget_file: str
    entries: tuple[EntryResult, ...]
    notes: tuple[str, ...] = ()
    baseline: Optional[str] = None
    max_regression: Optional[float] = None
    measured: Optional[str] = None

    @property
    def violations(self) -> list[Violation]:
        return [v for e in self.entries for v in e.violations]

    @property
    def passed(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "budget_file": self.budget_file,
            "baseline": self.baseline,
            "max_regression": self.max_regression,
            "measured": self.measured,
            "passed": self.passed,
            "entries": [e.to_dict() for e in self.entries],
            "violations": [v.to_dict() for v in self.violations],
            "notes": list(self.notes),
        }


def evaluate(path: Union[str, Path]) -> list[Evaluated]:
    """Read a budget file and run ``plan`` on every entry (in file order)."""
    from vitcost.api import plan
    from vitcost.profiles import load_profile

    path = Path(path)
    budget = load_budget_file(path)
    out = []
    for entry in budget.budgets:
        where = f"{path}: entry {entry.name!r}"
        kw = entry.plan_kwargs(path.parent)
        if "gpu" in kw:
            try:
                load_profile(kw["gpu"])
            except (UnknownNameError, ProfileError) as err:
                raise BudgetFileError(f"{where}: gpu: {err}") from None
        try:
            report = plan(**kw)
        except UnknownNameError as err:
            raise BudgetFileError(f"{where}: model: {err}") from None
        except ConfigError as err:
            raise BudgetFileError(f"{where}: {err}") from None
        out.append(Evaluated(entry.name, entry.limits, report.to_dict()))
    return out


def export(path: Union[str, Path]) -> dict[str, Any]:
    """The baseline of a budget file: per entry its limits and the report of ``plan --json``."""
    from vitcost import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "vitcost_version": __version__,
        "budget_file": str(path),
        "entries": [e.to_dict() for e in evaluate(path)],
    }


def check(path: Union[str, Path], *, baseline: Union[str, Path, None] = None, max_regression: float = 0.0,
          measured: Union[str, Path, None] = None) -> CheckResult:
    """Evaluate a budget file against its limits, a baseline's figures and measured peaks."""
    if max_regression < 0:
        raise ValueError(f"max_regression must not be negative, got {max_regression}")
    evaluated = evaluate(path)
    notes: list[str] = []
    for e in evaluated:
        notes += [f"entry {e.name!r}: {w}" for w in e.report["warnings"]]
    old = load_baseline(baseline) if baseline is not None else None
    found = match_measured(load_measured(measured), evaluated) if measured is not None else MeasuredMatch({}, {}, [])
    notes += found.notes
    results = []
    for e in evaluated:
        violations = limit_violations(e)
        if old is not None:
            if e.name in old:
                violations += regression_violations(e.name, old[e.name], e.report, max_regression)
            else:
                notes.append(f"entry {e.name!r} is not in the baseline {baseline}: no regression check")
        if e.name in found.peaks:
            violations += memory_violations(e.name, found.peaks[e.name], _usable(e.report), e.limits, measured=True)
        if e.name in found.out_of_memory and e.limits.must_fit:
            violations.append(out_of_memory_violation(e, found.out_of_memory[e.name]))
        results.append(EntryResult(e, tuple(violations), found.peaks.get(e.name)))
    if old is not None:
        names = {e.name for e in evaluated}
        notes += [f"baseline entry {n!r} is not in {path}: ignored" for n in old if n not in names]
    return CheckResult(str(path), tuple(results), tuple(notes),
                       baseline=str(baseline) if baseline is not None else None,
                       max_regression=max_regression if baseline is not None else None,
                       measured=str(measured) if measured is not None else None)


def _usable(report: dict[str, Any]) -> Optional[int]:
    return report["gpu"]["usable_memory_bytes"] if report["gpu"] else None


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _peak_caps(limits: Limits, usable: Optional[int]) -> list[int]:
    """The peak-memory limits in bytes (a percentage only with a GPU's usable memory)."""
    caps = []
    if limits.peak_memory_bytes is not None:
        caps.append(limits.peak_memory_bytes)
    if limits.peak_memory_gib is not None:
        caps.append(math.floor(limits.peak_memory_gib * GIB))
    if limits.peak_memory_percent is not None and usable is not None:
        caps.append(math.floor(usable * limits.peak_memory_percent / 100))
    return caps


def memory_violations(name: str, peak: int, usable: Optional[int], limits: Limits, *,
                      measured: bool = False, reserved: Optional[int] = None,
                      fits: Optional[bool] = None) -> list[Violation]:
    """The memory limits (peak, headroom, must_fit) against a peak in bytes, predicted or measured.
    ``reserved``: what the caching allocator holds at its peak, which headroom is read
    against when given; ``fits``: the allocator's verdict, which must_fit then takes, so that
    a budget never disagrees with ``plan``."""
    what = "measured peak" if measured else "peak"
    prefix = "measured " if measured else ""
    out = []
    if limits.peak_memory_bytes is not None and peak > limits.peak_memory_bytes:
        cap = limits.peak_memory_bytes
        out.append(Violation(name, prefix + "peak_memory_bytes", peak, cap, peak - cap, "bytes",
                             f"{what} {peak} bytes ({_gib(peak)}) exceeds the limit {cap} bytes by {peak - cap} bytes"))
    if limits.peak_memory_gib is not None and peak / GIB > limits.peak_memory_gib:
        actual, cap = peak / GIB, limits.peak_memory_gib
        out.append(Violation(name, prefix + "peak_memory_gib", actual, cap, actual - cap, "GiB",
                             f"{what} {actual:.2f} GiB exceeds the limit {cap:g} GiB by {actual - cap:.2f} GiB"))
    if usable is None:
        return out
    if limits.peak_memory_percent is not None and 100 * peak / usable > limits.peak_memory_percent:
        actual, cap = 100 * peak / usable, limits.peak_memory_percent
        out.append(Violation(name, prefix + "peak_memory_percent", actual, cap, actual - cap, "%",
                             f"{what} {_gib(peak)} is {actual:.1f}% of usable {_gib(usable)}, above the limit "
                             f"{cap:g}% by {actual - cap:.1f} points"))
    held = peak if reserved is None else reserved
    headroom = usable - held
    for key, floor, unit in (("min_headroom_bytes", limits.min_headroom_bytes, "bytes"),
                             ("min_headroom_gib", limits.min_headroom_gib, "GiB")):
        if floor is None:
            continue
        actual = headroom if unit == "bytes" else headroom / GIB
        if actual < floor:
            shown = (f"{actual} bytes", f"{floor} bytes", f"{floor - actual} bytes") if unit == "bytes" else \
                (f"{actual:.2f} GiB", f"{floor:g} GiB", f"{floor - actual:.2f} GiB")
            out.append(Violation(name, prefix + key, actual, floor, floor - actual, unit,
                                 f"headroom at the {what} {shown[0]} is below the minimum {shown[1]} by {shown[2]}"))
    # a predicted fit is the allocator's verdict at the batch; a measured one, the peak itself
    if limits.must_fit and (held > usable if fits is None else not fits):
        what = what if reserved is None else "reserved peak"
        out.append(Violation(name, prefix + "must_fit", held, usable, held - usable, "bytes",
                             f"does not fit: {what} {_gib(held)} exceeds usable {_gib(usable)} by {_gib(held - usable)}"))
    return out


def limit_violations(e: Evaluated) -> list[Violation]:
    """Every limit of an entry against its predicted figures."""
    report, limits = e.report, e.limits
    out = memory_violations(e.name, report["memory_bytes"]["peak"], _usable(report), limits,
                            reserved=report["memory_bytes"].get("peak_reserved"), fits=report.get("fits"))
    gmacs = report["macs"]["forward_per_image"] / 1e9
    cap = limits.max_gmacs_per_image
    if cap is not None and gmacs > cap:
        out.append(Violation(e.name, "max_gmacs_per_image", gmacs, cap, gmacs - cap, "GMACs",
                             f"forward {gmacs:.2f} GMACs per image exceeds the limit {cap:g} by {gmacs - cap:.2f} GMACs"))
    floor = limits.min_max_batch_size
    largest = report["max_batch_size"]
    if floor is not None and largest is not None and largest < floor:
        out.append(Violation(e.name, "min_max_batch_size", largest, floor, floor - largest, "images",
                             f"largest batch that fits is {largest}, below the minimum {floor} by {floor - largest}"))
    return out


def regression_violations(name: str, old: dict[str, Any], new: dict[str, Any], max_regression: float) -> list[Violation]:
    """Each figure of :data:`REGRESSION_FIGURES` that grew more than ``max_regression`` (a fraction)."""
    out = []
    for figure in REGRESSION_FIGURES:
        before, after = _figure(old, figure), _figure(new, figure)
        cap = before * (1 + max_regression)
        if after > cap:
            unit = "MACs" if figure.startswith("macs.") else "bytes"
            growth = f"{100 * (after - before) / before:.1f}%" if before else "from 0"
            out.append(Violation(name, f"{figure} (vs baseline)", after, cap, after - cap, unit,
                                 f"{figure} grew {growth} against the baseline ({before} -> {after} {unit}), "
                                 f"more than the allowed {100 * max_regression:g}%"))
    return out


def _figure(report: dict[str, Any], dotted: str) -> int:
    value: Any = report
    for part in dotted.split("."):
        value = value[part]
    return value


# --- the baseline and measured files -------------------------------------------------------------


def load_baseline(path: Union[str, Path]) -> dict[str, dict[str, Any]]:
    """Entry name -> report, from :func:`export`'s JSON (``check --json`` output is accepted too)."""
    path = Path(path)
    data = _parse_json(path, "baseline ")
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise BudgetFileError(f"{path}: baseline: expected an object with an 'entries' list (from 'vitcost export')")
    out: dict[str, dict[str, Any]] = {}
    for i, item in enumerate(entries, 1):
        name = item.get("name") if isinstance(item, dict) else None
        report = item.get("report") if isinstance(item, dict) else None
        if not isinstance(name, str) or not isinstance(report, dict):
            raise BudgetFileError(f"{path}: baseline entry #{i}: expected an object with 'name' and 'report'")
        for figure in REGRESSION_FIGURES:
            try:
                value = _figure(report, figure)
            except (KeyError, TypeError):
                raise BudgetFileError(f"{path}: baseline entry {name!r}: report.{figure}: missing") from None
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1 << 60:
                raise BudgetFileError(f"{path}: baseline entry {name!r}: report.{figure}: expected a whole number, 0 to 2**60")
        if name in out:
            raise BudgetFileError(f"{path}: baseline entry {name!r} is given twice")
        out[name] = report
    return out


def _parse_json(path: Path, what: str) -> Any:
    return _json_loads(path, _read_text(path, what))


# inputs that identify a measured row's configuration, compared with the report's inputs
# (``calibrate --out`` rows carry all of them, under ``inputs``)
_MATCH_KEYS = ("model", "image", "image_h", "image_w", "patch", "batch", "mode", "precision", "attention",
               "optimizer", "keep_grads", "checkpointing", "device", "dim", "depth", "heads", "mlp_hidden",
               "channels", "class_token", "dist_token", "registers", "pos_embed", "pos_embed_prefix", "pooling",
               "classes", "qkv_bias", "layer_scale", "impl", "mlp", "drop_path", "distillation")
# calibrate's row statuses: a step that ran has figures; these did not
OUT_OF_MEMORY = "out of memory"
_RAN = ("ok", "off")


@dataclass(frozen=True)
class Measured:
    """One measured row: a peak in bytes (None when the step did not run) and what identifies it."""

    where: str  # "row 3" for messages
    peak_bytes: Optional[int]
    status: Optional[str]
    name: Optional[str]
    inputs: dict[str, Any]


def load_measured(path: Union[str, Path]) -> list[Measured]:
    """Rows of ``vitcost calibrate --out``: a list, or an object with ``rows``; each row has
    ``measured.peak_bytes`` (or a ``status`` other than ok, with ``measured`` null) and a
    ``name`` or inputs (under ``inputs``, or at the top level of the row)."""
    path = Path(path)
    data = _parse_json(path, "measured ")
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise BudgetFileError(f"{path}: measured: expected a list of rows or an object with a 'rows' list")
    out = []
    for i, row in enumerate(rows, 1):
        where = f"{path}: row {i}"
        if not isinstance(row, dict):
            raise BudgetFileError(f"{where}: expected an object, got {type(row).__name__}")
        status = row.get("status")
        if status is not None and not isinstance(status, str):
            raise BudgetFileError(f"{where}: status: expected a string")
        m = row.get("measured")
        if m is None and status is not None and status not in _RAN:
            peak = None  # out of memory, or not run: no figures
        else:
            peak = m.get("peak_bytes") if isinstance(m, dict) else None
            if not isinstance(peak, int) or isinstance(peak, bool) or not 0 <= peak <= _MAX_BYTES:
                raise BudgetFileError(f"{where}: measured.peak_bytes: expected a whole number of bytes, 0 to 2**50")
        name = row.get("name")
        if name is not None and not isinstance(name, str):
            raise BudgetFileError(f"{where}: name: expected a string")
        source = row.get("inputs", row)
        if not isinstance(source, dict):
            raise BudgetFileError(f"{where}: inputs: expected an object")
        inputs = {k: source[k] for k in _MATCH_KEYS if source.get(k) is not None}
        if name is None and "model" not in inputs:
            raise BudgetFileError(f"{where}: needs a 'name' or the inputs (model, image, patch, batch, precision, mode)")
        if "image" in inputs:
            from vitcost.api import parse_image

            try:
                inputs["image_h"], inputs["image_w"] = parse_image(inputs.pop("image"))
            except (ConfigError, TypeError, ValueError):
                raise BudgetFileError(f"{where}: image: expected a size like 384 or \"384x256\"") from None
        out.append(Measured(f"row {i}", peak, status, name, inputs))
    return out


def _same_model(a: Any, b: Any) -> bool:
    norm = lambda s: str(s).strip().lower().replace("_", "-")  # noqa: E731
    return norm(a) == norm(b)


def _matches(row: Measured, e: Evaluated) -> bool:
    if row.name is not None:
        return row.name == e.name
    inputs = e.report["inputs"]
    return all(_same_model(value, inputs["model"]) if key == "model" else value == inputs[key]
               for key, value in row.inputs.items())


@dataclass(frozen=True)
class MeasuredMatch:
    """Measured rows matched to entries: the largest peak per entry, the entries that ran out
    of memory (entry -> the row), and notes on what matched nothing or twice."""

    peaks: dict[str, int]
    out_of_memory: dict[str, str]
    notes: list[str]


def match_measured(rows: list[Measured], evaluated: list[Evaluated]) -> MeasuredMatch:
    """Each row to every entry it matches (by name, or by every input it gives)."""
    peaks: dict[str, int] = {}
    oom: dict[str, str] = {}
    counts: dict[str, int] = {}
    notes = []
    for row in rows:
        hits = [e for e in evaluated if _matches(row, e)]
        if not hits:
            notes.append(f"measured {row.where} matches no entry: ignored")
        elif row.peak_bytes is None and row.status != OUT_OF_MEMORY:
            notes.append(f"measured {row.where}: status {row.status!r}, no peak: ignored")
        for e in hits:
            if row.peak_bytes is not None:
                peaks[e.name] = max(peaks.get(e.name, 0), row.peak_bytes)
                counts[e.name] = counts.get(e.name, 0) + 1
            elif row.status == OUT_OF_MEMORY:
                oom.setdefault(e.name, row.where)
    for e in evaluated:
        if e.name not in peaks and e.name not in oom:
            notes.append(f"entry {e.name!r}: no measured peak")
        elif counts.get(e.name, 0) > 1:
            notes.append(f"entry {e.name!r}: {counts[e.name]} measured rows, the largest peak is checked")
        if e.name in oom and not e.limits.must_fit:
            notes.append(f"entry {e.name!r}: out of memory in measured {oom[e.name]} (set must_fit: true to fail on it)")
    return MeasuredMatch(peaks, oom, notes)


def out_of_memory_violation(e: Evaluated, where: str) -> Violation:
    """A measured step that ran out of memory breaks ``must_fit``; its peak is unknown."""
    usable = _usable(e.report)
    return Violation(e.name, "measured must_fit", None, usable, None, "bytes",
                     f"does not fit: the measured step ran out of memory ({where}); usable {_gib(usable)}")


# --- option parsing and JUnit ------------------------------------------------------------------


def parse_fraction(text: str) -> float:
    """``"5%"`` or ``"0.05"`` as 0.05; a bare number above 1 is refused (write ``5%``)."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise ValueError(f"{text!r}: expected a percentage like 5% or a fraction like 0.05") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r}: must be a non-negative percentage or fraction")
    if not s.endswith("%") and value > 1:
        raise ValueError(f"{text!r}: a fraction above 1; write {s}% for {s} percent")
    return value


def _junit_text(text: str, lines: bool = False) -> str:
    """``text`` as the terminal shows it: control characters (which XML 1.0 forbids even as
    character references) become visible ``\\xNN`` escapes; with ``lines``, its line breaks
    stay (a failure's text, one line a violation), else they are escaped too (a name)."""
    from vitcost.render import escape_control

    if lines:
        return "\n".join(escape_control(line) for line in text.split("\n"))
    return escape_control(text)


def junit_xml(result: CheckResult) -> str:
    """JUnit XML: a test suite ``vitcost``, a test case per entry, a failure per broken entry.

    Entry names and messages come from the budget file: their control characters are written
    as ``\\xNN`` text, so the report always parses."""
    failed = [e for e in result.entries if not e.passed]
    suite = ET.Element("testsuite", name="vitcost", tests=str(len(result.entries)),
                       failures=str(len(failed)), errors="0", skipped="0")
    for e in result.entries:
        case = ET.SubElement(suite, "testcase", classname="vitcost.budgets", name=_junit_text(e.name))
        if e.violations:
            messages = [v.message for v in e.violations]
            failure = ET.SubElement(case, "failure", message=_junit_text("; ".join(messages)), type="budget")
            failure.text = _junit_text("\n".join(f"{v.figure}: {v.message}" for v in e.violations), lines=True)
    if result.notes:
        ET.SubElement(suite, "system-out").text = _junit_text("\n".join(result.notes), lines=True)
    ET.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"


if __name__ == "__main__":  # python -m vitcost.budgets > docs/budgets.schema.json
    print(json.dumps(json_schema(), indent=2))
