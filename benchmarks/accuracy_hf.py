"""Accuracy of ``--impl hf`` against Hugging Face's own models on the CPU, written to
docs/accuracy-hf.md.

A grid over Hugging Face transformers' ViT (ViTForImageClassification), DeiT distilled
(DeiTForImageClassificationWithTeacher), DINOv2 (Dinov2ForImageClassification) and DINOv2
with registers (Dinov2WithRegistersForImageClassification / Model), the SwiGLU DINOv2, VideoMAE
(VideoMAEForVideoClassification), MAE pretraining (ViTMAEForPreTraining) and Swin
(SwinForImageClassification): training and inference,
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import run_grid, write_markdown  # noqa: E402

ROW_LIMIT_BYTES = 6 * 2**30
TOLERANCE = 0.005

# (model, model options, image, batch, mode, precision, attention, checkpointing)
VIT = ("vit-b", {})
DEIT = ("deit_small_distilled_patch16_224", {})
DINO = ("vit_small_patch14_dinov2", {"classes": 1000})  # Dinov2ForImageClassification
DINO_REG = ("vit_base_patch14_reg4_dinov2", {"classes": 1000})  # ...WithRegistersForImageClassification
DINO_REG_BACKBONE = ("vit_base_patch14_reg4_dinov2", {})  # Dinov2WithRegistersModel
# ViTMAEForPreTraining at facebook/vit-mae-base's sizes: a ViT-B/16 encoder on the 49 visible
# patches, a 512-wide, 8-layer, 16-head decoder on all 197
# Dinov2ForImageClassification with use_swiglu_ffn, at ViT-S/14's width
DINO_SWIGLU = ("vit_small_patch14_dinov2", {"classes": 1000, "mlp": "swiglu", "mlp_hidden": 1024})
# VideoMAEForVideoClassification at videomae-small's width: 16 frames in tubelets of 2, 112 px
VIDEO = ("vit-s", {"classes": 400, "frames": 16, "tubelet": 2, "class_token": False, "pos_embed": "sincos",
                   "pooling": "avg"})
MAE = ("vit-b", {"classes": 0, "mae": {"mask_ratio": 0.75, "decoder_dim": 512, "decoder_depth": 8,
                                      "decoder_heads": 16, "decoder_mlp_hidden": 2048}})
GRID = [
    (*VIT, 224, 8, "train", "amp-bf16", "sdpa", "none"),
    (*VIT, 224, 4, "train", "fp32", "eager", "none"),
    (*VIT, 224, 2, "train", "bf16", "eager", "full"),
    (*VIT, 384, 1, "train", "amp-bf16", "eager", "none"),
    (*VIT, 224, 16, "infer", "amp-bf16", "eager", "none"),
    (*VIT, 224, 16, "infer", "fp32", "sdpa", "none"),
    ("vit-s", {}, "224x320", 4, "train", "amp-bf16", "sdpa", "full"),
    # built for 224 px, run at 384 / 320 with interpolate_pos_encoding=True: the table interpolated every step
    (VIT[0], {**VIT[1], "pos_grid": 14}, 384, 2, "train", "amp-bf16", "sdpa", "none"),
    (VIT[0], {**VIT[1], "pos_grid": 14}, 320, 2, "train", "bf16", "eager", "none"),
    (*DEIT, 224, 16, "train", "amp-bf16", "sdpa", "none"),
    (*DEIT, 224, 4, "train", "fp32", "eager", "none"),
    (*DEIT, 224, 8, "train", "bf16", "sdpa", "full"),
    (*DEIT, 224, 1, "infer", "bf16", "eager", "none"),
    (*DINO, 224, 8, "train", "amp-bf16", "sdpa", "none"),
    (*DINO, 224, 4, "train", "bf16", "eager", "none"),
    (*DINO, 224, 2, "train", "fp32", "sdpa", "full"),
    (*DINO, 224, 1, "train", "amp-bf16", "eager", "full"),
    (*DINO, 224, 16, "infer", "amp-bf16", "eager", "none"),
    # built for 518 px (facebook/dinov2-small), fine-tuned at 224: the table interpolated every step
    ("vit_small_patch14_dinov2", {"classes": 1000, "pos_grid": 37}, 224, 8, "train", "amp-bf16", "sdpa", "none"),
    (*DINO_REG, 224, 4, "train", "amp-bf16", "sdpa", "none"),
    (*DINO_REG, 224, 1, "train", "fp32", "eager", "none"),
    (*DINO_REG, 224, 2, "train", "amp-bf16", "eager", "full"),
    (*DINO_REG_BACKBONE, 224, 8, "infer", "bf16", "sdpa", "none"),
    (*DINO_REG_BACKBONE, 224, 16, "infer", "fp32", "eager", "none"),
    (*DINO_SWIGLU, 224, 8, "train", "amp-bf16", "sdpa", "none"),
    (*DINO_SWIGLU, 224, 2, "train", "bf16", "eager", "full"),
    (*VIDEO, 112, 8, "train", "amp-bf16", "sdpa", "none"),
    (*VIDEO, 112, 2, "train", "fp32", "eager", "full"),
    (*VIDEO, 112, 16, "infer", "bf16", "sdpa", "none"),
    (*MAE, 224, 16, "train", "amp-bf16", "sdpa", "none"),
    (*MAE, 224, 4, "train", "fp32", "eager", "none"),
    (*MAE, 224, 8, "train", "bf16", "sdpa", "full"),
    (*MAE, 224, 1, "train", "amp-bf16", "eager", "full"),
    (*MAE, 224, 8, "infer", "amp-bf16", "eager", "none"),
    # SwinForImageClassification: Swin-T/S/B (7 x 7 windows, the last stage one window), and
    # Swin-B at 384 (12 x 12 windows); SDPA trains through the CPU's math fallback
    ("swin-t", {}, 224, 8, "train", "amp-bf16", "sdpa", "none"),
    ("swin-t", {}, 224, 4, "train", "fp32", "eager", "none"),
    ("swin-t", {}, 224, 16, "infer", "fp32", "eager", "none"),
    ("swin-t", {}, 224, 1, "infer", "bf16", "sdpa", "none"),
    ("swin-s", {}, 224, 4, "train", "bf16", "sdpa", "none"),
    ("swin-s", {}, 224, 2, "train", "amp-bf16", "eager", "none"),
    ("swin-b", {}, 224, 2, "train", "fp32", "sdpa", "none"),
    ("swin-b", {}, 224, 16, "infer", "amp-bf16", "sdpa", "none"),
    ("swin_base_patch4_window12_384", {}, 384, 1, "train", "amp-bf16", "eager", "none"),
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
    "Dinov2WithRegistersModel where `classes` is 0; the SwiGLU DINOv2; VideoMAEForVideoClassification",
    "at videomae-small's width, 16 frames in tubelets of 2; ViTMAEForPreTraining at vit-mae-base's",
    "sizes, mask ratio 0.75, its own loss; SwinForImageClassification at Swin-T/S/B's sizes, and",
    "Swin-B with 12 x 12 windows at 384), built from a config with random weights",
    "(`vitcost.hf_models`) and run for real by `vitcost calibrate --impl hf` on the CPU: one",
    "warm-up step, then one steady-state step measured by PyTorch's MemTracker; parameters and",
    "MACs of the same class on the meta device. The prediction is `vitcost plan --impl hf",
    "--device cpu`. The model names are timm's, for their sizes; `--impl hf` runs Hugging Face's",
    "code at those sizes (a DINOv2 name gets Hugging Face's DINOv2 head and mask token).",
]


# Rows whose figures differ, and why. MemTracker observes a step through module hooks, and
# those hooks can keep a tensor alive that an unobserved step frees; where that moves the
# peak, the row is explained here rather than fitted.
EXPLAINED = {
    ("vit-s", 112, 2, "train", "fp32", "eager", "full"): (
        "VideoMAE-S, 16 frames at 112 px (392 tokens, 6 heads), fp32 eager: observing the step "
        "changes it. A dispatch-level tracer (every allocation and free, no module hooks) sees the "
        "step peak at the replay's figure, 71,304,812 bytes at depth 1; the same tracer with "
        "MemTracker's module hooks also around the step sees one more B x N x D tensor (1,204,224 "
        "bytes) alive in softmax's backward, and a peak of 72,151,020 there, as MemTracker reports. "
        "The peak error (-0.22%) is the observer's (most likely its backward hooks holding a "
        "gradient at `VideoMAESelfAttention`'s boundary); the categories moved with the peak."),
}


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

    rows = GRID[: args.limit] if args.limit else GRID
    calls = [(dict(model=model, image=image, batch=batch, mode=mode, precision=precision, attention=attention,
                   checkpointing=ck, impl="hf", **arch), f"{mode} {precision} {attention} checkpointing={ck}")
             for model, arch, image, batch, mode, precision, attention, ck in rows]
    results, seconds = run_grid(calls, TOLERANCE, ROW_LIMIT_BYTES)
    explained = {i for i, row in enumerate(rows) if (row[0], *row[2:]) in EXPLAINED}
    outro = []
    if explained:
        outro = ["", "## Explained residues", ""]
        outro += [f"- row {i + 1}: {EXPLAINED[(rows[i][0], *rows[i][2:])]}" for i in sorted(explained)]
    write_markdown(args.out, results, seconds, torch.__version__, torch.get_num_threads(), intro=INTRO,
                   tolerance=TOLERANCE, outro=outro)
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    bad = [r for i, r in enumerate(results)
           if r.status not in ("ok", "off") or (r.failures and not (
               i in explained and r.figure("peak_bytes").within(TOLERANCE)))]
    print(f"{len(results)} rows in {seconds:.0f} s; {len(bad)} outside ±{100 * TOLERANCE:g}% or not measured; "
          f"wrote {args.out}", file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
