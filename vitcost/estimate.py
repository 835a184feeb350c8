"""Compose the counts and the memory replay into one report, and fit it to a GPU.

Pure: no torch, typer or rich. ``Report.to_dict()`` is the JSON the CLI prints
(schema in docs/json-schema.md); every key carries its unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, Callable, Optional

from vitcost import formulas, kernels, memory, timing
from vitcost.replay import MemoryResult
from vitcost.program import candidate_totals, config_key, estimate_memory, peak_at
from vitcost.specs import Checkpointing, Device, PosEmbed, Precision, ViTSpec, Workload

SCHEMA_VERSION = 1

SEARCH_GPUS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # GPU counts tried where a step does not fit
# strategies tried there (hsdp needs nodes: it is fsdp within each)
SEARCH_STRATEGIES = ("ddp", "zero1", "zero2", "fsdp")

# The dtype a profile's peak rate is read for: autocast runs its matmuls low; plain fp32
# matmuls do not use TF32 unless torch.backends.cuda.matmul.allow_tf32 is set.
_MATMUL_DTYPE = {
    Precision.fp32: "fp32",
    Precision.bf16: "bf16",
    Precision.fp16: "fp16",
    Precision.amp_bf16: "bf16",
    Precision.amp_fp16: "fp16",
}


@dataclass(frozen=True)
class GPUFit:
    """How a workload sits on a GPU profile (per GPU; ``gpus`` > 1 is plain data parallel).

    The fit rests on the caching allocator (``vitcost.fit``): a batch fits when every segment
    the allocator asks ``cudaMalloc`` for over a first and the steady steps fits in ``usable_memory_bytes``
    (the GPU's memory less the CUDA context and the library workspaces). The allocator's
    figures (``fits``, ``max_batch_size``, ``peak_reserved_bytes``) are worked out when first
    read, by ``solver``.
    """

    name: str
    requested: str
    display_name: str
    gpus: int
    memory_bytes: int
    context_bytes: int
    workspace_bytes: int
    usable_memory_bytes: int
    usable_memory_source: str
    allocator: str
    per_gpu_batch: int
    ddp_bucket_bytes: int
    peak_bytes: int
    matmul_dtype: str
    peak_flops_per_s: float
    matmul_efficiency: float
    step_seconds_lower_bound: float
    solver: Any = field(repr=False, compare=False, default=None)
    grad_accum: int = 1

    @cached_property
    def fits(self) -> bool:
        return self.solver.fits()

    @cached_property
    def max_batch_size(self) -> int:
        """Global: the per-GPU maximum times the number of GPUs (and of micro-steps)."""
        return self.solver.max_batch() * self.gpus * self.grad_accum

    @cached_property
    def peak_reserved_bytes(self) -> int:
        """``max_memory_reserved`` of the step on this GPU (where it does not fit: what the
        allocator would reserve with memory to spare)."""
        return self.solver.peak_reserved()

    @property
    def headroom_bytes(self) -> int:
        """Usable memory left at the reserved peak."""
        return self.usable_memory_bytes - self.peak_reserved_bytes


@dataclass(frozen=True)
class RunOptions:
    """What the time half is asked beyond the step: TF32 for fp32 matmuls, and a run."""

    tf32: bool = False
    epochs: Optional[float] = None
    dataset_size: Optional[int] = None
    price_per_gpu_hour: Optional[float] = None


# What MFU counts, said once for the JSON and the table.
MFU_COUNTS = ("model FLOPs (2 x the MACs of every matmul and attention product of the forward, and of "
              "the backward when training; a checkpoint's recompute not counted) per second, over the "
              "matmul dtype's dense peak")


@dataclass(frozen=True)
class TimeReport:
    """A step's time on a device (per GPU: every GPU runs its share at once)."""

    step: timing.StepTime
    global_batch: int
    gpus: int
    matmul_dtype: str
    peak_flops_per_s: float
    model_flops_per_step: int  # per GPU
    run: Optional[timing.RunCost] = None
    options: RunOptions = RunOptions()
    device: str = "cuda"  # what the rates describe: a GPU, or a CPU ('vitcost probe')
    calibrated: Optional[str] = None  # where a measured step-time ratio came from, if one was applied

    @property
    def step_seconds(self) -> float:
        return self.step.step_seconds

    @property
    def samples_per_s(self) -> float:
        return self.global_batch / self.step.step_seconds

    @property
    def mfu(self) -> float:
        return self.model_flops_per_step / self.step.step_seconds / self.peak_flops_per_s

    def to_dict(self) -> dict[str, Any]:
        run = self.run
        return {
            "step_seconds": self.step_seconds,
            "samples_per_s": self.samples_per_s,
            "mfu": self.mfu,
            "mfu_counts": MFU_COUNTS,
            "model_flops_per_step": self.model_flops_per_step,
            "matmul_dtype": self.matmul_dtype,
            "peak_flops_per_s": self.peak_flops_per_s,
            "device": self.device,
            "calibrated": self.calibrated,
            "breakdown_seconds": dict(self.step.breakdown_seconds),
            "phase_seconds": dict(self.step.phase_seconds),
            "launches": self.step.launches,
            "allreduce_seconds": self.step.allreduce_seconds,
            "allreduce_overlapped_with_backward": bool(self.step.allreduce_seconds),
            "allgather_seconds": self.step.allgather_seconds,
            "fsdp_allgather_seconds": self.step.fsdp_gather_seconds,
            "fsdp_reduce_scatter_seconds": self.step.fsdp_reduce_seconds,
            "epochs": self.options.epochs,
            "dataset_size": self.options.dataset_size,
            "steps": run.steps if run else None,
            "run_seconds": run.run_seconds if run else None,
            "run_gpu_hours": run.run_gpu_hours if run else None,
            "price_per_gpu_hour": self.options.price_per_gpu_hour,
            "run_cost": run.run_cost if run else None,
        }


def fsdp_traffic(spec: ViTSpec, wl: Workload, replica_rates: Optional[timing.Rates] = None) -> timing.FsdpTraffic:
    """What FSDP's collectives move in one micro-step: the parameters all-gathered in the
    dtype the step computes on them (their own under autocast; bf16 or fp16 under
    ``MixedPrecisionPolicy``), the gradients reduce-scattered in the optimizer's (fp32 under
    it). ``replica_rates``: HSDP's all-reduce across the replica groups (its ``gpus`` the
    replicas, its bandwidth one GPU's link out of the node)."""
    fs = memory.fsdp_buffers(spec, wl, round_to=1)
    replica = 0.0
    if replica_rates is not None and wl.replicas > 1:
        replica = timing.allreduce_seconds(fs.sharded_grad_bytes, replica_rates)
    return timing.FsdpTraffic(gather_bytes=fs.root.flat + spec.depth * fs.block.flat, regather=fs.reshards,
                              reduce_bytes=fs.root.reduce_in + spec.depth * fs.block.reduce_in,
                              root_gather_bytes=fs.root.flat, root_reduce_bytes=fs.root.reduce_in,
                              replica_seconds=replica)


def estimate_time(spec: ViTSpec, wl: Workload, rates: timing.Rates, matmul_dtype: str, global_batch: int,
                  options: RunOptions = RunOptions(), calibrated: Optional[str] = None,
                  replica_rates: Optional[timing.Rates] = None) -> TimeReport:
    """Price the step's kernels on ``rates``; raises ``kernels.NotModelled`` where there is no
    kernel list. Under HSDP ``rates`` are one replica group's (a node's) and ``replica_rates``
    those of the all-reduce across the groups."""
    why = kernels.why_not(spec)
    if why:
        raise kernels.NotModelled(why)
    grads = 0
    if wl.training and rates.gpus > 1 and not wl.fsdp:  # what DDP all-reduces: every gradient, in the parameters' dtype
        grads = kernels.param_elements(spec) * wl.param_bytes
    gather = grads if wl.shards_optimizer else 0  # ZeRO-1 sends each rank's updated parameters to the others
    fsdp = fsdp_traffic(spec, wl, replica_rates) if wl.fsdp else None
    lines = kernels.lines(spec, wl)
    if lines is None:
        step = timing.step_time(kernels.at_batch(spec, wl), rates, grad_bytes=grads, gather_bytes=gather,
                                micro_steps=wl.grad_accum, fsdp=fsdp)
    else:
        step = timing.step_time_at(lines, wl.batch, rates, grad_bytes=grads, gather_bytes=gather,
                                   micro_steps=wl.grad_accum, fsdp=fsdp)
    gpus = rates.gpus * wl.replicas if wl.fsdp else rates.gpus
    flops = 2 * _model_macs(spec, wl) * wl.grad_accum  # = the kernels' (tests/test_time.py holds it)
    run = None
    if options.epochs is not None and options.dataset_size is not None:
        run = timing.run_cost(step.step_seconds, global_batch, gpus, options.epochs, options.dataset_size,
                              options.price_per_gpu_hour)
    return TimeReport(step=step, global_batch=global_batch, gpus=gpus, matmul_dtype=matmul_dtype,
                      peak_flops_per_s=rates.matmul_flops_per_s, model_flops_per_step=flops,
                      run=run, options=options, device="cuda" if rates.asynchronous else "cpu",
                      calibrated=calibrated)


def _model_macs(spec: ViTSpec, wl: Workload) -> int:
    """The step's model MACs: the forward's (and, training, the backward's) per image, times
    the batch, from the MAC counts (a checkpoint's recompute left out)."""
    fwd = _macs(spec)
    if not wl.training:
        return sum(fwd.values()) * wl.batch
    return sum(formulas.training_macs(fwd).values()) * wl.batch


@dataclass(frozen=True)
class Report:
    """Everything vitcost says about one configuration."""

    spec: ViTSpec
    workload: Workload
    tokens: dict[str, int]
    params: dict[str, int]
    macs_forward: dict[str, int]
    macs_training: dict[str, int]
    memory: MemoryResult
    ddp_bucket_bytes: int = 0
    gpu: Optional[GPUFit] = None
    warnings: tuple[str, ...] = field(default_factory=tuple)
    global_batch: int = 0  # the batch asked for, over every GPU (0: the workload's)
    # under a sharded strategy, each rank's replayed peak (the report's figures are the largest's
    # rank); empty when every rank holds the same (see ``rank_peaks_bytes``)
    per_rank_peak_bytes: tuple[int, ...] = ()
    nodes: int = 1  # the GPUs' nodes (the ring's slowest link is then the one between nodes)
    # the step's time, priced when first read (as the allocator's figures are): a sweep that
    # reads memory only does not pay for it
    timer: Optional[Callable[[], tuple[Optional[TimeReport], Optional[str]]]] = field(
        default=None, repr=False, compare=False)

    searcher: Optional[Callable[[], list[dict[str, Any]]]] = field(default=None, repr=False, compare=False)

    @cached_property
    def attention_maps(self) -> dict[str, int]:
        """``attention_maps_of``: worked out when first read (a block's replay), so that a
        sweep that reads memory only does not pay for it."""
        return attention_maps_of(self.spec, self.workload, self._map_bytes, self.stages)

    @cached_property
    def alternatives(self) -> Optional[list[dict[str, Any]]]:
        """Where the step does not fit its GPU: for each strategy, the fewest GPUs on which it
        does (the global batch split over them); None where it fits or there is no GPU."""
        if self.gpu is None or self.searcher is None or self.gpu.fits:
            return None
        return self.searcher()

    @cached_property
    def _timed(self) -> tuple[Optional[TimeReport], Optional[str]]:
        if self.timer is None:
            return None, "no GPU profile given (--gpu NAME prices the step)"
        return self.timer()

    @property
    def time(self) -> Optional[TimeReport]:
        """The step's time on the GPU profile; None without one (``time_reason`` says why)."""
        return self._timed[0]

    @property
    def time_reason(self) -> Optional[str]:
        """Why ``time`` is None."""
        return self._timed[1]

    @property
    def batch(self) -> int:
        """The global batch: what was asked for, over every GPU."""
        return self.global_batch or self.workload.batch

    @property
    def params_total(self) -> int:
        return sum(self.params.values())

    @property
    def macs_forward_per_image(self) -> int:
        return sum(self.macs_forward.values())

    @property
    def macs_training_per_image(self) -> int:
        return sum(self.macs_training.values())

    @property
    def peak_bytes(self) -> int:
        return self.memory.peak + self.ddp_bucket_bytes

    @property
    def memory_at_peak(self) -> dict[str, int]:
        """What is live at the peak, by the replay's categories (``replay.DETAIL``) and DDP's
        buckets (held all step): the values add up to ``peak_bytes``."""
        return {**self.memory.at_peak_detail, "ddp_buckets": self.ddp_bucket_bytes}

    @property
    def position_encoding(self) -> dict[str, Any]:
        """What the position encoding adds: parameters, fixed tables (buffers) and, for RoPE,
        the rotated q and k each block saves for backward."""
        s, w = self.spec, self.workload
        sh = memory.shapes_of(s, w)
        kind = s.pos_embed
        out = {"kind": kind.value, "params": self.params.get("pos_embed", 0),
               "buffer_bytes": memory.position_buffer_bytes(s, sh), "saved_per_block_bytes": 0}
        if s.swin is not None:  # each block's window bias table, gathered by its (M^2, M^2) index
            out.update(kind="swin-relative-bias", params=self.params.get("blocks/attn/relative_bias", 0))
        if kind == PosEmbed.rope_2d:
            out["saved_per_block_bytes"] = 2 * sh.tok_lo if w.training else 0
        elif kind == PosEmbed.relative_bias:
            out["params"] = self.params.get("blocks/attn/relative_bias", 0)
            if w.training and sh.par > sh.lo and not sh.softmax_fp32:
                # the fp32 sum makes the softmax (and what it saves) fp32, beside the matmul's copy
                out["saved_per_block_bytes"] = sh.b * sh.h * sh.n * sh.n * 4
        return out

    @property
    def patch_metrics(self) -> dict[str, Any]:
        """What the patch size buys and costs: pixels a token covers (P^2; the stride's square
        apart under overlap) and the values it reads (P^2 C), the effective resolution (the grid
        of tokens), forward MACs per pixel of the image, and the attention products' share of
        the forward MACs."""
        s = self.spec
        macs = self.macs_forward_per_image
        attention = self.macs_forward.get("blocks/attn/q_kT", 0) + self.macs_forward.get("blocks/attn/attn_v", 0)
        return {"pixels_per_token": s.patch * s.patch, "values_per_token": s.patch * s.patch * s.channels,
                "stride_pixels_per_token": s.stride * s.stride, "effective_resolution": [s.grid_h, s.grid_w],
                "macs_per_pixel": macs / (s.image_h * s.image_w * s.frames), "attention_share_of_macs": attention / macs}

    @cached_property
    def _map_bytes(self) -> list[tuple[int, int, int]]:
        """``memory.attention_map_bytes``: one block of each kind replayed, once per report."""
        return memory.attention_map_bytes(self.spec, self.workload)

    @cached_property
    def stages(self) -> Optional[list[dict[str, int]]]:
        """A Swin's stages (``stages_of``); None for the isotropic families."""
        return stages_of(self.spec, self.workload, self._map_bytes) if self.spec.swin is not None else None

    @property
    def sharding(self) -> Optional[dict[str, int]]:
        """Under zero2, fsdp and hsdp: the sizes of FSDP's buffers on a rank, each one group's."""
        if not self.workload.fsdp:
            return None
        fs = memory.fsdp_buffers(self.spec, self.workload)
        return {"shard_ranks": self.workload.shard_ranks, "replicas": self.workload.replicas,
                "sharded_param_bytes": self.memory.weights, "sharded_gradient_bytes": fs.sharded_grad_bytes,
                "root_unsharded_bytes": fs.root.unsharded, "block_allgather_bytes": fs.block.flat,
                "block_unsharded_bytes": fs.block.unsharded, "block_reduce_scatter_bytes": fs.block.reduce_in,
                "reshard_after_forward": fs.reshards}

    @property
    def rank_peaks_bytes(self) -> tuple[int, ...]:
        """Every rank's peak (DDP's buckets included), rank 0 first."""
        if self.per_rank_peak_bytes:
            return tuple(p + self.ddp_bucket_bytes for p in self.per_rank_peak_bytes)
        return (self.peak_bytes,) * self.workload.ranks

    def to_dict(self) -> dict[str, Any]:
        s, w, m = self.spec, self.workload, self.memory
        batch = self.batch
        gpu = self.gpu
        per_image_train = self.macs_training_per_image if w.training else 0
        return {
            "schema_version": SCHEMA_VERSION,
            "inputs": {
                "model": s.name,
                "image_h": s.image_h,
                "image_w": s.image_w,
                "patch": s.patch,
                "batch": batch,
                "per_gpu_batch": w.batch,
                "mode": w.mode.value,
                "precision": w.precision.value,
                "attention": w.attention.value,
                "optimizer": w.optimizer.value,
                "keep_grads": w.keep_grads,
                "checkpointing": w.checkpointing.value,
                "device": w.device.value,
                "strategy": w.strategy.value,
                "mixed_precision": w.mixed_precision,
                "grad_accum": w.grad_accum,
                "gpus": w.ranks,
                "nodes": self.nodes,
                "rank": w.rank,
                "gpu": gpu.requested if gpu else None,
                "dim": s.dim,
                "depth": s.depth,
                "heads": s.heads,
                "mlp_hidden": s.mlp_hidden,
                "channels": s.channels,
                "class_token": s.class_token,
                "dist_token": s.dist_token,
                "registers": s.registers,
                "pos_embed": s.pos_embed.value,
                "pos_embed_prefix": s.pos_embed_prefix,
                "pooling": s.pooling.value,
                "classes": s.classes,
                "qkv_bias": s.qkv_bias,
                "layer_scale": s.layer_scale,
                "impl": s.impl.value,
                "mlp": s.mlp.value,
                "drop_path": s.drop_path,
                "distillation": s.distillation,
                "frames": s.frames,
                "tubelet": s.tubelet,
                "patch_stride": s.stride,
                "mae": s.mae.model_dump() if s.mae else None,
                "swin": s.swin.model_dump(mode="json") if s.swin else None,
            },
            "tokens": dict(self.tokens),
            "stages": self.stages,
            "patch_metrics": self.patch_metrics,
            "params": {**self.params, "total": self.params_total},
            "macs": {
                "forward_per_image": self.macs_forward_per_image,
                "forward_per_batch": self.macs_forward_per_image * batch,
                "forward_by_component": dict(self.macs_forward),
                "training_per_image": per_image_train,
                "training_per_step": per_image_train * batch,
                "training_by_component": dict(self.macs_training) if w.training else {},
            },
            "flops": {
                "forward_per_image": 2 * self.macs_forward_per_image,
                "training_per_image": 2 * per_image_train,
                "training_per_step": 2 * per_image_train * batch,
            },
            "attention_maps": dict(self.attention_maps),
            "memory_bytes": {
                "weights": m.weights,
                "gradients": m.gradients,
                "optimizer_states": m.optimizer_states,
                "inputs": m.inputs,
                "activations": m.activations,
                "autocast_weight_copies": m.autocast_copies,
                "transient": m.transient,
                "ddp_buckets": self.ddp_bucket_bytes,
                "peak": self.peak_bytes,
                "peak_reserved": gpu.peak_reserved_bytes if gpu else None,
            },
            "memory_bytes_at_peak": self.memory_at_peak,
            "activations_bytes_by_component": dict(m.saved_by_component),
            "peak": {"phase": m.peak_phase, "at_peak_bytes": dict(m.at_peak)},
            "per_rank_peak_bytes": list(self.rank_peaks_bytes) if self.per_rank_peak_bytes else None,
            "sharding": self.sharding,
            "position_encoding": self.position_encoding,
            "gpu": None if gpu is None else {
                "name": gpu.name,
                "requested": gpu.requested,
                "display_name": gpu.display_name,
                "gpus": gpu.gpus,
                "per_gpu_batch": gpu.per_gpu_batch,
                "memory_bytes": gpu.memory_bytes,
                "cuda_context_bytes": gpu.context_bytes,
                "library_workspace_bytes": gpu.workspace_bytes,
                "usable_memory_bytes": gpu.usable_memory_bytes,
                "usable_memory_source": gpu.usable_memory_source,
                "allocator": gpu.allocator,
                "matmul_dtype": gpu.matmul_dtype,
                "peak_flops_per_s": gpu.peak_flops_per_s,
                "matmul_efficiency": gpu.matmul_efficiency,
                "step_seconds_lower_bound": gpu.step_seconds_lower_bound,
            },
            "fits": gpu.fits if gpu else None,
            "headroom_bytes": gpu.headroom_bytes if gpu else None,
            "max_batch_size": gpu.max_batch_size if gpu else None,
            "time": self.time.to_dict() if self.time else None,
            "alternatives": self.alternatives,
            "time_reason": self.time_reason,
            "warnings": list(self.warnings),
        }


def _kept_or_alive(workload: Workload, map_bytes: list[tuple[int, int, int]]) -> list[int]:
    """Per kind of block, the bytes its maps are counted at: kept for backward by a forward
    that saves, else the most alive at once."""
    return [kept if workload.saves_activations else most for _, kept, most in map_bytes]


def stages_of(spec: ViTSpec, workload: Workload,
              map_bytes: Optional[list[tuple[int, int, int]]] = None) -> Optional[list[dict[str, int]]]:
    """A Swin's stages: blocks, width, heads, grid and tokens, the window (M x M, clamped to the
    grid as Hugging Face does) and the shift, windows per image, attention-map elements of one
    block per image (heads x windows x N^2, N = M^2), and the bytes the replay gives one
    block's maps for the batch (``attention_maps_of``'s rule). None for the isotropic families."""
    if spec.swin is None:
        return None
    from vitcost.swin import stages

    maps = _kept_or_alive(workload, map_bytes or memory.attention_map_bytes(spec, workload))
    return [{"stage": st.index + 1, "blocks": st.depth, "dim": st.dim, "heads": st.heads, "grid_h": st.grid_h,
             "grid_w": st.grid_w, "tokens": st.tokens, "window": st.window, "shift": st.shift,
             "windows": st.windows, "window_tokens": st.window_tokens,
             "attention_elements_per_block": st.attention_elements,
             "attention_bytes_per_block": block_maps,
             "merges_to_dim": 2 * st.dim if st.merges else 0}
            for st, block_maps in zip(stages(spec), maps)]


def tokens_of(spec: ViTSpec) -> dict[str, int]:
    return {
        "grid_h": spec.grid_h,
        "grid_w": spec.grid_w,
        "patches": spec.patch_tokens,
        "prefix": spec.prefix_tokens,
        "total": spec.tokens,
    }


def attention_maps_of(spec: ViTSpec, workload: Workload, map_bytes: Optional[list[tuple[int, int, int]]] = None,
                      stages: Optional[list[dict[str, int]]] = None) -> dict[str, int]:
    """One head's and one layer's attention maps (a Swin's over its windows: per head all of
    a block's windows, per layer the largest stage's block), and the bytes the step gives
    them as the replay allocates them (``memory.attention_map_bytes``): per layer what is kept
    for backward when training (alive at once under no_grad or in a checkpointed block), in
    every layer together; 0 where a fused kernel keeps none."""
    blocks = map_bytes or memory.attention_map_bytes(spec, workload)
    per_layer = _kept_or_alive(workload, blocks)
    if spec.swin is not None:
        stages = stages or stages_of(spec, workload, blocks)
        top = max(stages, key=lambda st: st["attention_elements_per_block"])
        per_head, per_layer_elements = top["attention_elements_per_block"] // top["heads"], \
            top["attention_elements_per_block"]
    else:
        per_head = formulas.attention_map_elements(spec.tokens)
        per_layer_elements = spec.heads * per_head
    return {
        "elements_per_head": per_head,
        "elements_per_layer": per_layer_elements,
        "bytes_per_layer": max(per_layer),
        "bytes_all_layers": sum(depth * b for (depth, _, _), b in zip(blocks, per_layer))
        if workload.saves_activations else max(per_layer),
    }


def ddp_bucket_bytes(report_memory: MemoryResult, gpus: int, workload: Workload) -> int:
    """DistributedDataParallel's gradient buckets: a flat copy of every gradient, held for
    the whole run (``gradient_as_bucket_view=False``, the default). FSDP has none."""
    if gpus <= 1 or not workload.training or workload.fsdp:
        return 0
    return report_memory.gradients


def build_report(spec: ViTSpec, workload: Workload, gpus: int = 1, warnings: tuple[str, ...] = (),
                 fit: Optional[Callable[[int, int, int], GPUFit]] = None, global_batch: int = 0,
                 time: Optional[Callable[[], tuple[Optional[TimeReport], Optional[str]]]] = None,
                 per_rank_peak_bytes: tuple[int, ...] = (), nodes: int = 1,
                 search: Optional[Callable[[], list[dict[str, Any]]]] = None) -> Report:
    """Counts and memory for one configuration; ``workload.batch`` is per GPU. ``fit``, given
    the step's peak bytes, its DDP bucket bytes and its MACs per image, places it on a GPU."""
    fwd = _macs(spec)
    train = formulas.training_macs(fwd, recompute_blocks=workload.checkpointing == Checkpointing.full,
                                   recompute_fc2=spec.layer_scale)
    memory = estimate_memory(spec, workload)
    ddp = ddp_bucket_bytes(memory, gpus, workload)
    gpu = None
    if fit is not None:
        gpu = fit(memory.peak + ddp, ddp, sum((train if workload.training else fwd).values()))
    return Report(
        spec=spec,
        workload=workload,
        tokens=tokens_of(spec),
        params=_params(spec),
        macs_forward=fwd,
        macs_training=train,
        memory=memory,
        ddp_bucket_bytes=ddp,
        gpu=gpu,
        warnings=warnings,
        global_batch=global_batch,
        timer=time,
        per_rank_peak_bytes=per_rank_peak_bytes,
        nodes=nodes,
        searcher=search,
    )


@lru_cache(maxsize=4096)
def _macs(spec: ViTSpec) -> dict[str, int]:
    return formulas.mac_counts(spec)


@lru_cache(maxsize=4096)
def _params(spec: ViTSpec) -> dict[str, int]:
    return formulas.param_counts(spec)


def peak_bytes(spec: ViTSpec, workload: Workload, batch: int) -> int:
    """Peak of one step at another batch size (per GPU)."""
    return peak_at(spec, workload, batch)


def _lines(spec: ViTSpec, workload: Workload) -> tuple[tuple[int, int], ...]:
    """The totals that can be the peak, each as ``a + m * batch``, read at two batches.

    From batch 2 on a configuration's tensors are the same at every batch; on the CPU its
    totals are affine in the batch, so the lines are exact; on CUDA the 512-byte rounding
    makes them nearly so, and they are read at large batches where it matters least. Either
    way they only give the first guess: exact peaks decide.
    """
    b1, b2 = (2, 3) if workload.device == Device.cpu else (256, 512)
    t1, t2 = candidate_totals(spec, workload, b1, b2)
    return tuple((x1 - (x2 - x1) // (b2 - b1) * b1, (x2 - x1) // (b2 - b1)) for x1, x2 in zip(t1, t2))


_MAX_BATCH: dict[tuple, int] = {}
_MAX_BATCH_ENTRIES = 1 << 16
_UNBOUNDED = 1 << 31  # the answer when nothing grows with the batch


def max_batch_size(spec: ViTSpec, workload: Workload, budget_bytes: int) -> int:
    """Largest per-GPU batch whose peak fits in ``budget_bytes`` (0 if not even one image).

    The answer does not depend on the batch asked about: it is worked out once per
    configuration without its batch (and budget), and kept.
    """
    key = config_key(spec, workload) + (budget_bytes,)
    found = _MAX_BATCH.get(key)
    if found is None:
        if len(_MAX_BATCH) >= _MAX_BATCH_ENTRIES:
            _MAX_BATCH.clear()
        found = _MAX_BATCH[key] = _max_batch_size(spec, workload, budget_bytes)
    return found


def _max_batch_size(spec: ViTSpec, workload: Workload, budget_bytes: int) -> int:
    def fits(batch: int) -> bool:
        return peak_at(spec, workload, batch) <= budget_bytes

    if budget_bytes <= 0 or not fits(1):
        return 0
    lines = _lines(spec, workload)
    guess = min(((budget_bytes - a) // m for a, m in lines if m > 0), default=None)
    if guess is None:
        return _UNBOUNDED if fits(2) else 1
    best = min(max(guess, 1), _UNBOUNDED)
    if not fits(best):  # the guess overshot: the answer is below it
        return _bisect(fits, 1, best)
    if fits(best + 1):  # it fell short: gallop up
        lo, hi = best + 1, best * 2 + 2
        while hi < _UNBOUNDED and fits(hi):
            lo, hi = hi, hi * 2
        return _bisect(fits, lo, hi) if hi < _UNBOUNDED else lo
    return best


def _bisect(fits, lo: int, hi: int) -> int:
    """The largest batch in [lo, hi) that fits, given that ``lo`` fits and ``hi`` does not."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo

