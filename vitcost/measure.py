"""Ground truth from PyTorch: run a real step and read what it allocated.

This module (with :mod:`vitcost.reference_vit`) is the only place vitcost imports torch.
On the CPU the peak comes from PyTorch's ``MemTracker`` (every live tensor storage, by
category, sampled after each operator: the CPU allocator does not round, so the result is
exact and repeatable). The same harness runs on fake CPU tensors (``FakeTensorMode``):
shapes, dtypes and storages without memory or arithmetic, so the step of a configuration
far too large for this machine is *traced* in seconds, by the same rules. On CUDA the peak
comes from the caching allocator's counters. MACs come from ``FlopCounterMode`` on the
meta device (FLOPs / 2).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# torch without numpy warns so at import (and again when fake tensors load): not our concern
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

try:
    import torch
    import torch.nn.functional as F
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    from vitcost.errors import MeasurementError

    raise MeasurementError(
        "measuring needs PyTorch: pip install torch==2.13.0"
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
    """Bytes live at the peak of one steady-state step, by MemTracker category.

    ``saved_after_forward_bytes`` is MemTracker's activations at the end of the forward pass
    (input batch, tensors saved for backward, autocast's weight copies, and the forward's
    output: the loss, or the logits under ``no_grad``); ``output_bytes`` is that output.
    """

    device: str
    peak_bytes: int
    weights_bytes: int = 0
    gradients_bytes: int = 0
    optimizer_bytes: int = 0
    activations_bytes: int = 0
    temporaries_bytes: int = 0
    saved_after_forward_bytes: int = 0
    output_bytes: int = 0
    traced: bool = False  # fake tensors: what the step would allocate, not what it did
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TracedCounts:
    """Parameters and MACs per image of a model, counted by torch on the meta device."""

    params: int
    forward_macs: int
    training_macs: int  # forward + backward; 0 when not asked for


def param_dtype(workload: Workload) -> "torch.dtype":
    """The dtype the model is built in and the batch made in: fp32 under FSDP's mixed
    precision, which casts both itself."""
    return torch.float32 if workload.mixed_precision else _DTYPES[workload.precision]


def compute_dtype(workload: Workload) -> "torch.dtype":
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
    shape = (spec.channels, spec.image_h, spec.image_w)
    if spec.video:  # VideoMAE takes (batch, frames, channels, height, width)
        shape = (spec.frames, *shape)
    x = torch.randn(workload.batch, *shape, dtype=dtype, device=device)
    if not workload.training or spec.mae is not None:
        return x, None  # serving, and MAE pretraining, have no labels
    if spec.distillation:  # the labels, and the teacher's (hard distillation): one (2, B) tensor
        return x, torch.randint(0, max(spec.classes, 1), (2, workload.batch), device=device)
    y = torch.randint(0, max(spec.classes, 1), (workload.batch,), device=device)
    return x, y


def _autocast(workload: Workload, device: str):
    if workload.precision in _AUTOCAST:
        return torch.autocast(device_type=device, dtype=_AUTOCAST[workload.precision])
    return contextlib.nullcontext()


def logits(out) -> "torch.Tensor":
    """The logits of a model's output: a tensor, or Hugging Face's ``ModelOutput.logits``
    (a backbone's ``last_hidden_state``), or the first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):  # a classifier's output, or a backbone's features
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise MeasurementError(
        f"the model returned {type(out).__name__}: vitcost needs logits (a tensor, or an output with .logits)"
    )


def _loss(out: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
    if isinstance(out, tuple):  # DeiT's hard distillation: each head against its labels, alpha 0.5
        return 0.5 * F.cross_entropy(out[0], y[0]) + 0.5 * F.cross_entropy(out[1], y[1])
    if out.dim() == 2:
        return F.cross_entropy(out, y)
    return out.float().pow(2).mean()  # headless model: a scalar to backpropagate


def _storage_bytes(t: "torch.Tensor") -> int:
    return t.untyped_storage().nbytes()


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
        self.output_bytes = 0  # the loss (training) or the logits (no_grad) at the probe

    def step(self, probe=None, batch=None, between=None) -> None:
        """One step. ``probe()`` is called between forward and backward (train) or after forward;
        ``batch``: an (images, labels) pair made beforehand (a new random one otherwise);
        ``between()``: called before each micro-step after the first (gradient accumulation)."""
        wl = self.workload
        x, y = batch if batch is not None else make_batch(self.spec, wl, self.device)
        if not wl.training:
            with torch.no_grad(), _autocast(wl, self.device):
                out = logits(self.model(x))
            self.output_bytes = _storage_bytes(out)
            if probe:
                probe()
            del out
            return
        for micro in range(wl.grad_accum):  # gradient accumulation: DDP syncs the last micro-step only
            sync = micro == wl.grad_accum - 1 or not hasattr(self.model, "no_sync")
            with contextlib.nullcontext() if sync else self.model.no_sync():
                if micro:
                    x, y = batch if batch is not None else make_batch(self.spec, wl, self.device)
                    if between:
                        between()
                with _autocast(wl, self.device):
                    if self.spec.mae is not None:  # the model computes its own loss (MAE pretraining)
                        loss = self.model(x).loss
                    elif self.spec.distillation:
                        loss = _loss(self.model(x), y)
                    else:
                        loss = _loss(logits(self.model(x)), y)
                self.output_bytes = _storage_bytes(loss)
                if probe and micro == wl.grad_accum - 1:
                    probe()
                loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not wl.keep_grads)


def build_model(spec: ViTSpec, attention: str = "sdpa", checkpointing: str = "none") -> "torch.nn.Module":
    """The model ``spec`` describes, by implementation: vitcost's reference (timm's code) or
    the Hugging Face class (``vitcost.hf_models``)."""
    if spec.impl.value == "hf":
        from vitcost.hf_models import build_hf

        return build_hf(spec, attention=attention, checkpointing=checkpointing)
    from vitcost.reference_vit import build

    return build(spec, attention=attention, checkpointing=checkpointing)


def build_runner(spec: ViTSpec, workload: Workload, device: str = "cpu", model=None) -> Runner:
    torch.manual_seed(0)
    if model is None:
        model = build_model(spec, attention=workload.attention.value, checkpointing=workload.checkpointing.value)
    model = model.to(device=device, dtype=param_dtype(workload))
    return Runner(model, spec, workload, device)


def _mem_tracker():
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        raise MeasurementError(f"this torch build has no MemTracker ({exc})") from None

    needed = ("_update_peak_stats", "_curr_mem_snap", "_peak_mem", "_peak_mem_snap")
    probe = MemTracker()
    if not all(hasattr(probe, name) for name in needed):  # pragma: no cover - another torch
        return MemTracker

    class GlobalPeakTracker(MemTracker):
        """MemTracker without its per-module peaks: after every operator it walks every
        module it has seen (quadratic in depth; a ViT-H step took 11 s of bookkeeping for
        2 s of work). Only the global peak and its categories are kept, as MemTracker
        computes them."""

        def _update_peak_stats(self, peak_state) -> None:  # noqa: ARG002 - MemTracker's signature
            for dev, snap in self._curr_mem_snap.items():
                total = snap["Total"]
                if self._peak_mem.get(dev, 0) < total:
                    self._peak_mem[dev] = total
                    self._peak_mem_snap[dev] = dict(snap)

    return GlobalPeakTracker


class _NoHook:
    """Stands for a hook handle MemTracker removes when it is done."""

    def remove(self) -> None:
        pass


def _category_bytes(snapshot: dict, device: "torch.device") -> dict[str, int]:
    snap = snapshot.get(device, {})
    return {str(getattr(k, "name", k)): v for k, v in snap.items()}


def is_out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "can't allocate" in text)


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def build_meta(spec: ViTSpec, workload: Optional[Workload] = None) -> "torch.nn.Module":
    """The spec's model on the meta device: shapes only, nothing allocated."""
    attention = workload.attention.value if workload else "sdpa"
    checkpointing = workload.checkpointing.value if workload else "none"
    with torch.device("meta"):
        return build_model(spec, attention=attention, checkpointing=checkpointing)


def measure_cpu(spec: ViTSpec, workload: Workload, warmup: int = 1, model=None, fake: bool = False) -> MeasuredMemory:
    """Peak bytes of one steady-state step on the CPU, by category (MemTracker).

    With ``fake`` the step runs on fake CPU tensors (``FakeTensorMode``): nothing is
    allocated and nothing computed, and MemTracker follows the storages the real step would
    make. ``model`` must then be on the meta device (or None: the reference model).
    """
    if not fake:
        return _track_cpu(spec, workload, warmup, model)
    if model is None:
        model = build_meta(spec, workload)
    model = model.to(dtype=param_dtype(workload))  # on meta: converting fake tensors fails
    with _fake_mode():
        model = model.to_empty(device="cpu")
        return _track_cpu(spec, workload, warmup, model, traced=True)


def _track_cpu(spec: ViTSpec, workload: Workload, warmup: int, model, traced: bool = False) -> MeasuredMemory:
    if traced:
        torch.manual_seed(0)
        runner = Runner(model, spec, workload, "cpu")
    else:
        runner = build_runner(spec, workload, "cpu", model=model)
    return track_runner(runner, workload, warmup, traced)


def track_runner(runner: Runner, workload: Workload, warmup: int, traced: bool = False,
                 external: Optional[Callable[[], list]] = None, tracker=None) -> MeasuredMemory:
    """MemTracker over one steady-state step of a built runner, after ``warmup`` steps;
    ``external()``: more tensors that live through the step (read after the warm-up);
    ``tracker``: another tracker (``FSDPMemTracker``), made for the runner's model."""
    if traced:  # the optimizer's states do not depend on the batch: warm up on one image
        runner.workload = workload.model_copy(update={"batch": 1})
    for _ in range(max(warmup, 1 if workload.training else 0)):  # optimizer states come in step 1
        runner.step()
    runner.workload = workload
    fsdp = tracker is not None
    tracker = tracker(runner.model, runner.optimizer) if fsdp else _mem_tracker()()
    for param in runner.model.parameters():
        if not param.requires_grad and hasattr(tracker, "_param_to_grad_hook_handles"):
            # a frozen parameter (MAE's sin-cos tables) takes no gradient hook: MemTracker would
            # try to install one and fail; mark it as done
            tracker._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
    # ZeroRedundancyOptimizer keeps its states in the local optimizer it wraps
    optimizer = getattr(runner.optimizer, "optim", runner.optimizer)
    if not fsdp:  # (FSDPMemTracker follows the model and optimizer it was made for)
        tracker.track_external(runner.model, *([optimizer] if optimizer else []), *(external() if external else []))
    dev = torch.device("cpu")
    after_forward: dict[str, int] = {}

    def probe() -> None:
        after_forward.update(_category_bytes(tracker.get_tracker_snapshot("current"), dev))

    with tracker:
        # MemTracker follows one forward per module: a micro-step's is forgotten before the next
        # (the step's peak is kept)
        runner.step(probe, between=tracker.reset_mod_stats)
    peak = _category_bytes(tracker.get_tracker_snapshot("peak"), dev)
    # FSDPMemTracker's categories: the sharded and unsharded parameters are weights, the
    # sharded and unsharded gradients gradients, its collectives' buffers temporaries
    return MeasuredMemory(
        device="cpu",
        peak_bytes=peak.get("Total", 0),
        weights_bytes=peak.get("PARAM", 0) + peak.get("BUFFER", 0) + peak.get("SHARDED_PARAM", 0)
        + peak.get("UNSHARDED_PARAM", 0),
        gradients_bytes=peak.get("GRAD", 0) + peak.get("SHARDED_GRAD", 0) + peak.get("UNSHARDED_GRAD", 0),
        optimizer_bytes=peak.get("OPT", 0),
        activations_bytes=peak.get("ACT", 0),
        temporaries_bytes=peak.get("TEMP", 0) + peak.get("OTH", 0) + peak.get("ALL_GATHER", 0)
        + peak.get("REDUCE_SCATTER", 0),
        saved_after_forward_bytes=after_forward.get("ACT", 0),
        output_bytes=runner.output_bytes,
        traced=traced,
        extra={"peak_snapshot": peak, "after_forward": after_forward},
    )


def measure_cuda(spec: ViTSpec, workload: Workload, warmup: int = 2, model=None) -> MeasuredMemory:
    """Peak allocated bytes of one steady-state step on the current CUDA device.

    ``weights_bytes`` is what the allocator holds once the model is built; ``extra`` has the
    allocator's reserved peak, what it holds between steps, and the device's memory that no
    allocator counter sees (the CUDA context, library workspaces, other processes).
    """
    if not torch.cuda.is_available():
        raise MeasurementError("--device cuda was asked for, but torch sees no CUDA device")
    torch.cuda.init()
    free_before, total = torch.cuda.mem_get_info()
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    reserved_at_start = torch.cuda.memory_reserved()
    runner = build_runner(spec, workload, "cuda", model=model)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated() - start
    for _ in range(max(warmup, 1)):  # optimizer states and cuBLAS workspaces are created lazily
        runner.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() - start
    runner.step()
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    reserved = torch.cuda.max_memory_reserved()
    allocated = torch.cuda.max_memory_allocated()
    return MeasuredMemory(
        device="cuda",
        peak_bytes=allocated - start,
        weights_bytes=weights,
        extra={
            "max_memory_reserved": reserved,
            "max_memory_allocated": allocated,
            "allocated_at_step_start": base,
            "device_name": torch.cuda.get_device_name(),
            "total_bytes": total,
            "non_allocator_bytes": total - free_after - torch.cuda.memory_reserved(),
            "free_before_bytes": free_before,
            "reserved_at_start": reserved_at_start,
        },
    )


def count_macs(model: "torch.nn.Module", spec: ViTSpec, training: bool = True) -> TracedCounts:
    """Parameters, and forward (and forward + backward) MACs per image of ``model``.

    ``model`` must be on the meta device: FlopCounterMode counts there with no memory (and,
    unlike the CPU flash kernel, gives SDPA its matmul FLOPs). Batch 1; MACs = FLOPs / 2.
    """
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        x = torch.randn(1, *([spec.frames] if spec.video else []), spec.channels, spec.image_h, spec.image_w)
        y = torch.zeros(1, dtype=torch.long)
    model = model.to(dtype=torch.float32)
    counter = FlopCounterMode(display=False)
    model.eval()
    with torch.device("meta"), counter, torch.no_grad():  # tensors the forward makes: on meta too
        logits(model(x))
    forward = counter.get_total_flops() // 2
    train = 0
    if training:
        model.train()
        counter = FlopCounterMode(display=False)
        with torch.device("meta"), counter:
            out = model(x)
            if spec.mae is not None:
                loss = out.loss
            elif spec.distillation:  # both heads, each its loss
                loss = _loss(out, torch.zeros(2, 1, dtype=torch.long))
            else:
                loss = _loss(logits(out), y)
            del out
            loss.backward()
        train = counter.get_total_flops() // 2
    return TracedCounts(params=params, forward_macs=forward, training_macs=train)


def count_forward_macs(spec: ViTSpec, attention: str = "eager", device: str = "meta") -> int:
    """Forward MACs of the reference model per image, from FlopCounterMode (FLOPs / 2).

    Counted on the meta device (no memory), batch 1, with eager attention by default:
    FlopCounterMode counts the CPU SDPA kernel as zero FLOPs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device(device):
        model = build_model(spec, attention=attention)
        x = torch.randn(1, *([spec.frames] if spec.video else []), spec.channels, spec.image_h, spec.image_w)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def count_params(spec: ViTSpec) -> int:
    """``sum(p.numel())`` of the spec's model, built on the meta device."""
    with torch.device("meta"):
        model = build_model(spec)
    return sum(p.numel() for p in model.parameters())


def on_meta(make: Callable[[], "torch.nn.Module"]) -> "torch.nn.Module":
    """Call ``make()`` with the meta device as default: its parameters take no memory."""
    with torch.device("meta"):
        return make()


def cuda_available() -> bool:
    return torch.cuda.is_available()


def torch_version() -> str:
    return torch.__version__


# --- time --------------------------------------------------------------------------------------


def time_steps(spec: ViTSpec, workload: Workload, device: str = "cpu", warmup: int = 1, repeats: int = 3,
               model=None) -> list[float]:
    """Seconds of ``repeats`` steady-state steps, each timed alone: wall clock on the CPU, CUDA
    events on a GPU (after ``warmup`` steps, which make the optimizer's states and warm the
    caches). Nothing observes the step while it runs (no MemTracker)."""
    import time

    runner = build_runner(spec, workload, device, model=model)
    data = make_batch(spec, workload, device)  # made once, outside the timed steps, as a loader's would be
    for _ in range(max(warmup, 1)):
        runner.step(batch=data)
    seconds = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            runner.step(batch=data)
            end.record()
            torch.cuda.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            runner.step(batch=data)
            seconds.append(time.perf_counter() - t0)
    return seconds


def _best_seconds(fn: Callable[[], None], repeats: int) -> float:
    import time

    fn()  # warm
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# Matmul shapes the probe times, as a ViT step runs them: (rows, in, out) of the linears of
# ViT-Ti/S/B at small batches, each forward (x @ W^T), input gradient (g @ W) and weight
# gradient (g^T @ x); and the attention bmm of 197 tokens. The best rate is the machine's peak;
# the median over the shapes, of it, is its matmul efficiency.
PROBE_LINEARS = ((394, 192, 576), (394, 192, 768), (394, 768, 192), (1576, 768, 3072), (394, 768, 768),
                 (788, 384, 1536))
PROBE_BMM = ((12, 197, 64),)

# Pointwise operators the probe times (elements per second on this machine): on a CPU their
# arithmetic (erf, exp, a row's statistics) can take longer than their bytes.
POINTWISE = ("gelu", "gelu_backward", "silu", "silu_backward", "softmax", "softmax_backward", "layer_norm",
             "layer_norm_backward")


def _pointwise(op: str, dtype) -> tuple[Callable[[], None], int]:
    """A call of ``op`` on a ViT-Ti-sized operand at batch 2, and the elements it computes."""
    aten = torch.ops.aten
    if op in ("gelu", "gelu_backward", "silu", "silu_backward"):
        x, g = torch.randn(394, 768, dtype=dtype), torch.randn(394, 768, dtype=dtype)
        fn = {"gelu": lambda: F.gelu(x), "gelu_backward": lambda: aten.gelu_backward(g, x),
              "silu": lambda: F.silu(x) * g, "silu_backward": lambda: aten.silu_backward(g, x) * g}[op]
        return fn, x.numel()
    if op in ("softmax", "softmax_backward"):
        x = torch.randn(6, 197, 197, dtype=dtype)
        y = x.softmax(-1)
        fn = (lambda: x.softmax(-1)) if op == "softmax" else (lambda: aten._softmax_backward_data(y, y, -1, dtype))
        return fn, x.numel()
    x, g = torch.randn(394, 192, dtype=dtype), torch.randn(394, 192, dtype=dtype)
    w, b = torch.ones(192, dtype=dtype), torch.zeros(192, dtype=dtype)
    out, mean, rstd = aten.native_layer_norm(x, [192], w, b, 1e-6)
    if op == "layer_norm":
        return (lambda: aten.native_layer_norm(x, [192], w, b, 1e-6)), x.numel()
    return (lambda: aten.native_layer_norm_backward(g, x, [192], mean, rstd, w, b, [True, True, True])), x.numel()


def _round_robin(cases: list[tuple[str, Callable[[], Any], float]], rounds: int) -> dict[str, float]:
    """Work per second of each case, timed as a step meets its operators: each round runs every
    case once, in turn, so no case finds its operands hot from its own previous call (the
    fastest round of each counts, as the fastest of a configuration's steps does)."""
    import time

    for _, fn, _ in cases:
        fn()  # warm
    best = {key: float("inf") for key, _, _ in cases}
    for _ in range(rounds):
        for key, fn, _ in cases:
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    return {key: work / best[key] for key, _, work in cases}


def probe_cpu(repeats: int = 5) -> dict[str, Any]:
    """This machine's matmul rates (fp32, bf16) over :data:`PROBE_LINEARS` and
    :data:`PROBE_BMM`, a fused attention kernel's rate and the pointwise operators' rates in
    each dtype (all timed in turn, :func:`_round_robin`), its copy bandwidth, and the cost of one
    operator on PyTorch's parallel path."""
    import statistics

    figures: dict[str, Any] = {"threads": torch.get_num_threads(), "pointwise": {}}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cases: list[tuple[str, Callable[[], Any], float]] = []
        for m, k, n in PROBE_LINEARS:
            x, w, g = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(m, n, dtype=dtype)
            flops = 2 * m * k * n
            cases += [(f"mm {m}x{k}x{n} forward", lambda x=x, w=w: F.linear(x, w), flops),
                      (f"mm {m}x{k}x{n} input grad", lambda g=g, w=w: g @ w, flops),
                      (f"mm {m}x{k}x{n} weight grad", lambda g=g, x=x: g.t() @ x, flops)]
        for b, n, d in PROBE_BMM:
            q, kt, a = torch.randn(b, n, d, dtype=dtype), torch.randn(b, d, n, dtype=dtype), torch.randn(b, n, n, dtype=dtype)
            cases += [(f"mm {b}x{n}x{d} scores", lambda q=q, kt=kt: torch.bmm(q, kt), 2 * b * n * n * d),
                      (f"mm {b}x{n}x{d} values", lambda a=a, q=q: torch.bmm(a, q), 2 * b * n * n * d)]
        qa = torch.randn(2, 3, 197, 64, dtype=dtype)
        cases.append(("attention", lambda qa=qa: F.scaled_dot_product_attention(qa, qa, qa), 4 * 2 * 3 * 197 * 197 * 64))
        size = torch.empty((), dtype=dtype).element_size()
        for op in POINTWISE:
            fn, elems = _pointwise(op, dtype)
            cases.append((f"{op}/{size}", fn, elems))
        rates = _round_robin(cases, repeats)
        matmuls = [v for key, v in rates.items() if key.startswith("mm ")]
        peak = max(matmuls)
        figures[f"{name}_flops_per_s"] = peak
        figures[f"{name}_efficiency"] = statistics.median(matmuls) / peak
        figures[f"{name}_attention_efficiency"] = min(1.0, rates["attention"] / peak)
        figures["pointwise"].update({f"{op}/{size}": rates[f"{op}/{size}"] for op in POINTWISE})
    src = torch.empty(32 * 2**20, dtype=torch.float32)  # 128 MiB: far past the caches
    dst = torch.empty_like(src)
    figures["bandwidth_bytes_per_s"] = 2 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), repeats)
    small = torch.zeros(65536)  # past at::internal::GRAIN_SIZE (32,768): on the parallel path, as a step's ops are
    calls = 500
    figures["op_seconds"] = _best_seconds(lambda: [small.add_(1) for _ in range(calls)], repeats) / calls
    return figures
