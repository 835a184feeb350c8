"""The Python API: ``vitcost.plan(...)`` and ``vitcost.compare(...)``.

The CLI is a thin layer over these two functions: same names, same options, and the
report they return is what it renders.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Union

from vitcost.errors import ConfigError, shorten
from vitcost.estimate import (_MATMUL_DTYPE, SEARCH_GPUS, SEARCH_STRATEGIES, GPUFit, Report, RunOptions, TimeReport, build_report,
                              estimate_time)
from vitcost import timing
from vitcost.kernels import NotModelled
from vitcost.program import estimate_memory
from vitcost.fit import ALLOCATORS, Solver
from vitcost.presets import build_spec, resolve_model
from vitcost.specs import FSDP_STRATEGIES, ViTSpec, Workload, make_workload

if TYPE_CHECKING:
    from vitcost.resolution import TransferReport

ImageSize = Union[int, str, tuple[int, int], None]

BACKBONE_TRAINING_CLASSES = 1000  # timm's num_classes when a backbone is fine-tuned with a head

_ARCH_KEYS = (
    "dim", "depth", "heads", "mlp_hidden", "mlp_ratio", "channels", "class_token", "dist_token",
    "registers", "pos_embed", "pos_embed_prefix", "pooling", "classes", "qkv_bias", "layer_scale",
    "impl", "mask_token", "mae", "mlp", "frames", "tubelet", "drop_path", "distillation", "pos_grid",
    "patch_stride", "swin", "window",
)


def parse_image(image: ImageSize) -> Optional[tuple[int, int]]:
    """``384``, ``"384"``, ``"384x256"`` (height x width) or ``(384, 256)``."""
    if image is None:
        return None
    if isinstance(image, tuple):
        h, w = image
    elif isinstance(image, int):
        h = w = image
    else:
        text = str(image)
        m = re.fullmatch(r"\s*(-?[0-9]{1,9})\s*(?:[xX*]\s*(-?[0-9]{1,9}))?\s*", text)
        if not m:
            raise ConfigError(f"--image {shorten(text, quote=True)}: expected a size like 384 or 384x256")
        h = int(m.group(1))
        w = int(m.group(2)) if m.group(2) else h
    if h <= 0 or w <= 0:
        raise ConfigError(f"--image {h}x{w}: sizes must be positive")
    return h, w


def make_model_spec(model: Optional[str] = "vit-b", *, image: ImageSize = None, patch: Optional[int] = None,
                    strict: bool = False, **arch: Any) -> tuple[ViTSpec, tuple[str, ...]]:
    """The architecture from a preset or timm-style name plus explicit overrides.

    A spec is immutable and a pure function of these arguments, so the same arguments give
    the same (validated once) spec.
    """
    key = (model, image, patch, strict, tuple(sorted(arch.items())))
    try:
        hash(key)
    except TypeError:  # an unhashable argument (a list for an image, say): build it anew
        return _make_model_spec(model, image, patch, strict, arch)
    return _cached_model_spec(key)


@lru_cache(maxsize=1024)
def _cached_model_spec(key: tuple) -> tuple[ViTSpec, tuple[str, ...]]:
    model, image, patch, strict, arch = key
    return _make_model_spec(model, image, patch, strict, dict(arch))


def _make_model_spec(model: Optional[str], image: ImageSize, patch: Optional[int], strict: bool,
                     arch: dict[str, Any]) -> tuple[ViTSpec, tuple[str, ...]]:
    unknown = set(arch) - set(_ARCH_KEYS)
    if unknown:
        raise ConfigError(f"unknown model option(s): {', '.join(sorted(unknown))}")
    if patch is not None and patch <= 0:
        raise ConfigError(f"--patch {patch}: the patch size must be a positive number of pixels")
    overrides: dict[str, Any] = {k: v for k, v in arch.items() if v is not None}
    size = parse_image(image)
    if size:
        overrides["image_h"], overrides["image_w"] = size
    if patch is not None:
        overrides["patch"] = patch
    if model is None and not {"dim", "depth", "heads"} <= overrides.keys():
        model = "vit-b"
    spec = build_spec(model, overrides=overrides)
    if spec.impl.value == "hf":
        if overrides.get("pos_embed_prefix") is False:
            raise ConfigError("--no-pos-embed-prefix with --impl hf: Hugging Face's models give the class "
                              "token a position (and registers none)")
        # Hugging Face's layer with LayerScale is DINOv2's: its classifier reads the class token
        # and the patch tokens' mean, and the model has a mask token, unless told otherwise
        hf = {"pooling": "token+avg", "mask_token": True} if spec.layer_scale else {}
        spec = build_spec(model, overrides={**hf, **overrides, "pos_embed_prefix": True})
    warnings: list[str] = []
    if not spec.divisible:
        over = spec.patch - spec.stride
        lost_h, lost_w = (spec.image_h - over) % spec.stride, (spec.image_w - over) % spec.stride
        what = f"patch {spec.patch}" if not spec.patch_stride else f"patch {spec.patch} at stride {spec.stride}"
        msg = (f"image {spec.image_h}x{spec.image_w} is not divisible by {what}: "
               f"the conv patch embedding drops the last {lost_h} rows and {lost_w} columns "
               f"({spec.grid_h}x{spec.grid_w} patches)")
        if strict:
            raise ConfigError(msg + " (--strict)")
        warnings.append(msg)
    return spec, tuple(warnings)


def plan(
    model: Optional[str] = None,
    *,
    image: ImageSize = None,
    patch: Optional[int] = None,
    batch: int = 8,
    mode: str = "train",
    precision: str = "amp-bf16",
    attention: str = "sdpa",
    optimizer: str = "adamw",
    keep_grads: bool = False,
    checkpointing: str = "none",
    strategy: str = "ddp",
    gpus: Optional[int] = None,
    nodes: Optional[int] = None,
    grad_accum: int = 1,
    mixed_precision: bool = False,
    gpu: Optional[str] = None,
    device: Optional[str] = None,
    allocator: str = "native",
    strict: bool = False,
    hf_config: Optional[str] = None,
    tf32: bool = False,
    epochs: Optional[float] = None,
    dataset_size: Optional[int] = None,
    price_per_gpu_hour: Optional[float] = None,
    **arch: Any,
) -> Report:
    """Tokens, parameters, MACs, attention maps and memory of one configuration.

    ``batch`` is the global batch: on a multi-GPU profile each GPU runs its share under
    plain data parallel. ``device`` picks the replay's rules (``cuda``: autocast's CUDA
    policy and 512-byte allocator blocks; ``cpu``: what a CPU run allocates); it defaults to
    ``cuda``. With ``gpu`` (a profile name or YAML path) the report says whether the step fits
    and the largest batch that does, on the caching allocator's rules (``allocator``:
    ``native``, or ``expandable`` for ``expandable_segments:True``). ``hf_config``: a Hugging
    Face ``config.json`` as the architecture, run by Hugging Face's code; explicit options
    override what it says. With a profile that has a ``time`` section the step is priced
    (``tf32``: fp32 matmuls on TF32 tensor cores); ``epochs`` over ``dataset_size`` samples
    give a run's wall time and GPU-hours, ``price_per_gpu_hour`` its cost. ``mixed_precision``:
    under zero2, fsdp and hsdp, FSDP's ``MixedPrecisionPolicy`` (``param_dtype`` the precision's,
    ``reduce_dtype`` fp32): fp32 sharded weights, gradients and states, bf16 or fp16 compute.
    """
    run = run_options(tf32, epochs, dataset_size, price_per_gpu_hour)
    explicit_classes = arch.get("classes")
    notes: tuple[str, ...] = ()
    name = None
    if hf_config is not None:
        model, image, patch, arch, notes, name = _from_hf_config(hf_config, model, image, patch, arch)
    spec, warnings = make_model_spec(model, image=image, patch=patch, strict=strict, **arch)
    if name:
        spec = spec.model_copy(update={"name": name})
    warnings = notes + warnings
    if mode == "train" and not spec.classes and explicit_classes is None and spec.mae is None:
        # a feature backbone (DINOv2) has no loss of its own: train it as timm would fine-tune it
        spec = spec.model_copy(update={"classes": BACKBONE_TRAINING_CLASSES})
        on = "the class token and the patch tokens' mean" if spec.pooling.value == "token+avg" else "the class token"
        warnings = warnings + (f"{spec.name} is a feature backbone with no head: training is planned with "
                               f"a {BACKBONE_TRAINING_CLASSES}-class linear head on {on} and "
                               "cross-entropy; --classes N for another head, --mode infer "
                               "for features only",)
    return _plan_spec(spec, warnings, batch=batch, mode=mode, precision=precision, attention=attention,
                      optimizer=optimizer, keep_grads=keep_grads, checkpointing=checkpointing, strategy=strategy,
                      gpus=gpus, nodes=nodes, grad_accum=grad_accum, mixed_precision=mixed_precision,
                      gpu=gpu, device=device, allocator=allocator, run=run)


def run_options(tf32: bool = False, epochs: Optional[float] = None, dataset_size: Optional[int] = None,
                price_per_gpu_hour: Optional[float] = None) -> RunOptions:
    """Validated time options: every figure positive and finite, a run named by both its epochs
    and its dataset size, a price only for a run."""
    for flag, value, most in (("--epochs", epochs, 1e6), ("--dataset-size", dataset_size, 1e15),
                              ("--price-per-gpu-hour", price_per_gpu_hour, 1e9)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= most:
            shown = shorten(str(value)) if not isinstance(value, int) or value < 10**20 else "(a huge number)"
            raise ConfigError(f"{flag} {shown}: must be a number greater than 0 and at most {most:g}")
    if dataset_size is not None and int(dataset_size) != dataset_size:
        raise ConfigError(f"--dataset-size {dataset_size}: a whole number of samples")
    if (epochs is None) != (dataset_size is None):
        raise ConfigError("--epochs and --dataset-size go together: a run is so many epochs over so many samples")
    if price_per_gpu_hour is not None and epochs is None:
        raise ConfigError("--price-per-gpu-hour prices a run: give --epochs and --dataset-size too")
    return RunOptions(tf32=bool(tf32), epochs=None if epochs is None else float(epochs),
                      dataset_size=None if dataset_size is None else int(dataset_size),
                      price_per_gpu_hour=price_per_gpu_hour)


def _from_hf_config(path: str, model: Optional[str], image: ImageSize, patch: Optional[int],
                    arch: dict[str, Any]) -> tuple:
    """``plan``'s model arguments from a config file, explicit ones on top."""
    from vitcost.hf_config import read_hf_config

    if model is not None:
        raise ConfigError(f"--model {shorten(model, quote=True)} and --hf-config {shorten(str(path))}: give one of them")
    cfg = read_hf_config(path)
    merged = dict(cfg.arch)
    cfg_image, cfg_patch = merged.pop("image"), merged.pop("patch")
    merged.update({k: v for k, v in arch.items() if v is not None})
    notes = cfg.notes
    if image is not None and parse_image(image) != cfg_image:
        if merged.get("layer_scale") and cfg_image[0] == cfg_image[1] and "pos_grid" not in arch:
            # DINOv2 interpolates its table to the image every forward: replayed, and its
            # parameters counted at the size the model was built for
            merged["pos_grid"] = cfg_image[0] // cfg_patch
        else:
            notes = notes + (f"--image {image} is not the config's image_size {cfg_image[0]}x{cfg_image[1]}: "
                             "Hugging Face's code then needs interpolate_pos_encoding=True, whose interpolation "
                             "is not replayed; parameters are counted at the new size",)
    return (None, image if image is not None else cfg_image, patch if patch is not None else cfg_patch, merged,
            notes, cfg.architecture)


def _plan_spec(spec: ViTSpec, warnings: tuple[str, ...], *, batch: int, gpu: Optional[str],
               device: Optional[str], allocator: str = "native", run: RunOptions = RunOptions(),
               gpus: Optional[int] = None, nodes: Optional[int] = None, **workload: Any) -> Report:
    if gpu is not None and not str(gpu).strip():
        raise ConfigError("--gpu '': name a GPU profile (see 'vitcost gpus') or a YAML file, or leave --gpu out")
    if allocator not in ALLOCATORS:
        raise ConfigError(f"--allocator {allocator!r}: expected one of {', '.join(ALLOCATORS)}")
    strategy = str(getattr(workload.setdefault("strategy", "ddp"), "value", workload["strategy"]))
    accum = _whole("--grad-accum", workload.setdefault("grad_accum", 1), 4096, "micro-steps")
    resolved = _load_gpu(gpu) if gpu else None
    _whole("--gpus", gpus, 65536, "GPUs")
    nodes = _whole("--nodes", nodes, 65536, "nodes") or 1
    gpus = gpus or (resolved.profile.gpus if resolved else 1) * nodes
    if nodes > gpus:
        raise ConfigError(f"--nodes {nodes} is more than the {gpus} GPUs: every node runs at least one")
    if gpus % nodes:
        raise ConfigError(f"--gpus {gpus} over --nodes {nodes}: every node runs as many GPUs ({gpus} is not a "
                          f"multiple of {nodes})")
    if nodes > 1 and resolved is not None and resolved.profile.node_interconnect is None:
        raise ConfigError(f"--nodes {nodes}: profile {resolved.canonical} has no node_interconnect (the link between "
                          "nodes); use a node profile such as 8xa100 or 8xh100")
    if batch is not None and batch <= 0:
        raise ConfigError(f"--batch {batch}: the batch size must be at least 1")
    if batch % accum:
        raise ConfigError(f"--grad-accum {accum} does not divide --batch {batch}: each optimizer step is "
                          f"{accum} micro-batches of the same size")
    per_gpu = math.ceil(batch // accum / gpus)
    if strategy == "hsdp" and nodes == 1:
        raise ConfigError("--strategy hsdp shards within a node and replicates across nodes: give --nodes M (M > 1) "
                          "with a node profile such as 8xa100")
    workload["replicas"] = nodes if strategy == "hsdp" else 1
    workload.setdefault("mixed_precision", False)
    if device is None:
        device = resolved.profile.device if resolved else "cuda"
    wl = _workload_of(per_gpu, device, gpus, 0, workload)
    if wl.strategy.value != "ddp" and gpus == 1:
        raise ConfigError(f"--strategy {wl.strategy.value} shards over several GPUs: give --gpus N (N > 1) or a "
                          "multi-GPU profile")
    if wl.grad_accum > 1 and not wl.training:
        raise ConfigError(f"--grad-accum {wl.grad_accum} accumulates gradients: it needs --mode train")
    if spec.pos_embed.value == "relative-bias" and wl.attention.value == "sdpa":
        raise ConfigError("--pos-embed relative-bias adds a bias to the attention scores: it is modelled with "
                          "--attention eager or eager-postscale (sdpa would take it as a mask)")
    if wl.mixed_precision and (wl.strategy not in FSDP_STRATEGIES or wl.precision.value not in ("bf16", "fp16")):
        raise ConfigError("--mixed-precision is FSDP's MixedPrecisionPolicy (fp32 sharded weights, bf16 or fp16 "
                          "compute): it needs --strategy zero2, fsdp or hsdp and --precision bf16 or fp16")
    if wl.strategy in FSDP_STRATEGIES:
        if not wl.training:
            raise ConfigError(f"--strategy {strategy} shards a training step; inference on several GPUs is modelled "
                              "as ddp (each GPU holds the model)")
        if spec.mae is not None or spec.video or spec.distillation or spec.swin is not None:
            raise ConfigError(f"--strategy {strategy} is modelled for image classification ViTs (timm and Hugging "
                              "Face), not for MAE pretraining, video models, distillation or Swin")
    if spec.swin is not None and wl.training and wl.checkpointing.value != "none":
        raise ConfigError("--checkpointing full with Swin is not modelled yet (Hugging Face checkpoints its layers and "
                          "stages); use --checkpointing none")
    per_rank: tuple[int, ...] = ()
    if wl.shards_optimizer or wl.fsdp:  # ranks differ: the figures are the rank that needs the most
        per_rank = _per_rank_peaks(spec, lambda r: _workload_of(per_gpu, device, gpus, r, workload), gpus,
                                   wl.shard_ranks if wl.fsdp else 0)
        wl = _workload_of(per_gpu, device, gpus, per_rank.index(max(per_rank)), workload)
    if spec.drop_path and wl.training and wl.checkpointing.value != "none":
        raise ConfigError("--drop-path with --checkpointing full is not modelled yet (the recompute runs on to "
                          "the second mask); use --checkpointing none")
    if wl.training and not spec.classes and spec.mae is None:
        raise ConfigError(f"{spec.name} has no classification head (a feature backbone): training needs one, "
                          "pass --classes N, or use --mode infer")
    if gpus > 1 and (batch // accum) % gpus:
        warnings = warnings + (f"batch {batch // accum} does not split evenly over {gpus} GPUs: "
                               f"each runs {per_gpu} (the largest share)",)
    fit = None if resolved is None else partial(_fit, spec, wl, resolved, allocator)
    time = None if resolved is None else partial(_time, spec, wl, resolved, batch, run, nodes)
    search = None if resolved is None else partial(
        _search, spec, batch=batch, gpu=gpu, device=device, allocator=allocator, run=run, gpus=gpus, nodes=nodes,
        **workload)
    return build_report(spec, wl, gpus=gpus, warnings=warnings, fit=fit, global_batch=batch, time=time,
                        per_rank_peak_bytes=per_rank, nodes=nodes, search=search)


def _whole(flag: str, value: Any, most: int, noun: str) -> Any:
    """``value`` itself when it is None or a whole number from 1 to ``most``; else a one-line error."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most):
        raise ConfigError(f"{flag} {shorten(str(value))}: a whole number of {noun} from 1 to {most}")
    return value


def _search(spec: ViTSpec, *, batch: int, gpus: int, nodes: int, **options: Any) -> list[dict[str, Any]]:
    """Where the step does not fit: for each strategy, the fewest GPUs (more than asked for,
    the global batch split over them) on which it does, with each rank's peak and the time."""
    options.pop("strategy")
    options.pop("replicas", None)
    strategies = SEARCH_STRATEGIES if options.get("mode", "train") == "train" else ("ddp",)
    rows = []
    accum = options.get("grad_accum", 1)
    for strategy in strategies:
        for g in (n for n in SEARCH_GPUS if n > gpus and n % nodes == 0 and n <= batch // accum):
            report = _plan_spec(spec, (), batch=batch, gpus=g, nodes=nodes, strategy=strategy, **options)
            if report.gpu.fits:
                t = report.time
                rows.append({"strategy": strategy, "gpus": g, "per_gpu_batch": report.workload.batch,
                             "peak_bytes": report.peak_bytes, "peak_reserved_bytes": report.gpu.peak_reserved_bytes,
                             "step_seconds": t.step_seconds if t else None,
                             "samples_per_s": t.samples_per_s if t else None})
                break
    return rows


def _per_rank_peaks(spec: ViTSpec, workload_of: Callable[[int], Workload], ranks: int,
                    shard_ranks: int = 0) -> tuple[int, ...]:
    """Each rank's peak under ZeRO-1 or (``shard_ranks`` > 0) FSDP: ranks whose shares hold
    parameters of the same sizes in the same order have the same step, so each distinct
    share is replayed once."""
    from vitcost.formulas import zero_shares
    from vitcost.sharding import shards

    if shard_ranks:  # each parameter's unpadded chunk: the last ranks' may be smaller, or empty
        by_shard_rank = [shards(spec, shard_ranks, k) for k in range(shard_ranks)]
        shares = [by_shard_rank[rank % shard_ranks] for rank in range(ranks)]
    else:
        shares = zero_shares(spec, ranks)
    peaks: dict[tuple, int] = {}
    for rank, share in enumerate(shares):
        if share not in peaks:
            peaks[share] = estimate_memory(spec, workload_of(rank)).peak
    return tuple(peaks[share] for share in shares)


def _workload_of(per_gpu: int, device: str, gpus: int, rank: int, workload: dict[str, Any]) -> Workload:
    values = (per_gpu, device, gpus, rank, *(workload[k] for k in _WORKLOAD_KEYS))
    try:
        return _workload(*values)
    except TypeError:  # an unhashable argument: validation says what is wrong with it
        return _workload.__wrapped__(*values)


def _time(spec: ViTSpec, wl: Workload, resolved, batch: int, run: RunOptions,
          nodes: int = 1) -> tuple[Optional[TimeReport], Optional[str]]:
    """The step priced on the profile, or why it is not. Over several nodes a ring runs at the
    slower of the node's all-reduce bandwidth and the node's links out of it together."""
    profile = resolved.profile
    dtype = _MATMUL_DTYPE[wl.precision]
    if dtype == "fp32" and run.tf32:
        dtype = "tf32"
    rates = _rates(profile, dtype)
    if rates is None:
        return None, (f"profile {resolved.canonical} has no 'time' section (compute_units, memory_bandwidth_efficiency, "
                      "attention_efficiency, kernel_overhead_us, host_overhead_us): the step is not priced")
    if rates.gpus != wl.ranks:  # --gpus: as many of the profile's GPUs, on its links
        rates = replace(rates, gpus=wl.ranks)
    replica_rates = None
    if wl.fsdp and wl.replicas > 1:
        # HSDP: the all-gathers and reduce-scatters run within a node, at its bus bandwidth;
        # each rank then all-reduces its shard with its peers in the other nodes, every rank
        # of a node at once, each over its own link out of the node
        rates = replace(rates, gpus=wl.shard_ranks)
        replica_rates = replace(rates, gpus=wl.replicas,
                                allreduce_bytes_per_s=profile.node_interconnect.gb_per_s_per_direction * 1e9)
    elif nodes > 1:
        # a ring crosses each node's edge once per channel, and NCCL runs a channel per link out
        # of the node: the node's links carry it together
        per_node = wl.ranks // nodes
        rates = replace(rates, allreduce_bytes_per_s=min(
            rates.allreduce_bytes_per_s, profile.node_interconnect.gb_per_s_per_direction * 1e9 * per_node))
    from vitcost.calibration_store import calibrated_time_ratio

    saved = calibrated_time_ratio(resolved.canonical)
    where = None
    if saved is not None:
        ratio, where = saved
        rates = timing.scaled(rates, ratio)
    try:
        return estimate_time(spec, wl, rates, dtype, batch, run, calibrated=where, replica_rates=replica_rates), None
    except NotModelled as err:
        return None, f"{err}: the step is not priced"


_WORKLOAD_KEYS = ("mode", "precision", "attention", "optimizer", "keep_grads", "checkpointing", "strategy",
                  "grad_accum", "replicas", "mixed_precision")


@lru_cache(maxsize=1024)
def _workload(batch: int, device: str, ranks: int, rank: int, *values: Any) -> Workload:
    """A validated workload; like a spec, the same arguments give the same one."""
    return make_workload(batch=batch, device=device, ranks=ranks, rank=rank, **dict(zip(_WORKLOAD_KEYS, values)))


def _load_gpu(gpu: str):
    from vitcost.profiles import load_profile

    return load_profile(gpu)


def usable_memory(resolved) -> tuple[int, str]:
    """Bytes PyTorch's tensors may use on one GPU, and where the figure comes from."""
    from vitcost.calibration_store import calibrated_usable_bytes

    calibrated = calibrated_usable_bytes(resolved.canonical)
    if calibrated is not None:
        return calibrated
    return resolved.profile.usable_memory_bytes, "profile"


def _fit(spec: ViTSpec, wl: Workload, resolved, allocator: str, peak: int, ddp: int, macs_per_image: int) -> GPUFit:
    profile = resolved.profile
    usable, source = usable_memory(resolved)
    dtype = _MATMUL_DTYPE[wl.precision]
    flops = profile.peak_flops_per_s(dtype)
    step_flops = 2 * macs_per_image * wl.batch
    return GPUFit(
        name=resolved.canonical,
        requested=resolved.requested,
        display_name=profile.display_name,
        gpus=wl.ranks,
        memory_bytes=profile.memory_bytes,
        context_bytes=profile.cuda_context_bytes,
        workspace_bytes=profile.workspace_bytes,
        usable_memory_bytes=usable,
        usable_memory_source=source,
        allocator=allocator,
        per_gpu_batch=wl.batch,
        ddp_bucket_bytes=ddp,
        peak_bytes=peak,
        matmul_dtype=dtype,
        peak_flops_per_s=flops,
        matmul_efficiency=profile.matmul_efficiency,
        step_seconds_lower_bound=step_flops / (flops * profile.matmul_efficiency),
        # DDP's buckets are one more tensor, made before the first step and kept
        solver=Solver(spec, wl, usable, allocator, ddp),
        grad_accum=wl.grad_accum,
    )


@lru_cache(maxsize=64)
def _rates(profile, dtype: str):
    return profile.rates(dtype)


def _as_list(value: Any) -> list:
    if value is None:
        return [None]
    if isinstance(value, (list, tuple)) and not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value)):
        return list(value)
    if isinstance(value, str) and "," in value:
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


def models(match: Optional[str] = None) -> list[dict[str, Any]]:
    """A row per known model (``presets.known_names``; ``match``: those whose name contains
    it): its family, image and patch, width, depth, heads, parameters, forward GMACs per image
    at its image, fp16 weights, and the peak of one training step and one no_grad forward at
    batch 1 (amp-bf16, SDPA, AdamW, CUDA rules; a backbone trained with a 1000-class head)."""
    from vitcost.presets import known_names

    names = [n for n in known_names() if match is None or match.lower() in n.lower()]
    if not names:
        raise ConfigError(f"no known model name contains {shorten(str(match), quote=True)} (vitcost models lists them)")
    rows = []
    for name in names:
        train, infer = plan(name, batch=1), plan(name, batch=1, mode="infer")
        s = train.spec
        family = ("swin" if s.swin else "dinov2" if "dinov2" in name else "deit3" if name.startswith("deit3")
                  else "deit" if name.startswith("deit") else "vit")
        rows.append({"name": name, "family": family, "image": s.image_h, "patch": s.patch, "dim": s.dim,
                     "depth": s.depth, "heads": s.heads, "stages": list(s.swin.depths) if s.swin else None,
                     "params": infer.params_total, "gmacs_forward_per_image": infer.macs_forward_per_image / 1e9,
                     "fp16_weight_bytes": 2 * infer.params_total, "train_peak_bytes_batch1": train.peak_bytes,
                     "infer_peak_bytes_batch1": infer.peak_bytes})
    return rows


TIER_IMAGES = (224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 2048)
TIER_PATCHES = (32, 16, 14, 8, 4)


def tiers(models: Iterable[str] = ("vit-s", "vit-b", "vit-l"), *, batch: int = 8, patch: int = 16,
          image: ImageSize = 224, gpus: Optional[Iterable[str]] = None, **options: Any) -> list[dict[str, Any]]:
    """The tutorials' hardware tiers, worked out: for each GPU profile (every one shipped
    unless ``gpus`` names some) and model, at the global ``batch``: the largest image of
    ``TIER_IMAGES`` whose step fits at ``patch``, the smallest patch of ``TIER_PATCHES`` that fits
    at ``image``, and the largest batch at (``image``, ``patch``). A fit is the caching
    allocator's (``plan(...).gpu.fits``); both searches are monotone (more tokens never need
    less memory), so each is a bisection."""
    from vitcost.profiles import list_profiles

    names = list(gpus) if gpus else [p.name for p in list_profiles()]
    rows = []
    for gpu in names:
        for model in models:
            swin = resolve_model(model).swin is not None
            base = plan(model, image=image, patch=None if swin else patch, batch=batch, gpu=gpu, **options)
            if swin:
                # a Swin's patch is its own, and only images its windows cut exactly are valid:
                # every one is tried (the valid ones are not contiguous)
                def fits_swin(img: int) -> bool:
                    try:
                        return plan(model, image=img, batch=batch, gpu=gpu, **options).gpu.fits
                    except ConfigError:
                        return False

                largest = max((img for img in TIER_IMAGES if fits_swin(img)), default=None)
                smallest = base.spec.patch if base.gpu.fits else None
            else:
                def fits(img: ImageSize, p: int) -> bool:
                    return plan(model, image=img, patch=p, batch=batch, gpu=gpu, **options).gpu.fits

                largest = _last_true(TIER_IMAGES, lambda img: fits(img, patch))
                smallest = _last_true(TIER_PATCHES, lambda p: fits(image, p))
            rows.append({"gpu": gpu, "display_name": base.gpu.display_name, "gpus": base.gpu.gpus,
                         "usable_memory_bytes": base.gpu.usable_memory_bytes, "model": base.spec.name,
                         "batch": batch, "patch": patch, "image": base.spec.image_h, "largest_image": largest,
                         "smallest_patch": smallest, "patch_fixed": swin, "max_batch": base.gpu.max_batch_size,
                         "peak_reserved_bytes": base.gpu.peak_reserved_bytes})
    return rows


def _last_true(values: tuple, ok: Callable[[Any], bool]) -> Any:
    """The last of ``values`` for which ``ok`` holds, ``ok`` being true up to some point and
    false after it (None when it is false from the first)."""
    lo, hi = 0, len(values)  # ok(values[i]) for every i < lo; not for any i >= hi
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(values[mid]):
            lo = mid + 1
        else:
            hi = mid
    return values[lo - 1] if lo else None


COMPARE_AXES = ("model", "gpu", "precision", "batch", "image", "patch")  # outermost first


def compare(
    model: Union[Optional[str], Iterable[Optional[str]]] = "vit-b",
    *,
    image: Union[ImageSize, Iterable[ImageSize]] = None,
    patch: Union[int, Iterable[int], None] = None,
    batch: Union[int, Iterable[int]] = 8,
    precision: Union[str, Iterable[str]] = "amp-bf16",
    gpu: Union[Optional[str], Iterable[Optional[str]]] = None,
    **options: Any,
) -> list[Report]:
    """One report per combination of the lists given: models outermost, then GPUs,
    precisions, batches, images, and patches innermost (``COMPARE_AXES``)."""
    reports = []
    for m in _as_list(model):
        for g in _as_list(gpu):
            for prec in _as_list(precision):
                for b in _as_list(batch):
                    for img in _as_list(image):
                        for p in _as_list(patch):
                            reports.append(plan(m, image=img, patch=int(p) if p is not None else None, batch=b,
                                                precision=prec, gpu=g, **options))
    return reports


def axis_value(report: Report, axis: str) -> Any:
    """A report's value on one of ``COMPARE_AXES``: the model's name, the GPU as requested
    (None without one), the precision, the global batch, the image as (h, w), the patch."""
    s = report.spec
    return {"model": s.name, "gpu": report.gpu.requested if report.gpu else None,
            "precision": report.workload.precision.value, "batch": report.batch, "image": (s.image_h, s.image_w),
            "patch": s.patch}[axis]


def varying(reports: list[Report]) -> list[str]:
    """The ``COMPARE_AXES`` whose values differ between ``reports``."""
    return [axis for axis in COMPARE_AXES if len({axis_value(r, axis) for r in reports}) > 1]


def transfer(
    model: Optional[str] = "vit-b",
    *,
    to: Union[ImageSize, Iterable[ImageSize]] = None,
    to_patch: Optional[int] = None,
    image: ImageSize = None,
    patch: Optional[int] = None,
    **options: Any,
) -> "TransferReport":
    """A model trained at ``image`` (its name's size by default) moved to each of ``to``: the
    position table before and after, its interpolation once at load or every forward, and
    ``plan`` at both sizes (``vitcost.resolution``). Several ``to`` sizes: multi-scale
    training, whose worst step is reported."""
    from vitcost import resolution as tr

    sizes = [t for t in _as_list(to) if t is not None]
    if not sizes:
        raise ConfigError("--to: the image size(s) to transfer to, such as --to 384 or --to 224,320,384")
    if options.get("hf_config"):
        raise ConfigError("--hf-config: transfer takes --model (a preset or timm name) and --image")
    source = plan(model, image=image, patch=patch, **options)
    new_patch = to_patch if to_patch is not None else source.spec.patch
    targets = []
    for size in sizes:
        report = plan(model, image=size, patch=new_patch, **options)
        interpolation = tr.interpolation(source, report)
        per_forward = resized = None
        if interpolation is None:
            reason = "no learned position table" if source.spec.pos_embed.value != "learned" else "the same grid"
        elif new_patch != source.spec.patch:
            reason = (f"patch {source.spec.patch} -> {new_patch}: the patch embedding's weights change too, so the "
                      "model is rebuilt, its table resized once")
        elif source.spec.grid_h != source.spec.grid_w:
            reason = f"the trained grid {source.spec.grid_h}x{source.spec.grid_w} is not square (Hugging Face's is)"
        else:
            reason = None
            hf = {**options, "impl": "hf"}
            try:
                per_forward = plan(model, image=size, patch=new_patch, pos_grid=source.spec.grid_h, **hf)
                resized = plan(model, image=size, patch=new_patch, **hf)
            except ConfigError as err:
                per_forward = resized = None
                reason = f"not on Hugging Face's code: {err}"
        timm = None
        if interpolation is not None and new_patch == source.spec.patch and source.spec.grid_h == source.spec.grid_w:
            if report.spec.impl.value == "timm":
                try:  # timm's dynamic_img_size: the old table resampled every forward
                    timm = plan(model, image=size, patch=new_patch, pos_grid=source.spec.grid_h, **options)
                except ConfigError:
                    timm = None
        targets.append(tr.Target(report=report, interpolation=interpolation, per_forward=per_forward,
                                 resized_hf=resized, per_forward_reason=reason, per_forward_timm=timm))
    return tr.TransferReport(source=source, targets=tuple(targets))
