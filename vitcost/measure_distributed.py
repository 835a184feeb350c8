"""Ground truth for a step spread over ranks: N processes, torch.distributed on the CPU.

With :mod:`vitcost.measure` (whose harness each rank runs), the only place vitcost imports
torch. Each rank joins a gloo process group on 127.0.0.1, wraps the model in
``DistributedDataParallel`` (under ZeRO-1 its optimizer in ``ZeroRedundancyOptimizer``), runs
the warm-up steps (DDP builds its gradient buckets in the first) and one steady-state step
under PyTorch's ``MemTracker``; under FSDP (zero2, fsdp, hsdp) it shards the model with
``fully_shard`` and tracks the step with ``FSDPMemTracker``, and sends back its peak by category. The parent waits at
most ``timeout_seconds``: a rank that fails or hangs is named with its error, and every
process is gone before the call returns.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any

from vitcost.errors import MeasurementError
from vitcost.specs import Strategy, ViTSpec, Workload


FSDP_REPEATS = 6  # tracked steps per rank under FSDP (see ``_rank_main``)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _watch_buckets(ddp: Any) -> dict[int, Any]:
    """DDP's gradient buckets, as its all-reduce hook sees them (the same default all-reduce,
    run from Python). They are allocated once, when DDP builds its buckets, and live on: the
    tracker is told of them before the measured step, as it is of the weights, or it would
    count each only from when backward first touches it."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    seen: dict[int, Any] = {}

    import torch
    import torch.distributed as dist

    def hook(state, bucket):
        seen[bucket.index()] = bucket.buffer()
        return allreduce_hook(state, bucket)

    # DDP checks the hook's annotations as objects (this module's are strings)
    hook.__annotations__ = {"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
    ddp.register_comm_hook(None, hook)
    return seen


def _blocks(model: Any) -> Any:
    """The model's stack of blocks: timm's ``blocks``, or its only ``ModuleList`` (Hugging
    Face's ``vit.layers``)."""
    import torch

    if isinstance(getattr(model, "blocks", None), torch.nn.Sequential):  # (the reference ViT's, as timm's)
        return model.blocks
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if len(stacks) != 1:
        raise MeasurementError(f"{type(model).__name__}: {len(stacks)} stacks of blocks, not one, to shard")
    return stacks[0]


def _fully_shard(model: Any, wl: Workload) -> Any:
    """FSDP2: ``fully_shard`` on each block, then on the root, over this process group (HSDP:
    a replicas x shard-ranks mesh); blocks reshard after forward unless the strategy is zero2."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if wl.strategy == Strategy.hsdp:
        mesh = init_device_mesh("cpu", (wl.replicas, wl.shard_ranks), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (wl.ranks,))
    reshard = wl.strategy != Strategy.zero2
    policy = {}
    if wl.mixed_precision:
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from vitcost.measure import compute_dtype

        policy = {"mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype(wl), reduce_dtype=torch.float32)}
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, **policy)
    return fully_shard(model, mesh=mesh, reshard_after_forward=reshard, **policy)


def _rank_main(rank: int, spec_json: str, wl_json: str, port: int, warmup: int, out: Any) -> None:
    """One rank: join the group, run the step, put ``(rank, figures or None, error or None)``."""
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        from vitcost import measure

        spec, wl = ViTSpec.model_validate_json(spec_json), Workload.model_validate_json(wl_json)
        torch.set_num_threads(1)  # N ranks share this machine's cores
        dist.init_process_group("gloo", rank=rank, world_size=wl.ranks)
        try:
            torch.manual_seed(0)
            model = measure.build_model(spec, attention=wl.attention.value, checkpointing=wl.checkpointing.value)
            model = model.to(dtype=measure.param_dtype(wl))
            if wl.fsdp:
                runner = measure.Runner(_fully_shard(model, wl), spec, wl, "cpu")
                from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

                # gloo's worker thread lets go of a collective's tensors on its own time: now
                # and then a rank's tracked peak holds one of them a little longer. That only
                # adds, so the smallest of several tracked steps is the step's own peak (on a
                # loaded 2-core machine three were once all late)
                measured = min((measure.track_runner(runner, wl, warmup if k == 0 else 1, tracker=FSDPMemTracker)
                                for k in range(FSDP_REPEATS)), key=lambda m: m.peak_bytes)
            else:
                ddp = DistributedDataParallel(model)
                buckets = _watch_buckets(ddp)
                runner = measure.Runner(ddp, spec, wl, "cpu")
                if wl.strategy == Strategy.zero1 and wl.training:
                    from torch.distributed.optim import ZeroRedundancyOptimizer

                    local = type(runner.optimizer)
                    defaults = {k: v for k, v in runner.optimizer.defaults.items() if k in ("lr", "momentum")}
                    runner.optimizer = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=local, **defaults)
                measured = measure.track_runner(runner, wl, warmup, external=lambda: list(buckets.values()))
            out.put((rank, {"peak_bytes": measured.peak_bytes, "weights_bytes": measured.weights_bytes,
                            "gradients_bytes": measured.gradients_bytes, "optimizer_bytes": measured.optimizer_bytes,
                            "activations_bytes": measured.activations_bytes,
                            "temporaries_bytes": measured.temporaries_bytes,
                            "categories": measured.extra.get("peak_snapshot", {})}, None))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - sent to the parent, which names the rank
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        out.put((rank, None, last))


def measure_ranks(spec: ViTSpec, wl: Workload, warmup: int = 2, timeout_seconds: float = 300.0) -> list[dict[str, int]]:
    """Each rank's peak by category, rank 0 first (``wl.ranks`` processes, ``wl.batch`` each)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, spec.model_dump_json(), wl.model_dump_json(), port, warmup, out),
                         daemon=True) for r in range(wl.ranks)]
    for p in procs:
        p.start()
    results: dict[int, dict[str, int]] = {}
    deadline = time.monotonic() + timeout_seconds
    try:
        while len(results) < wl.ranks:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(wl.ranks)) - set(results))
                raise MeasurementError(f"--nproc {wl.ranks}: rank(s) {', '.join(map(str, missing))} did not finish "
                                       f"within {timeout_seconds:g} s; every process was stopped")
            try:
                rank, figures, error = out.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
                if dead:
                    raise MeasurementError(f"--nproc {wl.ranks}: rank {dead[0]} exited with code "
                                           f"{procs[dead[0]].exitcode} before it reported") from None
                continue
            if error is not None:
                raise MeasurementError(f"--nproc {wl.ranks}: rank {rank} failed: {error}")
            results[rank] = figures
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) == wl.ranks else 0.1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        out.close()
    return [results[r] for r in range(wl.ranks)]
