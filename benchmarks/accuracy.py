"""Accuracy of vitcost against real PyTorch steps on the CPU, written to docs/accuracy.md.

A grid of configurations of the reference ViT (vit-ti/s/b; patch 8/16/32; image 224/384;
batch 1-16; eager/sdpa attention; fp32/bf16/amp-bf16; training and inference; both
``zero_grad`` modes), each run for real through ``vitcost.calibrate`` on the CPU: a warm-up
step, then one steady-state step measured by PyTorch's MemTracker, and parameters and MACs
by FlopCounterMode on the meta device. Every figure of every row is held against the
prediction under the CPU rules; the script exits 1 when one is off by more than 2%.

The grid is chosen for a small machine (2 cores, no GPU): every value of every axis is
covered, but no row's predicted peak is above 6 GiB, and the large-token rows (patch 8 at
384 px: N = 2,305) run at batch 1 or under inference. Rows over the memory limit are
refused before anything runs.

Run: python benchmarks/accuracy.py [--out docs/accuracy.md] [--json rows.json] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROW_LIMIT_BYTES = 6 * 2**30
TOLERANCE = 0.02

# (model, image, patch, batch, mode, precision, attention, keep_grads)
GRID = [
    # training, zero_grad(set_to_none=True)
    ("vit-ti", 224, 16, 16, "train", "fp32", "sdpa", False),
    ("vit-ti", 224, 8, 4, "train", "bf16", "eager", False),
    ("vit-ti", 384, 16, 4, "train", "amp-bf16", "eager", False),
    ("vit-s", 224, 16, 8, "train", "amp-bf16", "sdpa", False),
    ("vit-s", 384, 16, 2, "train", "bf16", "eager", False),
    ("vit-s", 384, 32, 16, "train", "fp32", "eager", False),
    ("vit-b", 224, 16, 2, "train", "fp32", "sdpa", False),
    ("vit-b", 224, 32, 4, "train", "bf16", "eager", False),
    ("vit-b", 384, 16, 1, "train", "bf16", "sdpa", False),
    ("vit-b", 224, 16, 8, "train", "amp-bf16", "sdpa", False),
    ("vit-b", 384, 16, 4, "train", "amp-bf16", "eager", False),
    ("vit-ti", 384, 8, 1, "train", "fp32", "eager", False),
    # training, zero_grad(set_to_none=False): gradients stay allocated between steps
    ("vit-ti", 224, 16, 16, "train", "fp32", "eager", True),
    ("vit-ti", 384, 32, 8, "train", "amp-bf16", "sdpa", True),
    ("vit-ti", 384, 8, 1, "train", "bf16", "sdpa", True),
    ("vit-s", 224, 32, 16, "train", "fp32", "eager", True),
    ("vit-s", 224, 8, 2, "train", "fp32", "sdpa", True),
    ("vit-b", 224, 16, 1, "train", "amp-bf16", "eager", True),
    ("vit-b", 384, 32, 4, "train", "amp-bf16", "sdpa", True),
    ("vit-s", 224, 16, 16, "train", "bf16", "sdpa", True),
    ("vit-s", 384, 8, 1, "train", "amp-bf16", "eager", True),
    # inference under no_grad
    ("vit-ti", 224, 16, 16, "infer", "fp32", "sdpa", False),
    ("vit-ti", 224, 32, 8, "infer", "bf16", "eager", False),
    ("vit-ti", 384, 8, 1, "infer", "fp32", "eager", False),
    ("vit-s", 224, 16, 4, "infer", "amp-bf16", "eager", False),
    ("vit-s", 384, 16, 8, "infer", "bf16", "sdpa", False),
    ("vit-s", 384, 8, 1, "infer", "amp-bf16", "sdpa", False),
    ("vit-b", 224, 8, 1, "infer", "bf16", "sdpa", False),
    ("vit-b", 224, 32, 16, "infer", "fp32", "sdpa", False),
    ("vit-b", 224, 16, 16, "infer", "bf16", "eager", False),
    ("vit-b", 384, 16, 2, "infer", "fp32", "eager", False),
    ("vit-b", 384, 32, 8, "infer", "amp-bf16", "eager", False),
    ("vit-b", 384, 8, 1, "infer", "amp-bf16", "sdpa", False),
]

# architecture variants: (plan keyword arguments beyond the model's), each on the reference ViT
VARIANTS = [
    dict(model="vit-ti", image=224, patch=16, patch_stride=12, batch=4, mode="train", precision="amp-bf16"),
    dict(model="vit-s", image=224, patch=16, patch_stride=8, batch=1, mode="infer", precision="bf16"),
    dict(model="vit-ti", image=224, patch=16, pos_embed="sincos-1d", batch=8, mode="train", precision="fp32"),
    dict(model="vit-ti", image=224, patch=16, pos_embed="rope-2d", batch=8, mode="train", precision="amp-bf16"),
    dict(model="vit-s", image=224, patch=16, pos_embed="rope-2d", batch=4, mode="train", precision="bf16",
         checkpointing="full"),
    dict(model="vit-ti", image=224, patch=16, pos_embed="relative-bias", attention="eager", batch=4, mode="train",
         precision="amp-bf16"),
    dict(model="vit-s", image=224, patch=16, pos_embed="relative-bias", attention="eager-postscale", batch=2,
         mode="train", precision="fp32", keep_grads=True),
    dict(model="vit-s", image=224, patch=16, pos_embed="relative-bias", attention="eager", batch=4, mode="infer",
         precision="amp-bf16"),
]

AXES = {
    "model": {"vit-ti", "vit-s", "vit-b"},
    "patch": {8, 16, 32},
    "image": {224, 384},
    "precision": {"fp32", "bf16", "amp-bf16"},
    "attention": {"eager", "sdpa"},
    "mode": {"train", "infer"},
}


def covered() -> None:
    """Every listed value of every axis appears in the grid (and batch spans 1 to 16)."""
    seen = {axis: set() for axis in AXES}
    for model, image, patch, batch, mode, precision, attention, keep in GRID:
        for axis, value in zip(("model", "image", "patch", "mode", "precision", "attention"),
                               (model, image, patch, mode, precision, attention)):
            seen[axis].add(value)
    for axis, values in AXES.items():
        missing = values - seen[axis]
        if missing:
            raise SystemExit(f"grid misses {axis} {sorted(missing)}")
    batches = {row[3] for row in GRID}
    if min(batches) != 1 or max(batches) != 16:
        raise SystemExit("grid batches must span 1 to 16")
    if {row[7] for row in GRID if row[4] == "train"} != {False, True}:
        raise SystemExit("grid must train with both zero_grad modes")
    if len(GRID) < 24:
        raise SystemExit("grid needs at least 24 rows")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def pct(err) -> str:
    return "n/a" if err is None else f"{100 * err:+.4f}%"


def run_grid(calls, tolerance: float, row_limit_bytes: int = ROW_LIMIT_BYTES):
    """Measure each call (``vitcost`` keyword arguments, a label for the log) on the CPU.
    Every row's predicted peak is checked against ``row_limit_bytes`` before any row runs,
    so a grid that would not fit this machine is refused whole. Returns the results and the
    seconds the measuring took."""
    import vitcost
    from vitcost.calibrate import calibrate

    for kwargs, label in calls:
        peak = vitcost.plan(device="cpu", **kwargs).memory.peak
        if peak > row_limit_bytes:
            raise SystemExit(f"{kwargs['model']} {kwargs['image']} batch {kwargs['batch']} {label}: predicted "
                             f"peak {gib(peak)} is over the {gib(row_limit_bytes)} a row may use")
    results = []
    start = time.perf_counter()
    for i, (kwargs, label) in enumerate(calls, 1):
        (cal,) = calibrate(device="cpu", tolerance=tolerance, **kwargs).results
        results.append(cal)
        worst = cal.worst
        print(f"[{i:2}/{len(calls)}] {cal.label} {label}: {cal.status}, "
              f"worst {worst.name} {pct(worst.error)}, {cal.seconds:.1f} s", file=sys.stderr, flush=True)
    return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "accuracy.md")
    parser.add_argument("--json", type=Path, default=None, help="also write every row's figures as JSON")
    parser.add_argument("--limit", type=int, default=None, help="run only the first N rows (a smoke test)")
    args = parser.parse_args()
    covered()

    import torch

    rows = GRID[: args.limit] if args.limit else GRID
    calls = [(dict(model=model, image=image, patch=patch, batch=batch, mode=mode, precision=precision,
                   attention=attention, keep_grads=keep), f"{mode} {precision} {attention} keep_grads={keep}")
             for model, image, patch, batch, mode, precision, attention, keep in rows]
    if not args.limit:
        calls += [(kw, " ".join(f"{k}={v}" for k, v in kw.items() if k not in ("model", "image", "patch", "batch")))
                  for kw in VARIANTS]
    results, seconds = run_grid(calls, TOLERANCE)

    write_markdown(args.out, results, seconds, torch.__version__, torch.get_num_threads())
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    bad = [r for r in results if r.failures or r.status not in ("ok", "off")]
    print(f"{len(results)} rows in {seconds:.0f} s; {len(bad)} outside ±{100 * TOLERANCE:g}% or not measured; "
          f"wrote {args.out}", file=sys.stderr)
    sys.exit(1 if bad else 0)


INTRO = [
    "# Accuracy: predicted against measured",
    "",
    "Written by `python benchmarks/accuracy.py` (do not edit by hand). Each row is the reference",
    "ViT (vitcost/reference_vit.py, mirrors timm) run for real by `vitcost calibrate` on the CPU:",
    "one warm-up step, then one steady-state step measured by PyTorch's MemTracker (bytes of",
    "every live tensor, by category, at the peak); parameters and MACs by `numel()` and",
    "FlopCounterMode on the meta device. The prediction is `vitcost plan --device cpu` (the CPU",
    "rules: CPU autocast policy, no allocator rounding, single-tensor optimizer). The last rows",
    "are architecture variants of the same model (an overlapping patch embedding, sin-cos, RoPE-2D",
    "and BEiT's relative position bias), named in the model column.",
]


def write_markdown(path: Path, results, seconds: float, torch_version: str, threads: int,
                   intro: list[str] = INTRO, tolerance: float = TOLERANCE, outro: list[str] = ()) -> None:
    """The report; ``intro``: its title and first paragraph (what was run, and how);
    ``outro``: what explains the figures that differ."""
    def row_error(cal):
        w = cal.worst
        return float("inf") if w is None or w.error is None else abs(w.error)

    worst_cal = max(results, key=row_error)
    worst_fig = worst_cal.worst
    measured = [r for r in results if r.status in ("ok", "off")]
    peak_cal = max(measured, key=lambda r: abs(r.figure("peak_bytes").error or 0.0))
    peak_fig = peak_cal.figure("peak_bytes")
    exact = sum(all(f.measured == f.predicted for f in r.figures) for r in results)
    figures = sum(len(r.figures) for r in results)
    lines = [
        *intro,
        "",
        f"- machine: {cpu_name()}, {threads} torch threads, no GPU; torch {torch_version}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- grid: {len(results)} configurations in **{seconds:.0f} s** ({seconds / 60:.1f} min), "
        f"{figures} figures compared, tolerance ±{100 * tolerance:g}%",
        f"- rows where every figure matches to the byte / MAC: **{exact} of {len(results)}**; "
        f"rows with a figure outside ±{100 * tolerance:g}%: **{sum(bool(r.failures) for r in results)}**",
        ("- worst figure: none, every figure of every row is exact" if worst_fig.error == 0 else
         f"- worst figure: **{worst_cal.label}, {worst_cal.report.workload.mode.value}, "
         f"{worst_cal.report.workload.precision.value}, {worst_cal.report.workload.attention.value}**: "
         f"{worst_fig.name} {pct(worst_fig.error)} "
         f"(predicted {worst_fig.predicted:,}, measured {worst_fig.measured:,})"),
        f"- worst peak: **{peak_cal.label}, {peak_cal.report.workload.mode.value}, "
        f"{peak_cal.report.workload.precision.value}, {peak_cal.report.workload.attention.value}**: "
        f"{pct(peak_fig.error)} (predicted {peak_fig.predicted:,}, measured {peak_fig.measured:,}); "
        f"training peaks within ±{100 * tolerance:g}%: "
        f"{sum(r.figure('peak_bytes').within(tolerance) for r in measured if r.report.workload.training)} of "
        f"{sum(r.report.workload.training for r in measured)}, inference peaks: "
        f"{sum(r.figure('peak_bytes').within(tolerance) for r in measured if not r.report.workload.training)} of "
        f"{sum(not r.report.workload.training for r in measured)}",
        "",
        "Columns: `peak` is the largest total of live tensors during the step; `saved` is what is",
        "live at the end of the forward pass (tensors saved for backward, the input batch and",
        "autocast's weight copies; under `no_grad`, the input batch); `worst` is the largest error",
        "of all ten figures of the row (parameters, forward and training MACs, weights, gradients,",
        "optimizer states, activations and temporaries at the peak, saved, peak). Errors are",
        "(predicted - measured) / measured. `zero_grad`: `none` is `set_to_none=True`, `keep` is",
        "`set_to_none=False`.",
        "",
        "| # | model | image | patch | tokens | batch | mode | precision | attention | zero_grad "
        "| checkpointing | predicted peak (bytes) | measured peak (bytes) | peak error | saved error "
        "| worst figure | s |",
        "|--:|---|--:|--:|--:|--:|---|---|---|---|---|--:|--:|--:|--:|---|--:|",
    ]
    for i, r in enumerate(results, 1):
        s, w = r.report.spec, r.report.workload
        peak = r.figure("peak_bytes") if r.status in ("ok", "off") else None
        saved = r.figure("end_of_forward_bytes") if r.status in ("ok", "off") else None
        worst = r.worst
        zero_grad = ("keep" if w.keep_grads else "none") if w.training else "-"
        size = f"{s.image_h}" if s.image_h == s.image_w else f"{s.image_h}x{s.image_w}"
        variant = (f", {s.pos_embed.value}" if s.pos_embed.value != "learned" else "") + \
            (f", stride {s.patch_stride}" if s.patch_stride else "") + \
            (f", {s.pos_grid}x{s.pos_grid} table interpolated" if s.pos_grid else "")
        head = (f"| {i} | {s.name}{variant} | {size} | {s.patch} | {s.tokens:,} | {w.batch} | {w.mode.value} | "
                f"{w.precision.value} | {w.attention.value} | {zero_grad} | {w.checkpointing.value} | "
                f"{r.report.memory.peak:,} | ")
        lines.append(
            head + f"{peak.measured:,} | {pct(peak.error)} | {pct(saved.error)} | "
            f"{'exact' if worst.error == 0 else f'{worst.name} {pct(worst.error)}'} | {r.seconds:.1f} |"
            if peak else head + f"{r.message} | - | - | - | {r.seconds:.1f} |"
        )
    inexact = [(i, r) for i, r in enumerate(results, 1) if any(f.measured != f.predicted for f in r.figures)]
    if inexact:
        lines += [
            "",
            "## Every figure that differs",
            "",
            f"{len(inexact)} row(s) have a figure that is not exact; "
            f"{sum(bool(r.failures) for _, r in inexact)} of them are outside ±{100 * tolerance:g}% (marked **off**).",
            "",
            "| # | row | figure | predicted | measured | difference | error |",
            "|--:|---|---|--:|--:|--:|--:|",
        ]
        for i, r in inexact:
            w = r.report.workload
            what = f"{r.label} {w.mode.value} {w.precision.value} {w.attention.value}"
            for f in r.figures:
                if f.measured != f.predicted:
                    mark = "" if f.within(tolerance) else " **off**"
                    lines.append(f"| {i} | {what} | {f.name} | {f.predicted:,} | {f.measured:,} | "
                                 f"{f.difference:+,} | {pct(f.error)}{mark} |")
    lines += [*outro,
        "",
        "The CPU allocator does not round, so the same configuration gives the same bytes on every",
        "run: an error of a single byte would mean a wrong rule, not noise. CUDA figures (512-byte",
        "blocks, the caching allocator's reserve, the CUDA context) need a GPU: `vitcost calibrate",
        "--device cuda` there, and `--save` to keep what it finds for `plan`.",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
