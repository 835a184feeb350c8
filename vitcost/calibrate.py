"""Hold every predicted figure against the one PyTorch gives: ``vitcost calibrate``.

For each configuration, the prediction (:func:`vitcost.api.plan`, under the rules of the
device that runs it) is set beside what torch says:

* on the CPU, one steady-state step measured by MemTracker: bytes live at the peak by
  category (weights, gradients, optimizer states, activations, temporaries), the peak
  itself, and what is live at the end of the forward pass;
* on CUDA, the caching allocator's counters: the weights, what stays allocated between
  steps, ``max_memory_allocated``; the reserved peak and the memory no counter sees
  (the CUDA context) are recorded, and ``save=True`` keeps them for ``plan``;
* with ``meta=True``, the same CPU step on fake tensors: *traced*, not measured (nothing
  is allocated or computed), so a configuration far too large for the machine is checked;
* everywhere, parameters and MACs per image against ``numel()`` and FlopCounterMode on the
  meta device.

A figure is within tolerance when ``|predicted - measured| <= tolerance * measured``. An
out-of-memory during the step is a result, not an error. torch is imported only when a
calibration runs (:mod:`vitcost.measure`); this module imports without it.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import product
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from vitcost.errors import ConfigError, MeasurementError
from vitcost.estimate import Report

SCHEMA_VERSION = 1
DEFAULT_TOLERANCE = 0.02

# Status of one configuration.
OK, OFF, OOM, NOT_RUN = "ok", "off", "out of memory", "not run"

Progress = Callable[[int, int, str], None]  # (done, total, what is running now)


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One predicted figure beside the one torch gives (``measured`` None: torch gave none)."""

    key: str  # the JSON key, with its unit: peak_bytes, forward_macs_per_image...
    name: str  # for people: "peak", "forward MACs per image"
    unit: str  # "bytes", "MACs" or "parameters"
    predicted: int
    measured: Optional[int]

    @property
    def difference(self) -> Optional[int]:
        return None if self.measured is None else self.predicted - self.measured

    @property
    def error(self) -> Optional[float]:
        """(predicted - measured) / measured; None when torch measured 0 and we did not."""
        if self.measured is None:
            return None
        if self.measured == 0:
            return 0.0 if self.predicted == 0 else None
        return (self.predicted - self.measured) / self.measured

    def within(self, tolerance: float) -> bool:
        if self.measured is None:
            return True  # nothing to hold it against
        err = self.error
        return err is not None and abs(err) <= tolerance

    def to_dict(self, tolerance: float) -> dict[str, Any]:
        err = self.error
        return {
            "key": self.key,
            "figure": self.name,
            "unit": self.unit,
            "predicted": self.predicted,
            "measured": self.measured,
            "difference": self.difference,
            "error_percent": None if err is None else 100 * err,
            "within_tolerance": self.within(tolerance),
        }


@dataclass(frozen=True)
class Calibration:
    """One configuration: the prediction, what torch gave, and how far apart they are."""

    report: Report
    name: str  # the model: a preset's name, or the factory's (timm:create_model(vit_base_patch16_224))
    method: str  # "measured" (a real step) or "traced" (fake tensors)
    device: str  # "cpu" or "cuda"
    model_source: str  # "reference" or "factory module:callable"
    figures: tuple[Figure, ...]
    tolerance: float
    status: str  # ok, off, out of memory, not run
    message: str = ""
    seconds: float = 0.0
    cuda: Optional[dict[str, Any]] = None
    warnings: tuple[str, ...] = ()
    time: Optional[dict[str, Any]] = None  # predicted vs measured step seconds, where the profile prices this device

    @property
    def label(self) -> str:
        s, w = self.report.spec, self.report.workload
        size = f"{s.image_h}" if s.image_h == s.image_w else f"{s.image_h}x{s.image_w}"
        return f"{self.name} {size}px/{s.patch} batch {w.batch}"

    @property
    def failures(self) -> list[Figure]:
        return [f for f in self.figures if not f.within(self.tolerance)]

    @property
    def worst(self) -> Optional[Figure]:
        """The figure furthest from torch's (an undefined error counts as the furthest)."""
        compared = [f for f in self.figures if f.measured is not None]
        if not compared:
            return None
        return max(compared, key=lambda f: float("inf") if f.error is None else abs(f.error))

    def figure(self, key: str) -> Figure:
        """The figure of that JSON key (``peak_bytes``, ``activations_at_peak_bytes``...)."""
        for f in self.figures:
            if f.key == key:
                return f
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst
        return {
            "inputs": {**self.report.to_dict()["inputs"], "model": self.name},
            "tokens": self.report.spec.tokens,
            "model_source": self.model_source,
            "method": self.method,
            "device": self.device,
            "status": self.status,
            "message": self.message,
            "seconds": round(self.seconds, 3),
            "predicted": {"peak_bytes": self.report.memory.peak, **{f.key: f.predicted for f in self.figures}},
            # None when the step did not run (out of memory, or not tried)
            "measured": ({f.key: f.measured for f in self.figures if f.measured is not None}
                         if self.status in (OK, OFF) else None),
            "figures": [f.to_dict(self.tolerance) for f in self.figures],
            "worst": None if worst is None else worst.to_dict(self.tolerance),
            "cuda": self.cuda,
            "time": self.time,
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class CalibrationRun:
    """Every configuration of one ``calibrate`` call (one, or a sweep's combinations)."""

    results: tuple[Calibration, ...]
    tolerance: float
    seconds: float
    saved_to: Optional[Path] = None

    @property
    def ok(self) -> bool:
        """Every figure that torch gave is within the tolerance (out-of-memory rows aside)."""
        return all(not r.failures for r in self.results)

    @property
    def worst(self) -> Optional[tuple[Calibration, Figure]]:
        pairs = [(r, r.worst) for r in self.results if r.worst is not None]
        if not pairs:
            return None
        return max(pairs, key=lambda p: float("inf") if p[1].error is None else abs(p[1].error))

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst
        return {
            "schema_version": SCHEMA_VERSION,
            "tolerance_percent": 100 * self.tolerance,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "worst": None if worst is None else {"configuration": worst[0].label,
                                                 **worst[1].to_dict(self.tolerance)},
            "saved_calibration": str(self.saved_to) if self.saved_to else None,
            "rows": [r.to_dict() for r in self.results],
        }


# --- torch, the device, the user's model ------------------------------------------------------


def _measure():
    """vitcost.measure, or a one-line error naming the extra when torch is missing."""
    try:
        from vitcost import measure
    except ImportError:  # pragma: no cover - measure raises MeasurementError itself
        raise MeasurementError("calibrate needs PyTorch: pip install torch==2.13.0") from None
    return measure


def resolve_device(device: str = "auto", meta: bool = False) -> str:
    """``auto``: CUDA when torch sees a GPU, else the CPU. ``meta`` traces by the CPU rules."""
    measure = _measure()
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda")
    if meta:
        if device == "cuda":
            raise ConfigError("--meta traces on fake CPU tensors, by the CPU rules: drop --device cuda")
        return "cpu"
    if device == "auto":
        return "cuda" if measure.cuda_available() else "cpu"
    if device == "cuda" and not measure.cuda_available():
        build = " (a CPU-only build)" if "+cpu" in measure.torch_version() else ""
        raise MeasurementError(f"--device cuda: torch {measure.torch_version()}{build} sees no CUDA device; "
                               "use --device cpu")
    return device


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_factory(target: str) -> Callable[..., Any]:
    """``module:callable`` (``pkg.mod:make_vit``, ``timm:create_model``), importable from the
    current directory too."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise MeasurementError(f"--model-factory {target!r}: expected module:callable, e.g. timm:create_model")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's module is reported
        raise MeasurementError(f"--model-factory {target!r}: cannot import {module_name!r} ({_one_line(exc)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise MeasurementError(f"--model-factory {target!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise MeasurementError(f"--model-factory {target!r}: {attr!r} is not callable")
    return obj


def parse_factory_kwargs(text: Union[str, dict, None]) -> dict[str, Any]:
    if text is None:
        return {}
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--factory-kwargs: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--factory-kwargs: expected a JSON object like '{{\"model_name\": \"vit_base_patch16_224\"}}', "
                          f"got {type(value).__name__}")
    return value


def _call_factory(fn: Callable[..., Any], kwargs: dict[str, Any], target: str, on_meta: bool = False):
    measure = _measure()
    try:
        model = measure.on_meta(lambda: fn(**kwargs)) if on_meta else fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's code
        where = " on the meta device (--meta)" if on_meta else ""
        raise MeasurementError(f"--model-factory {target!r}: calling it{where} failed ({_one_line(exc)})") from None
    import torch

    if not isinstance(model, torch.nn.Module):
        raise MeasurementError(f"--model-factory {target!r}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _pair(value: Any) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        return None
    return h, w


def read_architecture(model: Any) -> tuple[dict[str, Any], str]:
    """Architecture fields a model's attributes give, and which convention they followed.

    vitcost's reference model (``.spec``); timm's ``VisionTransformer`` (``patch_embed``,
    ``embed_dim``, ``blocks[0].attn.num_heads``, ``num_prefix_tokens``, ``head``...);
    Hugging Face's ViT (``config.hidden_size``, ``num_hidden_layers``...). Keys are
    :func:`vitcost.api.plan`'s model options plus ``image`` (h, w) and ``patch``.
    """
    spec = getattr(model, "spec", None)
    if spec is not None and hasattr(spec, "dim") and hasattr(spec, "patch"):
        fields = {k: getattr(spec, k) for k in ("dim", "depth", "heads", "mlp_hidden", "channels", "class_token",
                                                 "dist_token", "registers", "pos_embed_prefix", "classes",
                                                 "qkv_bias", "layer_scale", "patch")}
        fields["pos_embed"] = spec.pos_embed.value
        fields["pooling"] = spec.pooling.value
        fields["image"] = (spec.image_h, spec.image_w)
        return fields, "vitcost reference (.spec)"
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "hidden_size") and hasattr(config, "num_hidden_layers"):
        return _read_hf(model, config), "Hugging Face (config)"
    if hasattr(model, "patch_embed") and hasattr(model, "blocks"):
        return _read_timm(model), "timm attributes"
    return {}, "none"


def _read_hf(model: Any, config: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, attr in (("dim", "hidden_size"), ("depth", "num_hidden_layers"), ("heads", "num_attention_heads"),
                      ("mlp_hidden", "intermediate_size"), ("channels", "num_channels"), ("qkv_bias", "qkv_bias")):
        value = getattr(config, attr, None)
        if value is not None:
            out[key] = value
    patch = _pair(getattr(config, "patch_size", None))
    if patch:
        out["patch"] = patch[0]
    image = _pair(getattr(config, "image_size", None))
    if image:
        out["image"] = image
    out["class_token"] = True
    out["pooling"] = "token"
    classifier = getattr(model, "classifier", None)
    out["classes"] = getattr(classifier, "out_features", 0) if classifier is not None else 0
    return out


def _read_timm(model: Any) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    pe = model.patch_embed
    proj = getattr(pe, "proj", None)
    patch = _pair(getattr(pe, "patch_size", None)) or _pair(getattr(proj, "kernel_size", None))
    if patch:
        out["patch"] = patch[0]
    image = _pair(getattr(pe, "img_size", None))
    if image:
        out["image"] = image
    if getattr(proj, "in_channels", None):
        out["channels"] = proj.in_channels
    dim = getattr(model, "embed_dim", None) or getattr(proj, "out_channels", None)
    if dim:
        out["dim"] = dim
    blocks = model.blocks
    out["depth"] = len(blocks)
    if len(blocks):
        attn = getattr(blocks[0], "attn", None)
        heads = getattr(attn, "num_heads", None) or getattr(attn, "heads", None)
        if heads:
            out["heads"] = heads
        qkv = getattr(attn, "qkv", None)
        if isinstance(qkv, torch.nn.Linear):
            out["qkv_bias"] = qkv.bias is not None
        fc1 = getattr(getattr(blocks[0], "mlp", None), "fc1", None)
        if isinstance(fc1, torch.nn.Linear):
            out["mlp_hidden"] = fc1.out_features
        ls1 = getattr(blocks[0], "ls1", None)
        if ls1 is not None:  # timm's LayerScale (init_values), or Identity
            out["layer_scale"] = isinstance(getattr(ls1, "gamma", None), torch.nn.Parameter)
    out["class_token"] = getattr(model, "cls_token", None) is not None
    out["dist_token"] = getattr(model, "dist_token", None) is not None
    reg = getattr(model, "reg_token", None)
    out["registers"] = int(reg.shape[1]) if reg is not None else 0
    pos = getattr(model, "pos_embed", None)
    out["pos_embed"] = "learned" if isinstance(pos, torch.nn.Parameter) else ("none" if pos is None else "sincos")
    if hasattr(model, "no_embed_class"):
        out["pos_embed_prefix"] = not model.no_embed_class
    pool = getattr(model, "global_pool", None)
    if pool in ("avg", "token"):
        out["pooling"] = pool
    head = getattr(model, "head", None)
    out["classes"] = head.out_features if isinstance(head, torch.nn.Linear) else 0
    return out


def _available_ram() -> Optional[int]:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# --- one configuration -----------------------------------------------------------------------


def _cpu_figures(report: Report, mm: Any) -> list[Figure]:
    m = report.memory
    measured_at_peak = {
        "weights": mm.weights_bytes,
        "gradients": mm.gradients_bytes,
        "optimizer": mm.optimizer_bytes,
        "activations": mm.activations_bytes,
        "temporaries": mm.temporaries_bytes,
    }
    names = {"weights": "weights", "gradients": "gradients", "optimizer": "optimizer states",
             "activations": "activations", "temporaries": "temporaries"}
    figures = [Figure(f"{k}_at_peak_bytes", f"{names[k]} at peak", "bytes", m.at_peak[k], measured_at_peak[k])
               for k in names]
    end_of_forward = ("saved + inputs" if report.workload.training else "inputs")
    figures.append(Figure("end_of_forward_bytes", f"end of forward ({end_of_forward})", "bytes",
                          m.activations + m.inputs + m.autocast_copies,
                          mm.saved_after_forward_bytes - mm.output_bytes))
    figures.append(Figure("peak_bytes", "peak", "bytes", m.peak, mm.peak_bytes))
    return figures


def _cuda_figures(report: Report, mm: Any) -> list[Figure]:
    from vitcost.fit import allocator_stats

    m = report.memory
    between = m.weights + m.optimizer_states + (m.gradients if report.workload.keep_grads else 0)
    return [
        Figure("weights_bytes", "weights", "bytes", m.weights, mm.weights_bytes),
        Figure("between_steps_bytes", "allocated between steps", "bytes", between,
               mm.extra["allocated_at_step_start"]),
        Figure("peak_bytes", "peak (max_memory_allocated)", "bytes", m.peak, mm.peak_bytes),
        # the caching allocator model over a first and steady steps, with memory to spare
        Figure("peak_reserved_bytes", "peak (max_memory_reserved)", "bytes",
               allocator_stats(report.spec, report.workload).peak_reserved,
               mm.extra["max_memory_reserved"] - mm.extra.get("reserved_at_start", 0)),
    ]


def _cuda_info(mm: Any) -> dict[str, Any]:
    e = mm.extra
    allocated = e["max_memory_allocated"]
    return {
        "device_name": e["device_name"],
        "total_bytes": e["total_bytes"],
        "max_memory_allocated_bytes": allocated,
        "max_memory_reserved_bytes": e["max_memory_reserved"],
        "reserved_over_allocated": e["max_memory_reserved"] / allocated if allocated else 1.0,
        "non_allocator_bytes": e["non_allocator_bytes"],
    }


def _arch_for(model_obj: Any, explicit: dict[str, Any], image: Any, patch: Optional[int],
              target: str) -> tuple[dict[str, Any], Any, Optional[int], str]:
    """Architecture of a factory's model: what its attributes say, under the explicit flags."""
    read, how = read_architecture(model_obj)
    if explicit.get("mlp_ratio") is not None or explicit.get("mlp_hidden") is not None:
        read.pop("mlp_hidden", None)
    read_image = read.pop("image", None)
    read_patch = read.pop("patch", None)
    arch = {**read, **{k: v for k, v in explicit.items() if v is not None}}
    if image is None and read_image is not None:
        image = tuple(read_image)
    if patch is None:
        patch = read_patch
    if not {"dim", "depth", "heads"} <= arch.keys():
        missing = ", ".join("--" + k for k in ("dim", "depth", "heads") if k not in arch)
        raise MeasurementError(f"--model-factory {target!r}: could not read the architecture of "
                               f"{type(model_obj).__name__} from its attributes; pass {missing} "
                               "(and --patch, --image, --mlp-hidden)")
    return arch, image, patch, how


def _calibrate_one(model: Optional[str], image: Any, patch: Optional[int], batch: int, *, device: str,
                   steps: Optional[int], meta: bool, factory: Optional[tuple[str, Callable, dict]],
                   tolerance: float, options: dict[str, Any], arch: dict[str, Any],
                   note: Callable[[str], None]) -> Calibration:
    from vitcost.api import plan

    measure = _measure()
    start = time.perf_counter()
    source = "reference"
    name = None
    warnings: list[str] = []
    make_model: Optional[Callable[[bool], Any]] = None
    if factory is not None:
        target, fn, kwargs = factory
        note("building the model")
        first = _call_factory(fn, kwargs, target, on_meta=True) if meta else _call_factory(fn, kwargs, target)
        arch, image, patch, how = _arch_for(first, arch, image, patch, target)
        source = f"factory {target}"
        named = kwargs.get("model_name") or kwargs.get("pretrained_model_name_or_path")
        name = f"{target}({named})" if isinstance(named, str) else target
        warnings.append(f"architecture read from the model ({how}); explicit flags override it")
        pending = [first]

        def make_model(on_meta: bool):
            if pending and (meta or not on_meta):
                return pending.pop()
            return _call_factory(fn, kwargs, target, on_meta=on_meta)

    report = plan(model, image=image, patch=patch, batch=batch, device=device, **options, **arch)
    spec, wl = report.spec, report.workload
    warnings.extend(report.warnings)
    method = "traced" if meta else "measured"

    def result(figures: list[Figure], status: str, message: str = "", cuda: Optional[dict] = None,
               timed: Optional[dict] = None) -> Calibration:
        return Calibration(report=report, name=name or spec.name, method=method, device=device, model_source=source,
                           figures=tuple(figures), tolerance=tolerance, status=status, message=message,
                           seconds=time.perf_counter() - start, cuda=cuda, warnings=tuple(warnings), time=timed)

    # parameters and MACs: FlopCounterMode on the meta device, batch 1
    note("counting MACs (FlopCounterMode)")
    if make_model is None:
        counted_model = measure.build_meta(spec, wl)
    else:
        try:
            counted_model = make_model(True)
        except MeasurementError:
            if meta:
                raise
            counted_model = make_model(False).to("meta")  # a factory that cannot build on meta
    try:
        counts = measure.count_macs(counted_model, spec, training=wl.training)
    except MeasurementError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model, or a shape it does not take
        what = f"--model-factory {factory[0]!r}" if factory else "the reference model"
        raise MeasurementError(f"{what}: counting FLOPs failed on {spec.image_h}x{spec.image_w} images "
                               f"({_one_line(exc)})") from None
    del counted_model
    figures = [
        Figure("parameters", "parameters", "parameters", report.params_total, counts.params),
        Figure("forward_macs_per_image", "forward MACs per image", "MACs", report.macs_forward_per_image,
               counts.forward_macs),
    ]
    if wl.training:
        figures.append(Figure("training_macs_per_image", "training MACs per image", "MACs",
                              report.macs_training_per_image,
                              counts.training_macs))

    if wl.ranks > 1:
        return _calibrate_ranks(report, figures, result, note, steps, tolerance)
    if not meta and device == "cpu":
        available = _available_ram()
        if available is not None and report.memory.peak > 0.9 * available:
            gib = 2**30
            return result(figures, NOT_RUN,
                          f"not run: the predicted peak ({report.memory.peak / gib:.1f} GiB) is more than the "
                          f"{available / gib:.1f} GiB this machine has free; --meta traces it without memory")

    note("tracing a step on fake tensors" if meta else f"running {'a training step' if wl.training else 'a forward'}"
         f" on {device} (warm-up, then measured)")
    user_model = make_model(meta) if make_model is not None else None
    warmup = steps if steps is not None else (2 if device == "cuda" else 1)
    try:
        if device == "cuda":
            mm = measure.measure_cuda(spec, wl, warmup=warmup, model=user_model)
        else:
            mm = measure.measure_cpu(spec, wl, warmup=warmup, model=user_model, fake=meta)
    except MeasurementError:
        raise
    except Exception as exc:  # noqa: BLE001 - sorted below: out of memory is a result
        del user_model
        _release(device)
        if measure.is_out_of_memory(exc):
            return result(figures, OOM, f"does not fit: out of memory at batch {wl.batch}")
        what = f"--model-factory {factory[0]!r}" if factory else "the reference model"
        raise MeasurementError(f"{what}: the {'traced' if meta else 'measured'} step failed ({_one_line(exc)})") from None
    del user_model
    _release(device)
    if device == "cuda":
        figures += _cuda_figures(report, mm)
        cuda = _cuda_info(mm)
    else:
        figures += _cpu_figures(report, mm)
        cuda = None
    timed = None
    if report.time is not None and report.time.device == device:
        # timed apart from the memory run: nothing observes these steps
        note(f"timing {TIME_REPEATS} steps")
        secs = measure.time_steps(spec, wl, device, warmup=warmup, repeats=TIME_REPEATS,
                                  model=make_model(False) if make_model is not None else None)
        _release(device)
        timed = time_figures(report.time.step_seconds, secs)
    bad = [f for f in figures if not f.within(tolerance)]
    return result(figures, OFF if bad else OK, cuda=cuda, timed=timed)


def _calibrate_ranks(report: Report, figures: list[Figure], result: Callable[..., Calibration],
                     note: Callable[[str], None], steps: Optional[int], tolerance: float) -> Calibration:
    """Every rank's peak (MemTracker in each of ``ranks`` gloo processes) against its prediction."""
    from vitcost.measure_distributed import measure_ranks

    wl = report.workload
    ranks = wl.ranks
    predicted = report.rank_peaks_bytes
    available = _available_ram()
    if available is not None and sum(predicted) > 0.9 * available:
        return result(figures, NOT_RUN, f"not run: {ranks} ranks' predicted peaks ({sum(predicted) / 2**30:.1f} GiB) "
                                        f"are more than the {available / 2**30:.1f} GiB this machine has free")
    note(f"running {ranks} processes ({wl.strategy.value}, gloo)")
    measured = measure_ranks(report.spec, wl, warmup=steps if steps is not None else 2)
    figures = figures + [Figure(f"rank{r}_peak_bytes", f"peak, rank {r}", "bytes", predicted[r], m["peak_bytes"])
                         for r, m in enumerate(measured)]
    bad = [f for f in figures if not f.within(tolerance)]
    return result(figures, OFF if bad else OK)


TIME_REPEATS = 3  # steps timed per configuration: the machine may be shared, so min and median are kept


def time_figures(predicted: float, measured: list[float]) -> dict[str, Any]:
    """Predicted against measured step seconds: each run, their min and median, and the
    prediction's error against each (a time is not held to the memory tolerance)."""
    low, mid = min(measured), statistics.median(measured)
    return {"predicted_seconds": predicted, "measured_seconds": measured, "min_seconds": low,
            "median_seconds": mid, "error_vs_min": predicted / low - 1, "error_vs_median": predicted / mid - 1}


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# --- the public function ---------------------------------------------------------------------


def _values(value: Any) -> list[Any]:
    if value is None:
        return [None]
    if isinstance(value, (list, tuple)) and not (isinstance(value, tuple) and len(value) == 2
                                                 and all(isinstance(v, int) for v in value)):
        return list(value) or [None]
    if isinstance(value, str) and "," in value:
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


def calibrate(
    model: Optional[str] = None,
    *,
    image: Union[Any, Iterable[Any]] = None,
    patch: Union[int, Iterable[int], None] = None,
    batch: Union[int, Iterable[int]] = 8,
    device: str = "auto",
    steps: Optional[int] = None,
    meta: bool = False,
    model_factory: Optional[str] = None,
    factory_kwargs: Union[str, dict, None] = None,
    tolerance: float = DEFAULT_TOLERANCE,
    save: bool = False,
    progress: Optional[Progress] = None,
    mode: str = "train",
    precision: str = "amp-bf16",
    attention: str = "sdpa",
    optimizer: str = "adamw",
    keep_grads: bool = False,
    checkpointing: str = "none",
    gpu: Optional[str] = None,
    strict: bool = False,
    nproc: int = 1,
    strategy: str = "ddp",
    gpus: Optional[int] = None,
    **arch: Any,
) -> CalibrationRun:
    """Run each configuration in torch and hold every predicted figure against torch's.

    ``image``, ``patch`` and ``batch`` may be lists: every combination is run (images
    outer, batches inner). ``device``: ``auto`` (CUDA when available), ``cpu`` or ``cuda``;
    the prediction follows that device's rules. ``steps``: warm-up steps before the
    measured one (default 1 on the CPU, 2 on CUDA). ``meta``: trace on fake tensors instead
    of running. ``model_factory``: ``module:callable`` building the model to measure instead
    of the reference ViT, called with ``factory_kwargs`` (a dict or a JSON object).
    ``tolerance`` is a fraction (0.02 = 2%). ``save`` (CUDA, with ``gpu``) records the GPU's
    context size and allocator overhead for ``plan``. ``progress(done, total, doing)`` is
    called as the work goes. ``nproc`` > 1: the step runs in so many processes under
    torch.distributed (gloo, on the CPU) with ``strategy``, each rank's peak against its
    prediction; ``batch`` is then the global batch, as for ``plan``.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or not 1 <= nproc <= 64:
        raise ConfigError(f"--nproc {nproc}: from 1 to 64 processes")
    if gpus is not None and gpus != nproc:
        raise ConfigError(f"--gpus {gpus} with --nproc {nproc}: calibrate runs one process per GPU; give --nproc alone")
    if nproc > 1 and (meta or model_factory or save or device == "cuda"):
        what = "--meta" if meta else "--model-factory" if model_factory else "--save" if save else "--device cuda"
        raise ConfigError(f"--nproc {nproc} runs torch.distributed on the CPU (gloo): not with {what}")
    if nproc == 1 and strategy != "ddp":
        raise ConfigError(f"--strategy {strategy} shards over several processes: give --nproc N (N > 1)")
    if tolerance < 0:
        raise ConfigError(f"--tolerance {tolerance}: must be 0 or more")
    if steps is not None and steps < 0:
        raise ConfigError(f"--steps {steps}: must be 0 or more")
    if save and not gpu:
        raise ConfigError("--save keys the calibration by GPU profile: add --gpu PROFILE (see 'vitcost gpus')")
    resolved_gpu = None
    if save:
        from vitcost.profiles import load_profile

        resolved_gpu = load_profile(gpu)  # an unknown profile fails before anything runs
    where = resolve_device(device, meta)
    if save and (meta or where != "cuda"):
        raise MeasurementError("--save records what only a GPU can tell (CUDA context, allocator overhead): "
                               "it needs a CUDA run, not " + ("--meta" if meta else "the CPU"))
    factory = None
    if model_factory:
        factory = (model_factory, load_factory(model_factory), parse_factory_kwargs(factory_kwargs))
    elif factory_kwargs:
        raise ConfigError("--factory-kwargs needs --model-factory")

    combos = list(product(_values(image), _values(patch), _values(batch)))
    options = dict(mode=mode, precision=precision, attention=attention, optimizer=optimizer,
                   keep_grads=keep_grads, checkpointing=checkpointing, gpu=gpu, strict=strict)
    if nproc > 1:
        where = "cpu"
        options.update(strategy=strategy, gpus=nproc)
    start = time.perf_counter()
    results: list[Calibration] = []
    for i, (img, p, b) in enumerate(combos):
        label = _combo_label(model, img, p, b)

        def note(doing: str, i: int = i, label: str = label) -> None:
            if progress:
                progress(i, len(combos), f"{label}: {doing}")

        note("starting")
        results.append(_calibrate_one(model, img, int(p) if p is not None else None, int(b), device=where,
                                      steps=steps, meta=meta, factory=factory, tolerance=tolerance,
                                      options=options, arch=dict(arch), note=note))
        if progress:
            progress(i + 1, len(combos), f"{label}: {results[-1].status}")
    saved = None
    if save:
        saved = save_gpu_calibration(results, resolved_gpu.canonical)
    return CalibrationRun(results=tuple(results), tolerance=tolerance, seconds=time.perf_counter() - start,
                          saved_to=saved)


def _combo_label(model: Optional[str], image: Any, patch: Any, batch: Any) -> str:
    parts = [model or "model"]
    if image is not None:
        parts.append(f"{image if not isinstance(image, tuple) else 'x'.join(map(str, image))}px")
    if patch is not None:
        parts.append(f"patch {patch}")
    parts.append(f"batch {batch}")
    return " ".join(parts)


def _time_ratio(results: list[Calibration]) -> dict[str, float]:
    """The median of measured (median) over predicted step seconds, for ``plan`` to scale its
    prices by; nothing when no step was timed."""
    ratios = [r.time["median_seconds"] / r.time["predicted_seconds"] for r in results if r.time]
    return {"step_time_ratio": statistics.median(ratios), "step_time_rows": len(ratios)} if ratios else {}


def save_gpu_calibration(results: Iterable[Calibration], profile: str) -> Path:
    """Keep, for ``profile``, what the CUDA run with the largest peak told: the context's
    size, the reserved/allocated ratio, the device's memory (``vitcost.calibration_store``)."""
    from vitcost.calibration_store import save_calibration

    measured = [r for r in results if r.cuda is not None]
    if not measured:
        raise MeasurementError("--save: no configuration was measured on CUDA (all out of memory?)")
    best = max(measured, key=lambda r: r.cuda["max_memory_allocated_bytes"])
    info = best.cuda
    entry = {
        "device_name": info["device_name"],
        "total_bytes": info["total_bytes"],
        "cuda_context_bytes": info["non_allocator_bytes"],
        "reserved_over_allocated": info["reserved_over_allocated"],
        "measured_on": best.label,
        **_time_ratio(measured),
        "torch_version": _measure().torch_version(),
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return save_calibration(profile, entry)
