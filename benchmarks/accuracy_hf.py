"""Accuracy of ``--impl hf`` against Hugging Face's own models on the CPU, written to
docs/accuracy-hf.md.

A grid over Hugging Face transformers' ViT (ViTForImageClassification), DeiT distilled
(DeiTForImageClassificationWithTeacher), DINOv2 (Dinov2ForImageClassification) and DINOv2
with registers (Dinov2WithRegistersForImageClassification / Model): training and inference,
eager and sdpa attention, fp32, bf16 and amp-bf16, activation checkpointing, a non-square
image, batch 1 to 16. Each model is built from a config with random weights (no download)
and run for real through ``vitcost calibrate``: a warm-up step, then one steady-state step
measured by MemTracker; parameters and MACs of the same class on the meta device. The
prediction is ``vitcost plan --impl hf --device cpu``. Exits 1 when a figure is off by
more than 0.5%.

Run: python benchmarks/accuracy_hf.py [--out docs/accuracy-hf.md] [--json rows.json] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import gib, pct, write_markdown  # noqa: E402

ROW_LIMIT_BYTES = 6 * 2**30
TOLERANCE = 0.005

# (model, model options, image, batch, mode, precision, attention, checkpointing)
VIT = ("vit-b", {})
DEIT = ("deit_small_distilled_patch16_224", {})
DINO = ("vit_small_patch14_dinov2", {"classes": 1000})  # Dinov2ForImageClassification
DINO_REG = ("vit_base_patch14_reg4_dinov2", {"classes": 1000})  # ...WithRegistersForImageClassification
DINO_REG_BACKBONE = ("vit_base_patch14_reg4_dinov2", {})  # Dinov2WithRegistersModel
GRID = [
    (*VIT, 224, 8, "train", "amp-bf16", "sdpa", "none"),
    (*VIT, 224, 4, "train", "fp32", "eager", "none"),
    (*VIT, 224, 2, "train", "bf16", "eager", "full"),
    (*VIT, 384, 1, "train", "amp-bf16", "eager", "none"),
    (*VIT, 224, 16, "infer", "amp-bf16", "eager", "none"),
    (*VIT, 224, 16, "infer", "fp32", "sdpa", "none"),
    ("vit-s", {}, "224x320", 4, "train", "amp-bf16", "sdpa", "full"),
    (*DEIT, 224, 16, "train", "amp-bf16", "sdpa", "none"),
    (*DEIT, 224, 4, "train", "fp32", "eager", "none"),
    (*DEIT, 224, 8, "train", "bf16", "sdpa", "full"),
    (*DEIT, 224, 1, "infer", "bf16", "eager", "none"),
    (*DINO, 224, 8, "train", "amp-bf16", "sdpa", "none"),
    (*DINO, 224, 4, "train", "bf16", "eager", "none"),
    (*DINO, 224, 2, "train", "fp32", "sdpa", "full"),
    (*DINO, 224, 1, "train", "amp-bf16", "eager", "full"),
    (*DINO, 224, 16, "infer", "amp-bf16", "eager", "none"),
    (*DINO_REG, 224, 4, "train", "amp-bf16", "sdpa", "none"),
    (*DINO_REG, 224, 1, "train", "fp32", "eager", "none"),
    (*DINO_REG, 224, 2, "train", "amp-bf16", "eager", "full"),
    (*DINO_REG_BACKBONE, 224, 8, "infer", "bf16", "sdpa", "none"),
    (*DINO_REG_BACKBONE, 224, 16, "infer", "fp32", "eager", "none"),
]

AXES = {
    "precision": {"fp32", "bf16", "amp-bf16"},
    "attention": {"eager", "sdpa"},
    "mode": {"train", "infer"},
    "checkpointing": {"none", "full"},
}

INTRO = [
    "# Accuracy of `--impl hf`: predicted against Hugging Face's models",
    "",
    "Written by `python benchmarks/accuracy_hf.py` (do not edit by hand). Each row is a Hugging",
    "Face transformers model (ViTForImageClassification; DeiTForImageClassificationWithTeacher;",
    "Dinov2ForImageClassification; Dinov2WithRegistersForImageClassification, or",
    "Dinov2WithRegistersModel where `classes` is 0), built from a config with random weights",
    "(`vitcost.hf_models`) and run for real by `vitcost calibrate --impl hf` on the CPU: one",
    "warm-up step, then one steady-state step measured by PyTorch's MemTracker; parameters and",
    "MACs of the same class on the meta device. The prediction is `vitcost plan --impl hf",
    "--device cpu`. The model names are timm's, for their sizes; `--impl hf` runs Hugging Face's",
    "code at those sizes (a DINOv2 name gets Hugging Face's DINOv2 head and mask token).",
]


def covered() -> None:
    seen = {axis: set() for axis in AXES}
    for row in GRID:
        for axis, value in zip(("mode", "precision", "attention", "checkpointing"), row[4:]):
            seen[axis].add(value)
    for axis, values in AXES.items():
        if values - seen[axis]:
            raise SystemExit(f"grid misses {axis} {sorted(values - seen[axis])}")
    batches = {row[3] for row in GRID}
    if min(batches) != 1 or max(batches) != 16:
        raise SystemExit("grid batches must span 1 to 16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "accuracy-hf.md")
    parser.add_argument("--json", type=Path, default=None, help="also write every row's figures as JSON")
    parser.add_argument("--limit", type=int, default=None, help="run only the first N rows (a smoke test)")
    args = parser.parse_args()
    covered()

    import torch

    import vitcost
    from vitcost.calibrate import calibrate

    rows = GRID[: args.limit] if args.limit else GRID
    for model, arch, image, batch, mode, precision, attention, ck in rows:  # refuse before running
        peak = vitcost.plan(model, image=image, batch=batch, mode=mode, precision=precision, attention=attention,
                            checkpointing=ck, device="cpu", impl="hf", **arch).memory.peak
        if peak > ROW_LIMIT_BYTES:
            raise SystemExit(f"{model} {image} batch {batch} {mode}: predicted peak {gib(peak)} "
                             f"is over the {gib(ROW_LIMIT_BYTES)} a row may use")
    results = []
    start = time.perf_counter()
    for i, (model, arch, image, batch, mode, precision, attention, ck) in enumerate(rows, 1):
        run = calibrate(model, image=image, batch=batch, mode=mode, precision=precision, attention=attention,
                        checkpointing=ck, device="cpu", tolerance=TOLERANCE, impl="hf", **arch)
        (cal,) = run.results
        results.append(cal)
        worst = cal.worst
        print(f"[{i:2}/{len(rows)}] {cal.label} {mode} {precision} {attention} checkpointing={ck}: {cal.status}, "
              f"worst {worst.name} {pct(worst.error)}, {cal.seconds:.1f} s", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    write_markdown(args.out, results, seconds, torch.__version__, torch.get_num_threads(), intro=INTRO,
                   tolerance=TOLERANCE)
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    bad = [r for r in results if r.failures or r.status not in ("ok", "off")]
    print(f"{len(results)} rows in {seconds:.0f} s; {len(bad)} outside ±{100 * TOLERANCE:g}% or not measured; "
          f"wrote {args.out}", file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
