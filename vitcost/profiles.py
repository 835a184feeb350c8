"""GPU hardware profiles: find, validate and resolve ``hardware_profiles/*.yaml``.

A profile is a YAML file whose keys carry their units (``memory_mib``,
``memory_bandwidth_gb_per_s``, ``dense_tflops``). Conventions:

* MiB = 2**20 bytes; GB/s = 1e9 bytes/s; TFLOP/s = 1e12 FLOP/s.
* ``dense_tflops`` are datasheet peaks without 2:4 sparsity, tensor-core rates with FP32
  accumulation; ``matmul_efficiency`` (achievable / peak) is kept apart from the peak.
* Memory and compute figures are per GPU; ``gpus`` says how many the machine has.

A profile is named by its file name (``a100-80gb.yaml`` -> ``a100-80gb``). Files are read
lazily on first use and cached; nothing is read at import time. Every problem is raised as
a one-line :class:`~vitcost.errors.ProfileError` or :class:`~vitcost.errors.UnknownNameError`.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vitcost.errors import ProfileError, UnknownNameError
from vitcost.files import load_yaml, read_text

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

MIB = 2**20
Dtype = Literal["fp32", "tf32", "bf16", "fp16"]
_SUFFIXES = (".yaml", ".yml")
_CONFIG = ConfigDict(extra="forbid", frozen=True)


class DenseTflops(BaseModel):
    """Dense peak TFLOP/s per dtype (tensor-core rates with FP32 accumulation)."""

    model_config = _CONFIG

    fp32: float = Field(ge=0.01, le=1e6, strict=True, allow_inf_nan=False)
    tf32: float = Field(ge=0.01, le=1e6, strict=True, allow_inf_nan=False)
    bf16: float = Field(ge=0.01, le=1e6, strict=True, allow_inf_nan=False)
    fp16: float = Field(ge=0.01, le=1e6, strict=True, allow_inf_nan=False)


class Interconnect(BaseModel):
    """A link and its speed per direction, per GPU."""

    model_config = _CONFIG

    name: str = Field(min_length=1)
    gb_per_s_per_direction: float = Field(ge=0.01, le=1e6, strict=True, allow_inf_nan=False)


class TimeFigures(BaseModel):
    """What the time model needs beyond the datasheet rates (``vitcost.timing``), with a source."""

    model_config = _CONFIG

    compute_units: int = Field(gt=0, le=1 << 20, strict=True)  # SMs (a GPU) or cores (a CPU)
    memory_bandwidth_efficiency: float = Field(ge=0.01, le=1, strict=True, allow_inf_nan=False)
    attention_efficiency: float = Field(ge=0.01, le=1, strict=True, allow_inf_nan=False)
    # bf16/fp16 fused attention where it differs from fp32's (a CPU's kernels do; a GPU's run on tensor cores)
    attention_efficiency_low: Optional[float] = Field(default=None, ge=0.01, le=1, strict=True, allow_inf_nan=False)
    kernel_overhead_us: float = Field(ge=0, le=1e6, strict=True, allow_inf_nan=False)
    host_overhead_us: float = Field(ge=0, le=1e6, strict=True, allow_inf_nan=False)
    matmul_tile: int = Field(default=128, ge=0, le=4096, strict=True)  # 0: no tile or wave quantization
    attention_tile: int = Field(default=128, ge=0, le=4096, strict=True)  # 0: the fused kernel pads nothing
    # elements/s of pointwise operators bound by arithmetic (a CPU's, from 'vitcost probe'):
    # "gelu/4" is GELU on fp32 elements; an operator not listed is bound by its bytes. A mapping
    # in the YAML, kept as sorted pairs (a profile is hashable).
    pointwise_elements_per_s: tuple[tuple[str, float], ...] = ()
    source: str = Field(min_length=1)

    @field_validator("pointwise_elements_per_s", mode="before")
    @classmethod
    def _rates_positive(cls, value: Any) -> tuple[tuple[str, float], ...]:
        if not isinstance(value, dict):
            raise ValueError("a mapping of 'operator/element bytes' to elements per second")
        for key, rate in value.items():
            op, _, size = str(key).partition("/")
            if not op or size not in ("2", "4"):
                raise ValueError(f"key {key!r}: an operator and its element bytes, as 'gelu/4' or 'gelu/2'")
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 1 <= rate <= 1e15:
                raise ValueError(f"{key}: elements per second, a number from 1 to 1e15")
        return tuple(sorted((str(k), float(v)) for k, v in value.items()))


class GPUProfile(BaseModel):
    """One GPU model (or a node of ``gpus`` identical GPUs), per-GPU figures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)  # the file name without suffix; not written in the YAML
    display_name: str = Field(min_length=1)
    aliases: tuple[str, ...] = ()
    gpus: int = Field(default=1, gt=0, le=65536, strict=True)
    memory_mib: int = Field(gt=0, le=1 << 24, strict=True)  # up to 16 TiB per GPU
    cuda_context_mib: int = Field(ge=0, le=1 << 24, strict=True)  # 0 only for a CPU
    library_workspace_mib: float = Field(ge=0, le=1 << 24, strict=True, allow_inf_nan=False)
    overheads_source: str = Field(min_length=1)
    memory_bandwidth_gb_per_s: float = Field(ge=1, le=1e6, strict=True, allow_inf_nan=False)
    dense_tflops: DenseTflops
    matmul_efficiency: float = Field(ge=0.01, le=1, strict=True, allow_inf_nan=False)
    interconnect: Interconnect
    node_interconnect: Optional[Interconnect] = None
    allreduce_bus_gb_per_s: Optional[float] = Field(default=None, ge=0.01, le=1e6, strict=True, allow_inf_nan=False)
    time: Optional[TimeFigures] = None  # without it, plan answers memory and says what time needs
    device: Literal["cuda", "cpu"] = "cuda"  # "cpu": a machine measured by 'vitcost probe'
    source: str = Field(min_length=1)

    @model_validator(mode="after")
    def _context_fits(self) -> "GPUProfile":
        if self.device == "cuda" and not self.cuda_context_mib:
            raise ValueError("cuda_context_mib: a GPU's CUDA context takes memory; give it (0 only with device: cpu)")
        if self.cuda_context_mib + self.library_workspace_mib >= self.memory_mib:
            raise ValueError(
                f"cuda_context_mib {self.cuda_context_mib} + library_workspace_mib {self.library_workspace_mib:g} "
                f"is not less than memory_mib {self.memory_mib}"
            )
        return self

    @property
    def memory_bytes(self) -> int:
        """Memory of one GPU in bytes."""
        return self.memory_mib * MIB

    @property
    def cuda_context_bytes(self) -> int:
        """Memory taken outside PyTorch's allocator (CUDA context, kernels), bytes."""
        return self.cuda_context_mib * MIB

    @property
    def workspace_bytes(self) -> int:
        """cuBLAS/cuBLASLt and cuDNN workspaces the libraries keep, bytes."""
        return int(self.library_workspace_mib * MIB)

    @property
    def usable_memory_bytes(self) -> int:
        """Bytes of one GPU the caching allocator's segments may take: memory less the CUDA
        context and the library workspaces."""
        return self.memory_bytes - self.cuda_context_bytes - self.workspace_bytes

    @property
    def memory_bandwidth_bytes_per_s(self) -> float:
        return self.memory_bandwidth_gb_per_s * 1e9

    def peak_flops_per_s(self, dtype: Dtype) -> float:
        """Dense datasheet peak FLOP/s of one GPU for 'fp32', 'tf32', 'bf16' or 'fp16'."""
        if dtype not in DenseTflops.model_fields:
            raise ValueError(f"dtype must be one of {', '.join(DenseTflops.model_fields)}, got {dtype!r}")
        return getattr(self.dense_tflops, dtype) * 1e12

    def rates(self, dtype: Dtype):
        """The time engine's view of one GPU for matmuls in ``dtype`` (None without ``time``)."""
        from vitcost.timing import Rates

        t = self.time
        if t is None:
            return None
        link = self.allreduce_bus_gb_per_s or self.interconnect.gb_per_s_per_direction
        return Rates(
            matmul_flops_per_s=self.peak_flops_per_s(dtype), matmul_efficiency=self.matmul_efficiency,
            attention_efficiency=(t.attention_efficiency_low if dtype in ("bf16", "fp16") and t.attention_efficiency_low
                                  else t.attention_efficiency),
            memory_bytes_per_s=self.memory_bandwidth_bytes_per_s * t.memory_bandwidth_efficiency,
            kernel_seconds=t.kernel_overhead_us * 1e-6, host_seconds=t.host_overhead_us * 1e-6,
            compute_units=t.compute_units, tile=t.matmul_tile, attention_tile=t.attention_tile,
            asynchronous=self.device == "cuda", gpus=self.gpus, allreduce_bytes_per_s=link * 1e9,
            pointwise_elems_per_s=dict(t.pointwise_elements_per_s))

    def achievable_flops_per_s(self, dtype: Dtype) -> float:
        """Peak FLOP/s times ``matmul_efficiency``: what large matmuls reach in practice."""
        return self.peak_flops_per_s(dtype) * self.matmul_efficiency


@dataclass(frozen=True)
class ResolvedProfile:
    """A loaded profile and how it was asked for (``requested`` may be an alias or a path)."""

    profile: GPUProfile
    requested: str
    canonical: str
    path: Path

    @property
    def label(self) -> str:
        """``'a100 -> a100-80gb'`` when reached through an alias, else the canonical name."""
        if _is_path(self.requested) or _normalize(self.requested) == self.canonical:
            return self.canonical
        return f"{self.requested} -> {self.canonical}"


def load_profile(name_or_path: str) -> ResolvedProfile:
    """Load a shipped profile by name or alias (case-insensitive), or a ``.yaml``/``.yml`` file."""
    if _is_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not os.path.lexists(path):
            raise ProfileError(f"profile file not found: {name_or_path}")
        text = read_text(path, ProfileError, f"profile {name_or_path}: ")
        profile = _parse(text, name=path.stem, where=name_or_path)
        return ResolvedProfile(profile, name_or_path, profile.name, path)

    catalog = _catalog()
    key = _normalize(name_or_path)
    canonical = catalog.aliases.get(key, key)
    if canonical not in catalog.profiles:
        close = difflib.get_close_matches(key, [*catalog.profiles, *catalog.aliases], n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(f"unknown GPU profile {name_or_path!r}{hint} (see 'vitcost gpus')")
    return ResolvedProfile(catalog.profiles[canonical], name_or_path, canonical, catalog.paths[canonical])


def list_profiles() -> list[GPUProfile]:
    """Every shipped profile, sorted by name."""
    profiles = _catalog().profiles
    return [profiles[name] for name in sorted(profiles)]


def _is_path(text: str) -> bool:
    return text.lower().endswith(_SUFFIXES) or "/" in text or "\\" in text


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


class _Catalog(NamedTuple):
    profiles: dict[str, GPUProfile]  # canonical name -> profile
    paths: dict[str, Path]  # canonical name -> file
    aliases: dict[str, str]  # normalized alias -> canonical name


def _profiles_dir() -> Traversable:
    """The shipped profiles: the installed package, or ``hardware_profiles/`` in a checkout."""
    try:
        return resources.files("vitcost.hardware_profiles")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "hardware_profiles"


@lru_cache(maxsize=None)
def _catalog() -> _Catalog:
    """Read and validate every shipped profile, once, on first use."""
    entries = sorted(
        (e for e in _profiles_dir().iterdir() if e.is_file() and e.name.lower().endswith(_SUFFIXES)),
        key=lambda e: e.name,
    )
    profiles: dict[str, GPUProfile] = {}
    paths: dict[str, Path] = {}
    for entry in entries:
        name = _normalize(entry.name.rsplit(".", 1)[0])
        profiles[name] = _parse(entry.read_text(encoding="utf-8"), name=name, where=entry.name)
        paths[name] = Path(str(entry))
    aliases: dict[str, str] = {}
    for name, profile in profiles.items():
        for alias in map(_normalize, profile.aliases):
            owner = aliases.get(alias) or (alias if alias in profiles and alias != name else None)
            if owner:
                raise ProfileError(f"profile {paths[name].name}: alias {alias!r} already names {owner!r}")
            if alias != name:
                aliases[alias] = name
    return _Catalog(profiles, paths, aliases)


def _parse(text: str, *, name: str, where: str) -> GPUProfile:
    """Validate one profile's YAML; ``where`` names the file in error messages."""
    data = load_yaml(text, f"profile {where}", ProfileError)
    if not isinstance(data, dict):
        raise ProfileError(f"profile {where}: expected a mapping of keys, got {type(data).__name__}")
    if "name" in data:
        raise ProfileError(f"profile {where}: unknown key 'name' (a profile is named by its file name)")
    if "allocator_reserve_fraction" in data:
        raise ProfileError(f"profile {where}: key 'allocator_reserve_fraction' is no longer read: the caching "
                           "allocator is modelled; give 'library_workspace_mib' and 'overheads_source' instead")
    try:
        return GPUProfile(name=name, **{str(k): v for k, v in data.items()})
    except ValidationError as err:
        raise ProfileError(f"profile {where}: {_one_line(err)}") from None


_SUBMODELS: dict[str, type[BaseModel]] = {
    "dense_tflops": DenseTflops,
    "interconnect": Interconnect,
    "node_interconnect": Interconnect,
    "time": TimeFigures,
}


def _one_line(err: ValidationError) -> str:
    """The first error as "missing key 'x'", "unknown key 'x'" or "x.y: message"."""
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")  # a typo first
    first = errors[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if first["type"] == "missing":
        return f"missing key {key!r}{more}"
    if first["type"] == "extra_forbidden":
        model = _SUBMODELS.get(loc[0], GPUProfile) if len(loc) > 1 else GPUProfile
        known = [k for k in model.model_fields if k != "name"]
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key {key!r}{hint}{more}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{key}: {msg}{more}" if key else f"{msg}{more}"
