"""Ground truth from PyTorch: run a real step and read what it allocated.

This module (with :mod:`vitcost.reference_vit`) is the only place vitcost imports torch.
On the CPU the peak comes from PyTorch's ``MemTracker`` (every live tensor storage, by
category, sampled after each operator: the CPU allocator does not round, so the result is
exact and repeatable). On CUDA it comes from the caching allocator's counters.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    from vitcost.errors import MeasurementError

    raise MeasurementError(
        "measuring needs PyTorch: pip install 'vitcost[torch]' (torch==2.13.0)"
    ) from exc

from vitcost.errors import MeasurementError
from vitcost.specs import Precision, ViTSpec, Workload

_DTYPES = {
    Precision.fp32: torch.float32,
    Precision.bf16: torch.bfloat16,
    Precision.fp16: torch.float16,
    Precision.amp_bf16: torch.float32,
    Precision.amp_fp16: torch.float32,
}
_AUTOCAST = {Precision.amp_bf16: torch.bfloat16, Precision.amp_fp16: torch.float16}


@dataclass(frozen=True)
class MeasuredMemory:
    """Bytes live at the peak of one steady-state step, by MemTracker category."""

    device: str
    peak_bytes: int
    weights_bytes: int = 0
    gradients_bytes: int = 0
    optimizer_bytes: int = 0
    activations_bytes: int = 0
    temporaries_bytes: int = 0
    saved_after_forward_bytes: int = 0
    extra: dict = field(default_factory=dict)


def param_dtype(workload: Workload) -> "torch.dtype":
    return _DTYPES[workload.precision]


def make_optimizer(model: "torch.nn.Module", workload: Workload) -> "torch.optim.Optimizer":
    params = model.parameters()
    name = workload.optimizer.value
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-4)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    return torch.optim.SGD(params, lr=1e-3)


def make_batch(spec: ViTSpec, workload: Workload, device: str):
    dtype = param_dtype(workload)
    x = torch.randn(workload.batch, spec.channels, spec.image_h, spec.image_w, dtype=dtype, device=device)
    if not workload.training:
        return x, None  # serving has no labels
    y = torch.randint(0, max(spec.classes, 1), (workload.batch,), device=device)
    return x, y


def _autocast(workload: Workload, device: str):
    if workload.precision in _AUTOCAST:
        return torch.autocast(device_type=device, dtype=_AUTOCAST[workload.precision])
    return contextlib.nullcontext()


def _loss(out: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
    if out.dim() == 2:
        return F.cross_entropy(out, y)
    return out.float().pow(2).mean()  # headless model: a scalar to backpropagate


class Runner:
    """A model, its optimizer and one step function, built for a spec and a workload."""

    def __init__(self, model: "torch.nn.Module", spec: ViTSpec, workload: Workload, device: str):
        self.model = model
        self.spec = spec
        self.workload = workload
        self.device = device
        self.optimizer = make_optimizer(model, workload) if workload.training else None
        if not workload.training:
            model.eval()
        self.saved_after_forward: int | None = None

    def step(self, probe=None) -> None:
        """One step. ``probe()`` is called between forward and backward (train) or after forward."""
        wl = self.workload
        x, y = make_batch(self.spec, wl, self.device)
        if not wl.training:
            with torch.no_grad(), _autocast(wl, self.device):
                out = self.model(x)
            if probe:
                probe()
            del out
            return
        with _autocast(wl, self.device):
            loss = _loss(self.model(x), y)
        if probe:
            probe()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not wl.keep_grads)


def build_runner(spec: ViTSpec, workload: Workload, device: str = "cpu", model=None) -> Runner:
    from vitcost.reference_vit import build

    torch.manual_seed(0)
    if model is None:
        model = build(spec, attention=workload.attention.value, checkpointing=workload.checkpointing.value)
    model = model.to(device=device, dtype=param_dtype(workload))
    return Runner(model, spec, workload, device)


def _mem_tracker():
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        raise MeasurementError(f"this torch build has no MemTracker ({exc})") from None
    return MemTracker


def _category_bytes(snapshot: dict, device: "torch.device") -> dict[str, int]:
    snap = snapshot.get(device, {})
    return {str(getattr(k, "name", k)): v for k, v in snap.items()}


def measure_cpu(spec: ViTSpec, workload: Workload, warmup: int = 1, model=None) -> MeasuredMemory:
    """Peak bytes of one steady-state step on the CPU, by category (MemTracker)."""
    runner = build_runner(spec, workload, "cpu", model=model)
    for _ in range(warmup):
        runner.step()
    tracker = _mem_tracker()()
    tracker.track_external(runner.model, *([runner.optimizer] if runner.optimizer else []))
    dev = torch.device("cpu")
    after_forward: dict[str, int] = {}

    def probe() -> None:
        after_forward.update(_category_bytes(tracker.get_tracker_snapshot("current"), dev))

    with tracker:
        runner.step(probe)
    peak = _category_bytes(tracker.get_tracker_snapshot("peak"), dev)
    return MeasuredMemory(
        device="cpu",
        peak_bytes=peak.get("Total", 0),
        weights_bytes=peak.get("PARAM", 0) + peak.get("BUFFER", 0),
        gradients_bytes=peak.get("GRAD", 0),
        optimizer_bytes=peak.get("OPT", 0),
        activations_bytes=peak.get("ACT", 0),
        temporaries_bytes=peak.get("TEMP", 0) + peak.get("OTH", 0),
        saved_after_forward_bytes=after_forward.get("ACT", 0),
        extra={"peak_snapshot": peak, "after_forward": after_forward},
    )


def measure_cuda(spec: ViTSpec, workload: Workload, warmup: int = 2, model=None) -> MeasuredMemory:
    """Peak allocated bytes of one steady-state step on the current CUDA device."""
    if not torch.cuda.is_available():
        raise MeasurementError("--device cuda was asked for, but torch sees no CUDA device")
    free_before, total = torch.cuda.mem_get_info()
    runner = build_runner(spec, workload, "cuda", model=model)
    for _ in range(warmup):  # optimizer states and cuBLAS workspaces are created lazily
        runner.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    runner.step()
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    reserved = torch.cuda.max_memory_reserved()
    allocated = torch.cuda.max_memory_allocated()
    return MeasuredMemory(
        device="cuda",
        peak_bytes=allocated,
        extra={
            "max_memory_reserved": reserved,
            "allocated_at_step_start": base,
            "device_name": torch.cuda.get_device_name(),
            "total_bytes": total,
            "non_allocator_bytes": total - free_after - torch.cuda.memory_reserved(),
            "free_before_bytes": free_before,
        },
    )


def count_forward_macs(spec: ViTSpec, attention: str = "eager", device: str = "meta") -> int:
    """Forward MACs of the reference model per image, from FlopCounterMode (FLOPs / 2).

    Counted on the meta device (no memory), batch 1, with eager attention by default:
    FlopCounterMode counts the CPU SDPA kernel as zero FLOPs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from vitcost.reference_vit import build

    with torch.device(device):
        model = build(spec, attention=attention)
        x = torch.randn(1, spec.channels, spec.image_h, spec.image_w)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def count_params(spec: ViTSpec) -> int:
    """``sum(p.numel())`` of the reference model, built on the meta device."""
    from vitcost.reference_vit import build

    with torch.device("meta"):
        model = build(spec)
    return sum(p.numel() for p in model.parameters())
