"""What PyTorch's CUDA caching allocator really does, against vitcost's prediction.

One prepared GPU check. For a fixed grid of reference-ViT configurations (ViT-S/B/L presets,
224 and 384 px, patch 16, eager and sdpa attention, training and inference, amp-bf16 and
amp-fp16, AdamW: 48 configurations; then three rows, amp-bf16 at 224 px, of each of three
Hugging Face models, ViT-B, DINOv2-B with registers and VideoMAE-S, whose CUDA rules are
derived, VideoMAE's fp32 LayerNorm on a bf16 stream among them: ``--hf`` picks them) each
configuration is a fresh model on the GPU, and the script measures:

* the reserved peak vitcost predicts (``memory_bytes.peak_reserved``): the caching allocator's
  ``max_memory_reserved`` over exactly three steps from a fresh start (peak stats reset, model
  and optimizer built, the first step creating the optimizer state, then two steady steps);
* ``max_memory_allocated`` and ``max_memory_reserved`` over steady-state steps (after those
  three: one more warm-up step, then the timed steps), against ``memory_bytes.peak``;
* the step time: the median of the timed steps, each bracketed by ``torch.cuda.synchronize()``,
  against vitcost's step time (``time.step_seconds``, the time model on the profile);
* once, at the start, the CUDA context: the device's used memory before this process touched
  CUDA (NVML, through nvidia-ml-py or nvidia-smi: ``torch.cuda.mem_get_info()`` itself creates
  the context, so it cannot read "before"), then ``mem_get_info()`` as the first CUDA call;
  then what the libraries keep (cuBLAS workspaces through the allocator, handles outside it)
  after a small warm-up, and what lies outside the allocator at the end; against the profile's
  ``cuda_context_bytes`` and ``library_workspace_bytes``.

Every allocator figure is taken net of what the allocator held before the configuration was
built (the cuBLAS workspaces the warm-up made, which vitcost keeps out of the peak). The step
is the one ``vitcost.measure`` runs (``build_runner``: the reference model, AdamW, autocast, no
GradScaler), fed one batch made once, as vitcost's trace assumes. Between
configurations: ``gc.collect()``, ``torch.cuda.empty_cache()``,
``torch.cuda.reset_peak_memory_stats()``. An out-of-memory configuration is a result, not a
crash. ``--limit-seconds`` (default 480) is a budget: no configuration is started that would
end past it (projected from the slowest one of its model so far), and the report says what was
left out. The report is rewritten after every configuration, so a run cut short still leaves
one.

Run, on a GPU machine (the whole grid is sized for well under 8 minutes on one H200; the run
never starts a configuration past ``--limit-seconds``):

    python benchmarks/cuda_check.py [--out docs/cuda-accuracy.md] [--json rows.json] [--gpu h200]

Anywhere, without CUDA (no torch.cuda needed; every prediction of the grid through
``vitcost.plan``, the measured columns left as "-"):

    python benchmarks/cuda_check.py --dry-run [--out PATH] [--gpu h100]

Without ``--dry-run`` on a machine without CUDA it exits 2 with one line on stderr. Options to
run a part of the grid: ``--models``, ``--images``, ``--attentions``, ``--modes``,
``--precisions`` (comma lists) and ``--batch N`` (every configuration at batch N).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from itertools import product
from pathlib import Path
from typing import Any, Optional

START_SECONDS = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# torch without numpy warns so at import and when models are built: not our concern
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

# --- the grid ----------------------------------------------------------------------------------

BATCH_BY_MODEL = {"vit-s": 32, "vit-b": 32, "vit-l": 16}  # largest predicted peak: ViT-L/16 384 eager, ~24 GiB
# Hugging Face's models (--impl hf), each at 224 px in three rows (sdpa and eager training, sdpa
# inference, amp-bf16): the CUDA rules of their code, derived and never measured, among them
# VideoMAE's fp32 LayerNorm on a bf16 stream and Swin's windowed SDPA with a bias.
HF_MODELS = {
    "hf-vit-b": ("vit-b", {"impl": "hf"}, 32, 16),
    "hf-dinov2-b-reg4": ("vit_base_patch14_reg4_dinov2", {"impl": "hf", "classes": 1000}, 32, 14),
    "hf-videomae-s": ("vit-s", {"impl": "hf", "classes": 400, "frames": 16, "tubelet": 2, "class_token": False,
                                "pos_embed": "sincos", "pooling": "avg"}, 8, 16),
    # Swin-T: the memory-efficient SDPA kernel with a bias, and CUDA autocast's fp32 norms on
    # its bf16 stream (both derived from the sources)
    "hf-swin-t": ("swin-t", {}, 32, 4),
}  # name -> (vitcost model, its options, batch, patch)
HF_ROWS = (("sdpa", "train"), ("eager", "train"), ("sdpa", "infer"))
IMAGES = (224, 384)
PATCH = 16
ATTENTIONS = ("eager", "sdpa")
MODES = ("train", "infer")
PRECISIONS = ("amp-bf16", "amp-fp16")
OPTIMIZER = "adamw"

FRESH_STEPS = 3  # what vitcost's reserved peak covers: the first step, then two steady ones
WARMUP_STEPS = 1  # one more untimed step before the timed ones
TIMED_STEPS = 5
DEFAULT_LIMIT_SECONDS = 480.0
DEFAULT_OUT = ROOT / "docs" / "cuda-accuracy.md"

_AUTOCAST_DTYPE = {"amp-bf16": "bfloat16", "amp-fp16": "float16"}
DEVICE = "cuda"  # the device configurations run on (only a test harness would change it)


@dataclass(frozen=True)
class Config:
    model: str
    image: int
    attention: str
    mode: str
    precision: str
    batch: int
    patch: int = PATCH
    optimizer: str = OPTIMIZER

    @property
    def label(self) -> str:
        return f"{self.model} {self.image}px/{self.patch} {self.attention} {self.mode} {self.precision}"


@dataclass
class Row:
    """One configuration: what vitcost predicts and (unless a dry run) what CUDA measured."""

    config: Config
    predicted_peak_bytes: int
    predicted_peak_reserved_bytes: int
    predicted_step_seconds: float
    status: str = "not run"  # ok | oom | error | not run | dry run
    message: str = ""
    measured: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def measured_value(self, key: str) -> Optional[float]:
        return self.measured.get(key) if self.status == "ok" else None

    def to_dict(self) -> dict[str, Any]:
        d = {"label": self.config.label, **asdict(self.config),
             "predicted_peak_bytes": self.predicted_peak_bytes,
             "predicted_peak_reserved_bytes": self.predicted_peak_reserved_bytes,
             "predicted_step_seconds": self.predicted_step_seconds,
             "status": self.status, "message": self.message, "measured": self.measured or None,
             "seconds": round(self.seconds, 3)}
        d["allocated_peak_error"] = error(self.predicted_peak_bytes, self.measured_value("steady_max_allocated_bytes"))
        d["reserved_peak_error"] = error(self.predicted_peak_reserved_bytes,
                                         self.measured_value("fresh_max_reserved_bytes"))
        d["steady_reserved_error"] = error(self.predicted_peak_reserved_bytes,
                                           self.measured_value("steady_max_reserved_bytes"))
        d["step_time_error"] = error(self.predicted_step_seconds, self.measured_value("step_seconds_median"))
        return d


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def grid(models=tuple(BATCH_BY_MODEL), images=IMAGES, attentions=ATTENTIONS, modes=MODES,
         precisions=PRECISIONS, batch: Optional[int] = None, hf=tuple(HF_MODELS)) -> list[Config]:
    """Every configuration, (model, image) outermost so one CPU source model serves eight;
    then the Hugging Face rows."""
    rows = [Config(m, int(i), a, mode, p, batch or BATCH_BY_MODEL.get(m, 32))
            for m, i, a, mode, p in product(models, images, attentions, modes, precisions)]
    return rows + [Config(name, 224, a, mode, "amp-bf16", batch or HF_MODELS[name][2], patch=HF_MODELS[name][3])
                   for name in hf for a, mode in HF_ROWS]


def model_options(cfg: Config) -> tuple[str, dict[str, Any]]:
    """vitcost's model name and options for a row (a Hugging Face row's come from HF_MODELS)."""
    if cfg.model in HF_MODELS:
        name, options, _, _ = HF_MODELS[cfg.model]
        return name, dict(options)
    return cfg.model, {}


def error(predicted: Optional[float], measured: Optional[float]) -> Optional[float]:
    """(predicted - measured) / measured; None where nothing was measured."""
    if predicted is None or measured is None or measured == 0:
        return None
    return (predicted - measured) / measured


def allocator_kind() -> str:
    """vitcost's allocator model for this process's PYTORCH_CUDA_ALLOC_CONF."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower()
    return "expandable" if "expandable_segments:true" in conf else "native"


def predict(cfg: Config, gpu: str, allocator: str):
    import vitcost

    name, options = model_options(cfg)
    patch = None if cfg.model in HF_MODELS else cfg.patch  # (a Hugging Face row's name fixes its patch)
    return vitcost.plan(name, image=cfg.image, patch=patch, batch=cfg.batch, mode=cfg.mode,
                        precision=cfg.precision, attention=cfg.attention, optimizer=cfg.optimizer,
                        gpu=gpu, device="cuda", allocator=allocator, **options)


def predicted_row(cfg: Config, report) -> Row:
    d = report.to_dict()
    return Row(cfg, predicted_peak_bytes=d["memory_bytes"]["peak"],
               predicted_peak_reserved_bytes=d["memory_bytes"]["peak_reserved"],
               predicted_step_seconds=d["time"]["step_seconds"])


# --- measuring on CUDA ---------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def nvml_used_bytes() -> tuple[Optional[dict[str, tuple[int, int]]], str]:
    """Used and total bytes of every device by UUID, read without touching CUDA (NVML)."""
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            info = pynvml.nvmlDeviceGetMemoryInfo(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            out[uuid.decode() if isinstance(uuid, bytes) else str(uuid)] = (int(info.used), int(info.total))
        return out, "NVML (nvidia-ml-py)"
    except Exception:  # noqa: BLE001 - try the command line next
        pass
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=uuid,memory.used,memory.total",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True,
                              timeout=30, check=True).stdout
        out = {}
        for line in text.strip().splitlines():
            uuid, used, total = (s.strip() for s in line.split(","))
            out[uuid] = (int(used) * 2**20, int(total) * 2**20)  # MiB: 1 MiB resolution
        return (out or None), "nvidia-smi (MiB resolution)"
    except Exception:  # noqa: BLE001 - no NVML at all
        return None, "unavailable"


def _norm_uuid(u: str) -> str:
    u = u.lower()
    return u[4:] if u.startswith("gpu-") else u


class CudaCheck:
    """The CUDA side: context, library warm-up, one configuration at a time."""

    def __init__(self, device: str = DEVICE) -> None:
        import torch

        from vitcost import measure

        self.device = device
        self.torch = torch
        self.measure = measure
        self.build = measure.build_model  # the reference, or the Hugging Face class a spec names
        self.sources: dict[tuple[str, int], Any] = {}  # (model, image) -> CPU model with the weights
        self.info: dict[str, Any] = {}

    # -- once, at the start
    def context(self, before: Optional[dict], nvml_source: str) -> None:
        torch = self.torch
        free_bytes, total_bytes = torch.cuda.mem_get_info()  # the first CUDA call: creates the context
        props = torch.cuda.get_device_properties(0)
        uuid = _norm_uuid(str(getattr(props, "uuid", "")))
        after, _ = nvml_used_bytes() if before is not None else (None, "")
        key = None
        if before:
            keys = [k for k in before if _norm_uuid(k) == uuid] or (list(before) if len(before) == 1 else [])
            key = keys[0] if keys else None
        self._nvml_key = key
        self._before = before
        info = self.info
        info.update(device_name=torch.cuda.get_device_name(0), device_total_bytes=total_bytes,
                    mem_get_info_after_init_free_bytes=free_bytes, nvml_source=nvml_source,
                    torch_version=torch.__version__, cuda_version=torch.version.cuda,
                    cudnn_version=torch.backends.cudnn.version(),
                    multiprocessors=props.multi_processor_count)
        if key is not None and after and key in after:
            used_before = before[key][0]
            info["device_used_before_init_bytes"] = used_before
            info["context_at_init_bytes"] = after[key][0] - used_before - torch.cuda.memory_reserved()
            info["context_source"] = f"{nvml_source}: used after the first CUDA call less used before"
        else:  # no NVML: everything used on the device, other processes included (an upper bound)
            info["device_used_before_init_bytes"] = None
            info["context_at_init_bytes"] = total_bytes - free_bytes - torch.cuda.memory_reserved()
            info["context_source"] = "mem_get_info: all memory used on the device (no NVML: an upper bound)"

    def outside_allocator_bytes(self) -> int:
        """Device memory used by this process that no allocator counter sees (context, modules, handles)."""
        torch = self.torch
        torch.cuda.synchronize()
        if self._nvml_key is not None:
            now, _ = nvml_used_bytes()
            if now and self._nvml_key in now:
                return now[self._nvml_key][0] - self._before[self._nvml_key][0] - torch.cuda.memory_reserved()
        free_bytes, total_bytes = torch.cuda.mem_get_info()
        return total_bytes - free_bytes - torch.cuda.memory_reserved()

    def warm_libraries(self) -> None:
        """A tiny autocast linear + conv, forward and backward (the backward runs on autograd's
        own thread, with its own cuBLAS handle), in bf16, fp16 and fp32: the workspaces cuBLAS
        keeps through the caching allocator exist before any configuration is measured."""
        torch = self.torch
        lin = torch.nn.Linear(64, 64, device=self.device)
        conv = torch.nn.Conv2d(3, 64, 16, stride=16, device=self.device)
        img = torch.randn(2, 3, 32, 32, device=self.device)
        for dtype in (torch.bfloat16, torch.float16, None):
            with torch.autocast(self.device, dtype=dtype) if dtype is not None else contextlib.nullcontext():
                out = lin(conv(img).flatten(2).transpose(1, 2))
                out = torch.nn.functional.scaled_dot_product_attention(out[:, None], out[:, None], out[:, None])
            out.float().sum().backward()
        del lin, conv, img, out
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        self.info["library_allocated_bytes"] = torch.cuda.memory_allocated()
        self.info["library_reserved_bytes"] = torch.cuda.memory_reserved()
        self.info["outside_allocator_after_warmup_bytes"] = self.outside_allocator_bytes()

    # -- one configuration
    def _source(self, cfg: Config, spec) -> Any:
        key = (cfg.model, cfg.image)
        if key not in self.sources:
            self.sources.clear()  # the grid is ordered: the previous source is done with
            gc.collect()
            self.torch.manual_seed(0)
            self.sources[key] = self.build(spec, attention=cfg.attention)  # on the CPU
        return self.sources[key]

    def _fresh_model(self, cfg: Config, spec, source) -> Any:
        """The reference model allocated on CUDA parameter by parameter, in the order
        ``.to("cuda")`` allocates them, holding the CPU source's weights (copied from pageable
        CPU memory: no allocation on the GPU besides the parameters)."""
        torch = self.torch
        with torch.device("meta"):
            model = self.build(spec, attention=cfg.attention)
        model = model.to_empty(device=self.device)
        src = dict(source.named_parameters())
        src.update(source.named_buffers())
        dst = dict(model.named_parameters())
        dst.update(model.named_buffers())
        if src.keys() != dst.keys():
            raise RuntimeError("the CPU source model and the CUDA model differ in their tensors")
        with torch.no_grad():
            for name, t in dst.items():
                t.copy_(src[name])
        return model

    def run(self, cfg: Config, report, row: Row) -> None:
        torch = self.torch
        measure = self.measure
        spec, wl = report.spec, report.workload
        source = self._source(cfg, spec)
        dtype = getattr(torch, _AUTOCAST_DTYPE[cfg.precision])
        training = cfg.mode == "train"
        state: dict[str, Any] = {}

        def step() -> None:
            model, x, y = state["runner"].model, state["x"], state["y"]
            if not training:
                with torch.no_grad(), torch.autocast(self.device, dtype=dtype):
                    out = measure.logits(model(x))
                del out
                return
            with torch.autocast(self.device, dtype=dtype):
                loss = torch.nn.functional.cross_entropy(measure.logits(model(x)), y)
            loss.backward()
            opt = state["runner"].optimizer
            opt.step()
            opt.zero_grad(set_to_none=True)

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base_allocated = torch.cuda.memory_allocated()
        base_reserved = torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        m: dict[str, Any] = {"base_allocated_bytes": base_allocated, "base_reserved_bytes": base_reserved}
        model = None
        try:
            model = self._fresh_model(cfg, spec, source)
            state["runner"] = measure.build_runner(spec, wl, self.device, model=model)
            model = None
            torch.cuda.synchronize()
            m["weights_bytes"] = torch.cuda.memory_allocated() - base_allocated
            state["x"], state["y"] = measure.make_batch(spec, wl, self.device)  # made once, fed every step
            for _ in range(FRESH_STEPS):
                step()
            torch.cuda.synchronize()
            m["fresh_max_allocated_bytes"] = torch.cuda.max_memory_allocated() - base_allocated
            m["fresh_max_reserved_bytes"] = torch.cuda.max_memory_reserved() - base_reserved
            m["fresh_max_reserved_raw_bytes"] = torch.cuda.max_memory_reserved()
            m["allocated_between_steps_bytes"] = torch.cuda.memory_allocated() - base_allocated
            torch.cuda.reset_peak_memory_stats()
            for _ in range(WARMUP_STEPS):
                step()
            times = []
            for _ in range(TIMED_STEPS):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            m["steady_max_allocated_bytes"] = torch.cuda.max_memory_allocated() - base_allocated
            m["steady_max_reserved_bytes"] = torch.cuda.max_memory_reserved() - base_reserved
            m["steady_max_allocated_raw_bytes"] = torch.cuda.max_memory_allocated()
            m["steady_max_reserved_raw_bytes"] = torch.cuda.max_memory_reserved()
            m["step_seconds"] = [round(t, 6) for t in times]
            m["step_seconds_median"] = statistics.median(times)
            row.status = "ok"
        except Exception as exc:  # noqa: BLE001 - out of memory is a result; anything else is recorded
            model = None
            oom = measure.is_out_of_memory(exc)
            row.status = "oom" if oom else "error"
            # CUDA's out-of-memory text runs to a paragraph: its first two sentences say enough
            row.message = ". ".join(str(exc).split(". ")[:2]).replace("\n", " ") if oom else _one_line(exc)
            m["max_allocated_at_failure_bytes"] = torch.cuda.max_memory_allocated() - base_allocated
            m["max_reserved_at_failure_bytes"] = torch.cuda.max_memory_reserved() - base_reserved
        del model
        state.clear()
        gc.collect()
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            m["left_allocated_bytes"] = torch.cuda.memory_allocated() - base_allocated  # 0: nothing leaked
        except Exception as exc:  # noqa: BLE001 - a broken context: the next configurations say so
            row.message = (row.message + "; " if row.message else "") + _one_line(exc)
        row.measured = m


# --- the report ----------------------------------------------------------------------------------


def fmt_bytes(n: Optional[int]) -> str:
    return "-" if n is None else f"{n:,}"


def gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**30:.3f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def fmt_pct(e: Optional[float]) -> str:
    return "-" if e is None else f"{100 * e:+.2f}%"


def fmt_ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def _stats(rows: list[Row], key: str) -> Optional[str]:
    pairs = [(r, r.to_dict()[key]) for r in rows]
    pairs = [(r, e) for r, e in pairs if e is not None]
    if not pairs:
        return None
    worst_row, worst = max(pairs, key=lambda p: abs(p[1]))
    errors = [e for _, e in pairs]
    return (f"worst **{fmt_pct(worst)}** ({worst_row.config.label}), median |error| "
            f"{100 * statistics.median(abs(e) for e in errors):.2f}%, median {fmt_pct(statistics.median(errors))}, "
            f"{len(pairs)} configurations")


def markdown(rows: list[Row], meta: dict[str, Any], dry_run: bool, complete: bool) -> str:
    lines = ["# CUDA accuracy: the caching allocator against vitcost" + (" — DRY RUN, nothing measured"
                                                                         if dry_run else ""), ""]
    cmd = "python benchmarks/cuda_check.py" + (" --dry-run" if dry_run else "")
    lines += [f"Written by `{cmd}` (do not edit by hand); the method is in the script's docstring.", ""]
    if dry_run:
        lines += ["> **Dry run**: no CUDA code ran. Every predicted column is what `vitcost.plan` gives; every",
                  "> measured column is \"-\". Run `python benchmarks/cuda_check.py` on a GPU machine to fill them.", ""]
    lines += [
        f"- date: {meta['date']}",
        f"- torch {meta['torch_version']}, CUDA {meta.get('cuda_version') or '-'}, "
        f"cuDNN {meta.get('cudnn_version') or '-'}; device: {meta.get('device_name') or 'none (dry run)'}",
        f"- vitcost profile: `--gpu {meta['gpu']}` -> {meta['profile']}; allocator model: {meta['allocator']} "
        f"(PYTORCH_CUDA_ALLOC_CONF={meta['alloc_conf'] or 'unset'})",
        f"- grid: {len(rows)} configurations: models {', '.join(meta['models'])}, images "
        f"{', '.join(map(str, meta['images']))}, patch {PATCH}, attention {', '.join(meta['attentions'])}, "
        f"mode {', '.join(meta['modes'])}, precision {', '.join(meta['precisions'])}, optimizer {OPTIMIZER}; "
        f"batch {meta['batches']}",
        f"- steps per configuration: {FRESH_STEPS} from a fresh start (reserved peak), then {WARMUP_STEPS} "
        f"warm-up and {TIMED_STEPS} timed (steady-state peaks, median step time); amp-fp16 without GradScaler",
    ]
    ran = [r for r in rows if r.status in ("ok", "oom", "error")]
    if not dry_run:
        lines.append(f"- ran {len(ran)} of {len(rows)} configurations in {meta['seconds']:.0f} s "
                     f"(budget --limit-seconds {meta['limit_seconds']:g})")
        if meta.get("stopped"):
            lines.append(f"- **stopped early**: {meta['stopped']}")
        if not complete:
            lines.append("- **incomplete**: the run was still going (or was cut off) when this was written")
    lines += ["", "| configuration | batch | allocated peak: predicted | measured | error "
              "| reserved peak, 3 steps from fresh: predicted | measured | error | reserved, steady: measured "
              "| error | step ms: measured | predicted | error | status |",
              "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        d = r.to_dict()
        status = r.status + (f": {r.message}" if r.message else "")
        lines.append(
            f"| {r.config.label} | {r.config.batch} "
            f"| {fmt_bytes(r.predicted_peak_bytes)} | {fmt_bytes(r.measured_value('steady_max_allocated_bytes'))} "
            f"| {fmt_pct(d['allocated_peak_error'])} "
            f"| {fmt_bytes(r.predicted_peak_reserved_bytes)} | {fmt_bytes(r.measured_value('fresh_max_reserved_bytes'))} "
            f"| {fmt_pct(d['reserved_peak_error'])} "
            f"| {fmt_bytes(r.measured_value('steady_max_reserved_bytes'))} | {fmt_pct(d['steady_reserved_error'])} "
            f"| {fmt_ms(r.measured_value('step_seconds_median'))} | {fmt_ms(r.predicted_step_seconds)} "
            f"| {fmt_pct(d['step_time_error'])} | {status.replace('|', '/')} |")
    lines += ["", "Errors are (predicted - measured) / measured. Allocator figures are net of what the allocator "
              "held before the configuration was built (the library warm-up's cuBLAS workspaces).", ""]
    lines += ["## Summary", ""]
    if dry_run:
        lines += ["Dry run: nothing measured, no errors to summarise.", ""]
    else:
        ok = [r for r in rows if r.status == "ok"]
        counts = {s: sum(r.status == s for r in rows) for s in ("ok", "oom", "error", "not run")}
        lines.append(f"- configurations: {counts['ok']} measured, {counts['oom']} out of memory, "
                     f"{counts['error']} failed, {counts['not run']} not run")
        for key, what in (("allocated_peak_error", "allocated peak (max_memory_allocated, steady state)"),
                          ("reserved_peak_error", "reserved peak (max_memory_reserved, 3 steps from fresh)"),
                          ("steady_reserved_error", "reserved peak, steady state (same prediction)")):
            lines.append(f"- {what}: {_stats(ok, key) or 'nothing measured'}")
        for key, what in (("step_time_error", "step time (median of the timed steps) against vitcost's time model"),):
            lines.append(f"- {what}: {_stats(ok, key) or 'nothing measured'}")
        leaked = [r.config.label for r in ran if r.measured.get("left_allocated_bytes")]
        if leaked:
            lines.append(f"- allocator memory left after a configuration (a library allocating lazily?): "
                         f"{', '.join(leaked)}")
        lines.append("")
    lines += ["## CUDA context and library memory", ""]
    if dry_run:
        lines += [f"- profile: CUDA context {gib(meta['profile_context_bytes'])} "
                  f"({fmt_bytes(meta['profile_context_bytes'])} bytes), library workspaces "
                  f"{gib(meta['profile_workspace_bytes'])}; measured: - (dry run)", ""]
    else:
        lines += [
            f"- context at init: **{gib(meta.get('context_at_init_bytes'))}** "
            f"({fmt_bytes(meta.get('context_at_init_bytes'))} bytes; {meta.get('context_source')}); "
            f"profile's cuda_context: {gib(meta['profile_context_bytes'])} "
            f"({fmt_pct(error(meta['profile_context_bytes'], meta.get('context_at_init_bytes')))})",
            f"- outside the allocator after the library warm-up: {gib(meta.get('outside_allocator_after_warmup_bytes'))}"
            f"; at the end of the run: **{gib(meta.get('outside_allocator_at_end_bytes'))}** "
            f"({fmt_bytes(meta.get('outside_allocator_at_end_bytes'))} bytes; context, lazily loaded kernels, "
            f"library handles; against the profile's context {fmt_pct(error(meta['profile_context_bytes'], meta.get('outside_allocator_at_end_bytes')))})",
            f"- held by libraries through the allocator after the warm-up (cuBLAS workspaces): "
            f"{gib(meta.get('library_allocated_bytes'))} allocated, {gib(meta.get('library_reserved_bytes'))} reserved; "
            f"profile's library_workspace: {gib(meta['profile_workspace_bytes'])}",
            f"- device memory: {fmt_bytes(meta.get('device_total_bytes'))} bytes ({gib(meta.get('device_total_bytes'))}) "
            f"by mem_get_info; profile: {fmt_bytes(meta['profile_memory_bytes'])} bytes", ""]
    return "\n".join(lines)


def write_outputs(args, rows: list[Row], meta: dict[str, Any], dry_run: bool, complete: bool) -> None:
    meta["seconds"] = time.perf_counter() - START_SECONDS
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, meta, dry_run, complete) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": {**meta, "dry_run": dry_run, "complete": complete},
                                         "rows": [r.to_dict() for r in rows]}, indent=2, default=str) + "\n")


# --- main ----------------------------------------------------------------------------------------


def fail(message: str, code: int = 2) -> None:
    print(f"cuda_check: {message}", file=sys.stderr)
    sys.exit(code)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report (default docs/cuda-accuracy.md)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw rows as JSON")
    p.add_argument("--gpu", default="h200", help="vitcost GPU profile for the predictions (default h200)")
    p.add_argument("--dry-run", action="store_true", help="no CUDA: predictions only, measured columns '-'")
    p.add_argument("--limit-seconds", type=float, default=DEFAULT_LIMIT_SECONDS,
                   help="start no configuration that would end past this many seconds from the start")
    p.add_argument("--models", type=_csv, default=list(BATCH_BY_MODEL))
    p.add_argument("--images", type=lambda s: [int(x) for x in _csv(s)], default=list(IMAGES))
    p.add_argument("--attentions", type=_csv, default=list(ATTENTIONS))
    p.add_argument("--modes", type=_csv, default=list(MODES))
    p.add_argument("--precisions", type=_csv, default=list(PRECISIONS))
    p.add_argument("--batch", type=int, default=None, help="every configuration at this batch (a smoke test)")
    p.add_argument("--hf", type=_csv, default=list(HF_MODELS),
                   help=f"Hugging Face rows ({', '.join(HF_MODELS)}; '' for none)")
    args = p.parse_args(argv)
    bad = [x for x in args.precisions if x not in _AUTOCAST_DTYPE]
    if bad:
        p.error(f"--precisions: only {', '.join(_AUTOCAST_DTYPE)} are measured here, not {', '.join(bad)}")
    return args


def torch_version_without_import() -> str:
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:  # noqa: BLE001 - not installed
        return "not installed"


def main(argv=None) -> int:
    args = parse_args(argv)
    before, nvml_source = None, ""
    if not args.dry_run:  # fail at once, before any prediction, where CUDA cannot run
        before, nvml_source = nvml_used_bytes()  # before this process touches CUDA
        try:
            import torch
        except ImportError:
            fail("torch is not installed; measuring needs a CUDA build of torch (or use --dry-run)")
        if not torch.cuda.is_available():
            fail("no CUDA device visible to torch; run this on a GPU machine, or use --dry-run")

    from vitcost.errors import VitcostError

    unknown = [m for m in args.hf if m not in HF_MODELS]
    if unknown:
        fail(f"--hf: no Hugging Face row named {', '.join(unknown)} ({', '.join(HF_MODELS)})")
    configs = grid(args.models, args.images, args.attentions, args.modes, args.precisions, args.batch, args.hf)
    allocator = allocator_kind()
    reports, rows = [], []
    try:
        for cfg in configs:
            report = predict(cfg, args.gpu, allocator)
            reports.append(report)
            rows.append(predicted_row(cfg, report))
    except VitcostError as exc:
        fail(f"{' '.join(str(exc).split())}")
    g = reports[0].gpu
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch_version": torch_version_without_import(), "gpu": args.gpu,
        "profile": f"{g.name} ({g.display_name})", "profile_context_bytes": g.context_bytes,
        "profile_workspace_bytes": g.workspace_bytes, "profile_memory_bytes": g.memory_bytes,
        "allocator": allocator, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "models": args.models, "images": args.images, "attentions": args.attentions, "modes": args.modes,
        "precisions": args.precisions,
        "batches": ", ".join(f"{m} {args.batch or BATCH_BY_MODEL.get(m, 32)}" for m in args.models),
        "limit_seconds": args.limit_seconds, "host": platform.node(), "stopped": "",
    }

    if args.dry_run:
        for r in rows:
            r.status = "dry run"
        write_outputs(args, rows, meta, dry_run=True, complete=True)
        print(f"dry run: {len(rows)} configurations predicted in {time.perf_counter() - START_SECONDS:.1f} s; "
              f"wrote {args.out}", file=sys.stderr)
        return 0

    check = CudaCheck()
    check.context(before, nvml_source)
    check.warm_libraries()
    meta.update(check.info)
    slowest: dict[str, float] = {}
    write_outputs(args, rows, meta, dry_run=False, complete=False)
    for i, (cfg, report, row) in enumerate(zip(configs, reports, rows), 1):
        elapsed = time.perf_counter() - START_SECONDS
        projected = slowest.get(cfg.model, max(slowest.values(), default=0.0))
        if elapsed + projected > args.limit_seconds:
            left = len(rows) - i + 1
            meta["stopped"] = (f"the --limit-seconds {args.limit_seconds:g} budget: {elapsed:.0f} s spent, the next "
                               f"configuration projected at {projected:.0f} s; {left} configuration(s) not run")
            print(f"cuda_check: stopping, {meta['stopped']}", file=sys.stderr, flush=True)
            break
        t0 = time.perf_counter()
        check.run(cfg, report, row)
        row.seconds = time.perf_counter() - t0
        slowest[cfg.model] = max(slowest.get(cfg.model, 0.0), row.seconds)
        d = row.to_dict()
        print(f"[{i:2}/{len(rows)}] {cfg.label} b{cfg.batch}: {row.status}"
              + (f" allocated {fmt_pct(d['allocated_peak_error'])}, reserved {fmt_pct(d['reserved_peak_error'])}, "
                 f"step {fmt_ms(row.measured_value('step_seconds_median'))} ms (predicted "
                 f"{fmt_ms(row.predicted_step_seconds)})" if row.status == "ok" else f" {row.message}")
              + f", {row.seconds:.1f} s", file=sys.stderr, flush=True)
        write_outputs(args, rows, meta, dry_run=False, complete=False)
    check.sources.clear()
    gc.collect()
    try:
        meta["outside_allocator_at_end_bytes"] = check.outside_allocator_bytes()
    except Exception as exc:  # noqa: BLE001 - a broken context
        meta["outside_allocator_at_end_bytes"] = None
        meta["end_error"] = _one_line(exc)
    write_outputs(args, rows, meta, dry_run=False, complete=True)
    errors = sum(r.status == "error" for r in rows)
    print(f"{sum(r.status == 'ok' for r in rows)} measured, {sum(r.status == 'oom' for r in rows)} out of memory, "
          f"{errors} failed, {sum(r.status == 'not run' for r in rows)} not run in "
          f"{time.perf_counter() - START_SECONDS:.0f} s; wrote {args.out}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
