"""vitcost's largest batch against the published out-of-memory boundaries of timm's GPU benchmarks.

timm's benchmark script starts at a batch (1024 for inference, 512 for training, 2048 on
the RTX PRO 6000 run) and, on out-of-memory, retries at the next smaller step of 2048, 1536,
1024, 768, 512, 384, 256, ... (two steps per power of two). A recorded batch B below the
start therefore ran, and the next step up ran out of memory: the true largest batch lies in
[B, next step). A recorded start only says it fit.

For every development row (../shared/reference/timm-benchmarks, see its README) this
predicts, with the code those runs executed (fp32 weights under CUDA autocast fp16, an fp32
input batch; torch < 2 runs: eager attention that scaled the N x N scores; torch 2 runs:
F.scaled_dot_product_attention; training: SGD with momentum, zero_grad keeping the
gradients), the largest batch by the tensors alone and by the caching allocator, on the
card's profile, and says whether the allocator's answer lies inside the published interval.

Run: python benchmarks/published_batches.py [--data DIR] [--out docs/published-batches.md]
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import vitcost  # noqa: E402
from vitcost.estimate import max_batch_size  # noqa: E402
from vitcost.fit import allocator_stats, fits_allocator  # noqa: E402

DATA = ROOT.parent / "shared" / "reference" / "timm-benchmarks"
GIB = 2**30

# file-name suffix -> vitcost profile
CARDS = {"rtx3090": "rtx3090", "rtx4090": "rtx4090", "4090": "rtx4090", "5090": "rtx5090",
         "pro6000maxq": "rtx-pro-6000-maxq"}


def decay_batch_step(batch: int, intra: int = 2) -> int:
    """timm.utils.decay_batch_step: the next smaller batch the benchmark tries."""
    if batch <= 1:
        return 0
    base = int(2 ** (math.log(batch - 1) // math.log(2)))
    step = max(base // intra, 1)
    return base + ((batch - base - 1) // step) * step


def next_step_up(batch: int, start: int) -> Optional[int]:
    """The step the benchmark tried before ``batch`` (None when ``batch`` is the start)."""
    b = start
    while b and b != batch:
        smaller = decay_batch_step(b)
        if smaller == batch:
            return b
        b = smaller
    return None


@dataclass
class Row:
    file: str
    model: str
    gpu: str
    mode: str
    attention: str
    published: int
    oom: Optional[int]
    tensors_max: int
    allocator_max: int
    peak_at_published: int
    reserved_at_published: int
    usable: int
    memory: int
    report: object = None

    @property
    def inside(self) -> bool:
        return self.published <= self.allocator_max and (self.oom is None or self.allocator_max < self.oom)

    @property
    def tensors_inside(self) -> bool:
        return self.published <= self.tensors_max and (self.oom is None or self.tensors_max < self.oom)


def run_file(path: Path) -> list[Row]:
    name = path.stem
    mode, _, _, torch_tag, _, card = name.split("-")
    gpu = CARDS[card]
    attention = "eager-postscale" if torch_tag in ("pt112", "pt113") else "sdpa"
    start = 2048 if card == "pro6000maxq" else (1024 if mode == "infer" else 512)
    rows = []
    for rec in csv.DictReader(path.open()):
        published = int(rec[f"{mode}_batch_size"])
        kw = dict(mode=mode, precision="amp-fp16", attention=attention, gpu=gpu, batch=published)
        if mode == "train":
            kw.update(optimizer="sgd-momentum", keep_grads=True)
        report = vitcost.plan(rec["model"], image=int(rec[f"{mode}_img_size"]), **kw)
        g = report.gpu
        rows.append(Row(
            file=name, model=rec["model"], gpu=gpu, mode=mode, attention=attention, published=published,
            oom=next_step_up(published, start),
            tensors_max=max_batch_size(report.spec, report.workload, g.usable_memory_bytes),
            allocator_max=g.max_batch_size,
            peak_at_published=report.peak_bytes,
            reserved_at_published=allocator_stats(report.spec, report.workload).peak_reserved,
            usable=g.usable_memory_bytes,
            memory=g.memory_bytes,
            report=report,
        ))
    return rows


def largest_capacity_that_fails(row: Row, batch: int) -> int:
    """The most memory (bytes, to 1 MiB) in which the allocator still runs out at ``batch``."""
    spec, wl = row.report.spec, row.report.workload
    lo, hi = row.peak_at_published, row.usable  # fails at lo (or below), fits at hi
    mib = 2**20
    while hi - lo > mib:
        mid = (lo + hi) // 2
        if fits_allocator(spec, wl, mid, batch=batch):
            hi = mid
        else:
            lo = mid
    return lo


def why(row: Row) -> str:
    """What the figures say about a row outside its interval (worked out, not written in)."""
    if row.inside:
        return ""
    if row.allocator_max < row.published:
        return (f"the allocator runs out at the published batch {row.published}: tensors "
                f"{row.peak_at_published / GIB:.2f} GiB, reserved with memory to spare "
                f"{row.reserved_at_published / GIB:.2f} GiB, of {row.usable / GIB:.2f} GiB usable")
    cap = largest_capacity_that_fails(row, row.oom)
    taken = row.memory - cap
    return (f"predicted to fit the batch that ran out of memory ({row.oom}; the tensors alone allow "
            f"{row.tensors_max}); it runs out there once {taken / 2**20:,.0f} MiB or more of the card's "
            f"{row.memory / 2**20:,.0f} MiB are taken outside the allocator's segments, against the "
            f"{(row.memory - row.usable) / 2**20:,.0f} MiB the profile counts (CUDA context and cuBLAS workspace)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "published-batches.md")
    args = ap.parse_args()
    files = sorted(args.data.glob("*.csv"))
    if not files:
        sys.exit(f"published_batches: no CSV files in {args.data}")
    t0 = time.perf_counter()
    rows = [r for f in files for r in run_file(f)]
    seconds = time.perf_counter() - t0
    inside = sum(r.inside for r in rows)
    bounded = [r for r in rows if r.oom is not None]
    lines = [
        "# Published out-of-memory boundaries",
        "",
        "Written by `python benchmarks/published_batches.py`; the latest run is committed.",
        "",
        "Every development row of timm's published GPU benchmarks (`../shared/reference/timm-benchmarks`): "
        "the published interval of the largest batch ([recorded batch, next step up) when the run "
        "backed off from out-of-memory, [recorded batch, ∞) when the first try fit), and vitcost's "
        "largest batch on the card's profile, by the tensors alone (`max_memory_allocated`) and by "
        "the caching allocator (every segment, over a first step and the steady ones, within memory less the CUDA context "
        "and the cuBLAS workspace, docs/memory-model.md). What each run executed: fp32 weights "
        "under CUDA autocast fp16 and an fp32 input batch; torch 1.12/1.13: eager attention that "
        "scales the N×N scores (`eager-postscale`); torch 2.4/2.9: `sdpa`; training: SGD with "
        "momentum, `zero_grad()` keeping the gradients (torch 1.12's default).",
        "",
        f"**{inside} of {len(rows)} rows inside** their published interval "
        f"({sum(r.inside for r in bounded)} of the {len(bounded)} rows with an out-of-memory bound); "
        f"by the tensors alone, {sum(r.tensors_inside for r in rows)} of {len(rows)} "
        f"({sum(r.tensors_inside for r in bounded)} of {len(bounded)}).",
        "",
        "| run | model | published | vitcost: tensors | vitcost: allocator | inside |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        interval = f"[{r.published}, {r.oom})" if r.oom else f"[{r.published}, ∞)"
        lines.append(f"| {r.file} | {r.model} | {interval} | {r.tensors_max} | {r.allocator_max} | "
                     f"{'yes' if r.inside else '**no**'} |")
    outside = [r for r in rows if not r.inside]
    lines += ["", "## Rows outside their interval", ""]
    if not outside:
        lines.append("None.")
    for r in outside:
        lines.append(f"- **{r.file} {r.model}** (published {r.published}, out of memory at {r.oom}; "
                     f"vitcost {r.allocator_max}): {why(r)}.")
    notes = [text for rule, text in EXPLANATIONS if any(not r.inside and rule(r) for r in rows)]
    lines += ["", "## Why they stay outside", "", *notes, "",
              f"Ran in {seconds:.0f} s on {platform.machine()}, CPython {platform.python_version()}.", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines[:14]))
    print(f"{inside} of {len(rows)} inside; wrote {args.out}")


# What is known of the runs behind rows that stay outside: each note is printed only when
# a row it speaks of is outside.
EXPLANATIONS = [
    (lambda r: r.gpu == "rtx4090" and r.model == "vit_base_patch8_224", """\
- **RTX 4090, `vit_base_patch8_224`, torch 2.4 and 2.9 (out of memory at 1024).** The same
  code (torch 2.4, CUDA 12.4, the same model and batch) *fit* 1024 on the RTX 3090, whose
  memory is 12 MiB larger (24576 against 24564 MiB). Nothing PyTorch does separates the two
  cards by more than that, so at most one of the two rows can be inside: the 4090 run had
  gigabytes less of its memory for PyTorch than the 3090 run (a display, another process: none
  of it is in the published data). The 3090 row is inside."""),
    (lambda r: r.attention == "eager-postscale" and r.mode == "infer", """\
- **RTX 3090, torch 1.13, eager inference bound by the N×N maps (577 and 785 tokens).** At the
  published batch the tensors fit with gigabytes to spare, but the allocator model runs out:
  best fit hands a smaller tensor (a (B, N, D) copy, a score map) a piece of a cached
  segment of a larger map, the segment stays pinned, and the next map needs a segment of its
  own. Which block a tensor lands in turns on the order of every allocation and free inside
  autocast's casts and softmax, down to the small ones; torch 1.13's exact order cannot be
  observed without a GPU, and a different one lets the same tensors fit. These rows sit where
  the outcome turns on it. `benchmarks/cuda_check.py` measures the allocator on a GPU.
  `vit_small_patch16_384` joined these rows when the replay learnt that timm's
  `nn.Sequential` holds the embedding (one more (B, N, D) fp32 tensor, measured on timm
  1.0.31's own code): the tensors allow 975, the allocator 764, four images under the
  published 768."""),
    (lambda r: r.mode == "train", """\
- **RTX 3090, torch 1.12 (CUDA 11.3), training.** CUDA before 11.7 loads every kernel module
  of PyTorch's libraries when the context starts (lazy loading came with 11.7 and became
  PyTorch's default later), so that run's context was larger than the 512 MiB the profile
  assumes for PyTorch 2.x. How much larger is not published, so the profile's figure is kept;
  the row above says how much would put it inside."""),
]


if __name__ == "__main__":
    main()
