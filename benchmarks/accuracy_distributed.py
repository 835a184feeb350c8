"""Per-rank memory of a step spread over ranks, against torch.distributed, to docs/accuracy-distributed.md.

Each row runs N processes on this machine (gloo on 127.0.0.1), each wrapping the model in
DistributedDataParallel (ZeRO-1: its optimizer in ZeroRedundancyOptimizer) or sharding it with
FSDP2's ``fully_shard`` (zero2, fsdp, hsdp), and reads every rank's peak with PyTorch's
MemTracker or FSDPMemTracker (``vitcost.measure_distributed``), against ``plan``'s
prediction for that rank. Models: vitcost's reference (timm's code) and Hugging Face's
ViTForImageClassification, at real widths (ViT-Ti, ViT-S) and 224 px.

Run: python benchmarks/accuracy_distributed.py [--out docs/accuracy-distributed.md] [--limit N]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (model, impl, strategy, ranks, per-rank batch, grad_accum, precision, attention[, nodes])
GRID = [
    ("vit-ti", "timm", "ddp", 2, 2, 1, "fp32", "sdpa"),
    ("vit-ti", "timm", "ddp", 4, 2, 1, "amp-bf16", "eager"),
    ("vit-ti", "timm", "zero1", 2, 2, 1, "fp32", "eager"),
    ("vit-ti", "timm", "zero1", 4, 2, 1, "amp-bf16", "sdpa"),
    ("vit-ti", "timm", "zero1", 4, 1, 3, "fp32", "sdpa"),
    ("vit-s", "timm", "ddp", 2, 2, 2, "amp-bf16", "sdpa"),
    ("vit-s", "timm", "zero1", 2, 2, 1, "bf16", "sdpa"),
    ("vit-s", "timm", "zero1", 4, 1, 1, "fp32", "eager"),
    ("vit-ti", "hf", "ddp", 2, 2, 1, "fp32", "eager-postscale"),
    ("vit-ti", "hf", "zero1", 2, 2, 1, "amp-bf16", "sdpa"),
    ("vit-ti", "hf", "zero1", 4, 1, 2, "fp32", "sdpa"),
    ("vit-s", "hf", "zero1", 2, 1, 1, "fp32", "eager-postscale"),
    ("vit-ti", "timm", "fsdp", 2, 2, 1, "fp32", "sdpa"),
    ("vit-ti", "timm", "fsdp", 4, 2, 1, "amp-bf16", "eager"),
    ("vit-ti", "timm", "zero2", 2, 2, 1, "amp-bf16", "sdpa"),
    ("vit-ti", "timm", "hsdp", 4, 2, 1, "fp32", "sdpa", 2),
    ("vit-s", "timm", "fsdp", 2, 1, 2, "fp32", "sdpa"),
    ("vit-s", "timm", "fsdp", 4, 1, 1, "bf16", "sdpa"),
    ("vit-s", "timm", "zero2", 4, 1, 1, "amp-bf16", "eager"),
    ("vit-ti", "hf", "fsdp", 2, 2, 1, "fp32", "eager-postscale"),
    ("vit-ti", "hf", "zero2", 4, 1, 1, "amp-bf16", "sdpa"),
    ("vit-s", "hf", "fsdp", 4, 1, 1, "fp32", "sdpa"),
    ("vit-s", "hf", "hsdp", 4, 1, 1, "amp-bf16", "sdpa", 2),
    # FSDP's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)
    ("vit-ti", "timm", "fsdp", 4, 2, 1, "mixed-bf16", "sdpa"),
    ("vit-s", "hf", "fsdp", 2, 1, 2, "mixed-bf16", "eager-postscale"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "accuracy-distributed.md"))
    parser.add_argument("--limit", type=int, default=0)
    args = parser.parse_args()
    import vitcost
    from vitcost.measure_distributed import measure_ranks

    start = time.perf_counter()
    rows = []
    for i, (model, impl, strategy, ranks, per_rank, accum, precision, attention, *nodes) in enumerate(
            GRID[: args.limit or None]):
        mixed = precision == "mixed-bf16"  # FSDP's mixed precision: bf16 compute, fp32 shards
        report = vitcost.plan(model, image=224, patch=16, batch=per_rank * ranks * accum, gpus=ranks, grad_accum=accum,
                              strategy=strategy, precision="bf16" if mixed else precision, attention=attention,
                              impl=impl, device="cpu", nodes=nodes[0] if nodes else None, mixed_precision=mixed)
        if nodes:
            strategy = f"{strategy} ({nodes[0]} nodes)"
        predicted = list(report.rank_peaks_bytes)
        t0 = time.perf_counter()
        measured = [m["peak_bytes"] for m in measure_ranks(report.spec, report.workload)]
        rows.append((model, impl, strategy, ranks, per_rank, accum, precision, attention, predicted, measured,
                     time.perf_counter() - t0))
        print(f"[{i + 1}/{len(GRID)}] {model} {impl} {strategy} x{ranks} b{per_rank} k{accum} {precision} {attention}: "
              f"{'exact' if predicted == measured else 'OFF'}", file=sys.stderr, flush=True)
    exact = sum(r[8] == r[9] for r in rows)
    figures = sum(len(r[8]) for r in rows)
    worst = max((abs(p / m - 1) for r in rows for p, m in zip(r[8], r[9])), default=0.0)
    lines = [
        "# Accuracy over ranks (torch.distributed on the CPU)", "",
        "Written by `python benchmarks/accuracy_distributed.py`; the latest run is committed. "
        f"Run {datetime.now(timezone.utc).date()} on {platform.machine()}, CPython {platform.python_version()}, "
        f"in {time.perf_counter() - start:.0f} s.", "",
        "Each row: N processes (gloo on 127.0.0.1), each rank's model in DistributedDataParallel (ZeRO-1: its "
        "optimizer in ZeroRedundancyOptimizer around AdamW), warm-up steps (DDP builds its buckets in the first), "
        "then one steady-state step under PyTorch's MemTracker; or (zero2, fsdp, hsdp) the model sharded with "
        "FSDP2's `fully_shard` per block and then the root (zero2: `reshard_after_forward=False`; hsdp: a 2-D "
        "mesh, replicas x ranks per node; `mixed-bf16`: `MixedPrecisionPolicy(param_dtype=bf16, "
        "reduce_dtype=fp32)`, fp32 images and model), each step under `FSDPMemTracker`, the smallest of six (gloo's worker "
        "thread lets go of a collective's tensors on its own time, which only ever adds). Every rank's peak "
        "against `plan --gpus N --strategy S [--nodes M] --device cpu` for that rank. The batch is per rank and micro-step; `--grad-accum K` runs K "
        "micro-steps (DDP syncs the last). The CPU allocator does not round: a right prediction is exact.", "",
        f"**{exact} of {len(rows)} configurations exact on every rank ({figures} per-rank figures); worst error "
        f"{100 * worst:.2f}%.**", "",
        "| model | code | strategy | ranks | batch per rank | grad accum | precision | attention | predicted per rank | "
        "measured per rank | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, impl, strategy, ranks, per_rank, accum, precision, attention, predicted, measured, secs in rows:
        same = predicted == measured
        lines.append(f"| {model} | {impl} | {strategy} | {ranks} | {per_rank} | {accum} | {precision} | {attention} | "
                     f"{', '.join(f'{p:,}' for p in predicted)} | "
                     f"{'same' if same else ', '.join(f'{m:,}' for m in measured)} | {secs:.0f} |")
    lines += ["", "FSDP's ranks differ in their optimizer states: each steps the unpadded chunk of every parameter "
              "along its first dimension, and when the rows do not divide by the ranks the last ranks hold fewer "
              "(a (1, N, D) table, such as the position embedding, lives whole on rank 0's optimizer). The rest is "
              "the same on every rank: each stores every chunk padded to whole rows.", "",
              "ZeRO-1's ranks differ: ZeroRedundancyOptimizer gives each rank the states of a share of the "
              "parameters (largest first, to the rank with the fewest elements so far), and the temporaries of "
              "Adam's step on the CPU follow that share's order. `plan` reports the rank that needs the most and "
              "lists every rank's peak (`per_rank_peak_bytes`).", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}: {exact}/{len(rows)} exact")
    return 0 if exact == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
