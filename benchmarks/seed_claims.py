"""Every numeric claim of the tutorials vitcost grew from, checked by vitcost; written to
docs/seed-claims.md.

Each claim (paraphrased from the tutorials' list) carries the vitcost command that checks it,
a check that computes vitcost's figures through the API and returns its verdict — ``holds``,
``wrong`` (with the right figure) or ``outside`` (vitcost's scope, and why) — and the verdict
recorded when the table was written. ``tests/test_seed_claims.py`` runs every check and holds
it to that verdict, so a change in vitcost that flips one fails the tests.

Run: python benchmarks/seed_claims.py [--out docs/seed-claims.md]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import vitcost  # noqa: E402

HOLDS, WRONG, OUTSIDE = "holds", "wrong", "outside"
GB = 1e9


@dataclass(frozen=True)
class Claim:
    claim: str  # the tutorial's words, paraphrased
    command: str  # the vitcost command that checks it
    expected: str  # the verdict recorded in docs/seed-claims.md
    check: Callable[[], tuple[str, str]]  # -> (verdict, vitcost's figure)


def plan(*args, **kwargs):
    return vitcost.plan(*args, **kwargs)


def _near(value: float, claimed: float, within: float) -> bool:
    return abs(value - claimed) <= within * claimed


def _attn_macs(report) -> int:
    """The attention products' MACs (q kᵀ and attention times v) per image."""
    return report.macs_forward["blocks/attn/q_kT"] + report.macs_forward["blocks/attn/attn_v"]


# --- tokens and attention maps ----------------------------------------------------------------


def _tokens_512(patch: int, tokens: int, elements: float) -> Callable[[], tuple[str, str]]:
    def check():
        r = plan(image=512, patch=patch)
        ok = r.tokens["patches"] == tokens and _near(r.attention_maps["elements_per_head"], elements, 0.02)
        return (HOLDS if ok else WRONG,
                f"{r.tokens['patches']:,} patches ({r.tokens['total']:,} tokens with the class token); "
                f"{r.attention_maps['elements_per_head']:,} elements per head")
    return check


def _scaling_32_to_8():
    r8, r32 = plan(image=512, patch=8), plan(image=512, patch=32)
    ratio = r8.attention_maps["elements_per_head"] / r32.attention_maps["elements_per_head"]
    patches = (r8.tokens["patches"] / r32.tokens["patches"]) ** 2
    return (HOLDS if _near(ratio, 258, 0.005) else WRONG,
            f"{patches:.0f}x for the patches' maps ((4096/256)^2), {ratio:.1f}x with the class token; "
            "never 258x")


def _halving_patch():
    r16, r8 = plan("vit-b"), plan("vit-b", patch=8)
    tokens = r8.tokens["patches"] / r16.tokens["patches"]
    attention = _attn_macs(r8) / _attn_macs(r16)
    ok = tokens == 4 and _near(attention, 16, 0.02)
    return (HOLDS if ok else WRONG,
            f"ViT-B at 224, patch 16 -> 8: {tokens:.0f}x patches, {attention:.2f}x the attention products' MACs "
            f"(16x without the class token); the whole forward {r8.macs_forward_per_image / r16.macs_forward_per_image:.2f}x")


def _doubling_image():
    r224, r448 = plan("vit-b"), plan("vit-b", image=448)
    attention = _attn_macs(r448) / _attn_macs(r224)
    return (HOLDS if _near(attention, 4, 0.05) else WRONG,
            f"ViT-B/16, 224 -> 448: {r448.tokens['patches'] // r224.tokens['patches']}x tokens and "
            f"{attention:.2f}x the attention products' MACs (16x: quadratic in the tokens), not 4x")


def _inverse_p4():
    e16, e8 = plan("vit-b", attention="eager"), plan("vit-b", attention="eager", patch=8)
    maps = e8.attention_maps["bytes_per_layer"] / e16.attention_maps["bytes_per_layer"]
    peak = e8.peak_bytes / e16.peak_bytes
    return (HOLDS if _near(peak, 16, 0.1) else WRONG,
            f"ViT-B at 224, batch 8, eager, patch 16 -> 8: the kept attention maps {maps:.1f}x (1/P^4 holds for "
            f"them), the step's peak {peak:.2f}x (everything else grows as the tokens, 1/P^2; under SDPA no maps "
            "are kept at all)")


def _information_cost():
    return (OUTSIDE, "'cost per bit of information' and 'information loss' are not defined quantities; vitcost "
                     "reports pixels per token (P^2 C) and cost per image instead")


def _tokens_384():
    r = plan("vit-b", image=384)
    a = r.attention_maps
    ok = r.tokens["patches"] == 576 and _near(a["elements_per_head"], 331_776, 0.01) and \
        _near(a["elements_per_layer"], 4e6, 0.01)
    return (HOLDS if ok else WRONG,
            f"{r.tokens['patches']} patches; {a['elements_per_head']:,} elements per head with the class token "
            f"(331,776 without); {a['elements_per_layer']:,} per layer of 12 heads")


def _tokens_1024():
    r = plan("vit-b", image=1024)
    ok = r.tokens["patches"] == 4096 and _near(r.attention_maps["elements_per_head"], 16e6 * 1.048576, 0.01)
    return (HOLDS if ok else WRONG,
            f"{r.tokens['patches']:,} patches; {r.attention_maps['elements_per_head']:,} elements per head "
            "(16.8M; '16M' is 4096^2 = 16,777,216 read in binary millions)")


# --- ViT-B/16 anatomy -------------------------------------------------------------------------


def _vit_b_anatomy():
    r = plan("vit-b")
    s = r.spec
    ok = (r.tokens["patches"] == 196 and s.patch * s.patch * s.channels == 768 and r.tokens["total"] == 197
          and s.dim == 768 and s.heads == 12 and s.head_dim == 64 and s.mlp_hidden == 3072 and s.classes == 1000
          and r.params["patch_embed"] == 768 * (768 + 1))
    return (HOLDS if ok else WRONG,
            f"196 patches of 16x16x3 = 768 values; projection {r.params['patch_embed']:,} parameters = "
            "768 x (768 + 1); 197 tokens of 768; 12 heads of 64; MLP 768 -> 3072 -> 768; head 768 -> 1000")


def _attention_params():
    r = plan("vit-b")
    d, depth = r.spec.dim, r.spec.depth
    per_block = (r.params["blocks/attn/qkv"] + r.params["blocks/attn/proj"]) // depth
    return (HOLDS if per_block == 3 * d * d else WRONG,
            f"{per_block:,} per block = 4 D^2 + 4 D (q, k, v and the output projection, with biases); "
            f"3 D^2 leaves out the output projection")


def _mlp_params():
    r = plan("vit-b")
    d, depth = r.spec.dim, r.spec.depth
    per_block = (r.params["blocks/mlp/fc1"] + r.params["blocks/mlp/fc2"]) // depth
    return (HOLDS if _near(per_block, 8 * d * d, 0.001) else WRONG,
            f"{per_block:,} per block = 8 D^2 + 5 D (the biases 4 D + D)")


def _norm_params():
    r = plan("vit-b")
    per_norm = r.params["blocks/norm1"] // r.spec.depth
    return (HOLDS if per_norm == 2 * r.spec.dim else WRONG,
            f"{per_norm:,} per LayerNorm = 2 D (two per block: 4 D); the residual adds none")


def _attention_stack_macs():
    r = plan("vit-b")
    products = _attn_macs(r)
    return (HOLDS if _near(products, 4.3e9, 0.1) else WRONG,
            f"197^2 x 768 = {197 ** 2 * 768 / 1e6:.1f}M MACs is q kᵀ for all 12 heads of a layer, not one head; "
            f"q kᵀ and attention x v over 12 layers: {products / 1e9:.2f} GMACs; with the q, k, v and output "
            f"projections {(products + r.macs_forward['blocks/attn/qkv'] + r.macs_forward['blocks/attn/proj']) / 1e9:.2f}; "
            f"the whole forward {r.macs_forward_per_image / 1e9:.2f} GMACs")


def _resnet_comparison():
    r = plan("vit-b")
    ratio = r.macs_forward_per_image / 4.1e9
    return (HOLDS if _near(ratio, 1, 0.2) else WRONG,
            f"ViT-B/16 at 224 is {r.macs_forward_per_image / 1e9:.2f} GMACs, {ratio:.1f}x ResNet-50's 4.1")


def _b32_faster():
    r16, r32 = plan("vit-b"), plan("vit-b", patch=32)
    macs = r16.macs_forward_per_image / r32.macs_forward_per_image
    t16, t32 = plan("vit-b", gpu="a100", batch=64), plan("vit-b", patch=32, gpu="a100", batch=64)
    speed = t16.time.step_seconds / t32.time.step_seconds
    return (HOLDS if _near(speed, 4, 0.15) else WRONG,
            f"{r32.tokens['patches']} patches (50 tokens) and {macs:.2f}x fewer MACs, but a training step at batch 64 "
            f"on an A100 only {speed:.2f}x faster by vitcost's time model (its smaller matmuls and the memory-bound "
            "kernels use the GPU less well)")


def _b8_compute():
    r16, r8 = plan("vit-b"), plan("vit-b", patch=8)
    macs = r8.macs_forward_per_image / r16.macs_forward_per_image
    return (HOLDS if _near(macs, 4, 0.1) else WRONG,
            f"{r8.tokens['patches']} patches; {macs:.2f}x the MACs (the linears 4x, the attention products 16x)")


# --- training memory and time -----------------------------------------------------------------


def _gradient_storage():
    m = plan("vit-b").memory
    ratio = m.gradients / m.weights
    return (HOLDS if _near(ratio, 2, 0.05) else WRONG,
            f"{ratio:.1f}x the weights' bytes: one gradient per parameter, in its dtype")


def _adam_states():
    m = plan("vit-b").memory
    ratio = m.optimizer_states / m.weights
    return (HOLDS if 2 <= ratio <= 3 else WRONG, f"{ratio:.1f}x for AdamW (exp_avg and exp_avg_sq)")


def _checkpointing_slower():
    n, c = plan("vit-b", gpu="a100", batch=64), plan("vit-b", gpu="a100", batch=64, checkpointing="full")
    slow = c.time.step_seconds / n.time.step_seconds
    macs = c.macs_training_per_image / n.macs_training_per_image
    return (HOLDS if 2 <= slow <= 3 else WRONG,
            f"ViT-B/16, batch 64, A100: {slow:.2f}x the step time by vitcost's time model; {macs:.2f}x the "
            "training MACs (one more forward of the blocks, but fc2's)")


def _memory_linear_in_params():
    rs = [plan(m, batch=32) for m in ("vit-s", "vit-b", "vit-l")]
    params = [r.params_total / rs[0].params_total for r in rs]
    peak = [r.peak_bytes / rs[0].peak_bytes for r in rs]
    ok = all(_near(p, q, 0.2) for p, q in zip(peak, params))
    return (HOLDS if ok else WRONG,
            f"ViT-S/B/L at 224, batch 32: parameters 1 : {params[1]:.1f} : {params[2]:.1f}, training peak "
            f"1 : {peak[1]:.1f} : {peak[2]:.1f} (activations grow with width x depth, not width^2 x depth)")


def _time_superlinear():
    rs = [plan(m, batch=32, gpu="a100") for m in ("vit-s", "vit-b", "vit-l")]
    params = [r.params_total / rs[0].params_total for r in rs]
    time = [r.time.step_seconds / rs[0].time.step_seconds for r in rs]
    ok = all(t > p for t, p in zip(time[1:], params[1:]))
    return (HOLDS if ok else WRONG,
            f"ViT-S/B/L, batch 32, A100: parameters 1 : {params[1]:.1f} : {params[2]:.1f}, step time "
            f"1 : {time[1]:.1f} : {time[2]:.1f} by vitcost's time model: sub-linear (the small model's kernels "
            "use the GPU less well)")


# --- variants, encodings, hardware ------------------------------------------------------------


def _variant_params():
    names = {"vit-b": 86e6, "vit-l": 307e6, "vit_huge_patch14_224": 632e6, "vit_gigantic_patch14_224": 1.8e9}
    got = {name: plan(name).params_total for name in names}
    ok = all(_near(got[n], want, 0.03) for n, want in names.items())
    return (HOLDS if ok else WRONG,
            ", ".join(f"{n} {v / 1e6:,.0f}M" for n, v in got.items())
            + f"; 'ViT-Giant/14' is 1.8B only as ViT-G (gigantic): ViT-g/14 (giant) is "
              f"{plan('vit_giant_patch14_224').params_total / 1e9:.2f}B")


def _variant_fp16_memory():
    got = [plan(m).params_total * 2 / GB for m in ("vit-b", "vit-l", "vit_huge_patch14_224", "vit_gigantic_patch14_224")]
    return (OUTSIDE, "the column states no workload; fp16 weights alone are "
            + " / ".join(f"{g:.2f}" for g in got) + " GB, and any training or batch figure depends on what is run "
                                                    "(vitcost plan prices it)")


def _relative_positions():
    r = plan("swin-t")
    rows = r.params["blocks/attn/relative_bias"] // sum(k * h for k, h in zip(r.spec.swin.depths, r.spec.swin.heads))
    return (HOLDS if rows == 225 else WRONG,
            f"a 7 x 7 window has offsets -6..6 each way: (2 x 7 - 1)^2 = {rows} relative positions per head "
            "(Swin-T's tables); 225 = (2 x 7 + 1)^2 would be an 8 x 8 window's")


def _projection_params():
    r = plan("vit-b")
    d, p, c = r.spec.dim, r.spec.patch, r.spec.channels
    ok = r.params["patch_embed"] == d * (p * p * c + 1) and r.macs_forward["patch_embed"] == 196 * p * p * c * d
    return (HOLDS if ok else WRONG,
            f"D (P^2 C + 1) = {r.params['patch_embed']:,} parameters; P^2 C D = {p * p * c * d:,} MACs per patch")


def _transfer_positions():
    from vitcost.api import transfer

    row = transfer("vit_base_patch16_224", to=[384]).to_dict()["targets"][0]
    ok = row["positions_before"] == 197 and row["positions_after"] == 577
    return (HOLDS if ok else WRONG, f"{row['positions_before']} -> {row['positions_after']} positions; the "
                                    f"bicubic resampling {row['interpolation']['macs']:,} MACs, once at load")


def _tier(gpu: str, image: int, patch: int, batch: int) -> Callable[[], tuple[str, str]]:
    def check():
        r = plan("vit-b", image=image, patch=patch, gpu=gpu, batch=batch)
        fits, most = r.gpu.fits, r.gpu.max_batch_size
        ok = fits and most < 4 * batch  # the tier is right if the stated batch fits and is not far below the most
        return (HOLDS if ok else WRONG,
                f"ViT-B, {image}px patch {patch}, amp-bf16 sdpa training on {gpu}: batch {batch} "
                f"{'fits' if fits else 'does not fit'}; the largest that fits is {most:,}")
    return check


def _decision_matrix():
    return (OUTSIDE, "a patch size per application is advice about accuracy, which vitcost does not model; "
                     "vitcost prices each choice (compare --patch 4,8,16,32)")


CLAIMS = [
    Claim("512x512, patch 8: 4,096 tokens, 16.8M attention elements per head",
          "vitcost plan --image 512 --patch 8 --json", HOLDS, _tokens_512(8, 4096, 16.8e6)),
    Claim("512x512, patch 16: 1,024 tokens, 1.05M elements per head",
          "vitcost plan --image 512 --patch 16 --json", HOLDS, _tokens_512(16, 1024, 1.05e6)),
    Claim("512x512, patch 32: 256 tokens, 65K elements per head",
          "vitcost plan --image 512 --patch 32 --json", HOLDS, _tokens_512(32, 256, 65.5e3)),
    Claim("memory scaling factor from patch 32 to patch 8: 258x",
          "vitcost compare --image 512 --patch 32,8", WRONG, _scaling_32_to_8),
    Claim("halving the patch: 4x tokens, 16x attention compute",
          "vitcost compare --patch 16,8", HOLDS, _halving_patch),
    Claim("doubling the image size: 4x more attention computation",
          "vitcost compare --image 224,448", WRONG, _doubling_image),
    Claim("memory scales as O(1/P^4)",
          "vitcost compare --patch 16,8 --attention eager", WRONG, _inverse_p4),
    Claim("cost per bit of information O(D/P^2); an information-loss factor",
          "-", OUTSIDE, _information_cost),
    Claim("384x384, patch 16: N = 576, 331,776 elements per head, about 4M per layer of 12 heads",
          "vitcost plan --image 384 --json", HOLDS, _tokens_384),
    Claim("1024x1024, patch 16: 4,096 patches, a 16M-element attention matrix",
          "vitcost plan --image 1024 --json", HOLDS, _tokens_1024),
    Claim("ViT-B/16 at 224: 196 patches of 768 values, W_proj 768x768, 197 tokens, 12 heads of 64, MLP 768-3072-768, "
          "head 768-1000", "vitcost plan --model vit-b", HOLDS, _vit_b_anatomy),
    Claim("multi-head attention has 3 D^2 parameters per block",
          "vitcost plan --model vit-b", WRONG, _attention_params),
    Claim("the MLP has 8 D^2 parameters per block", "vitcost plan --model vit-b", HOLDS, _mlp_params),
    Claim("a LayerNorm has 2 D parameters; the residual none", "vitcost plan --model vit-b", HOLDS, _norm_params),
    Claim("197^2 x 768 = 30M MACs per head, x 12 heads x 12 layers: about 4.3 GMACs for the attention stack",
          "vitcost plan --model vit-b --json", WRONG, _attention_stack_macs),
    Claim("ViT-B/16 costs roughly a ResNet-50 (4.1 GMACs)", "vitcost plan --model vit-b", WRONG, _resnet_comparison),
    Claim("ViT-B/32: 49 tokens, 4x faster", "vitcost compare --patch 16,32 --gpu a100 --batch 64", WRONG,
          _b32_faster),
    Claim("ViT-B/8: 784 tokens, 4x more compute", "vitcost compare --patch 16,8", WRONG, _b8_compute),
    Claim("gradient storage is 2x the model's parameters during training", "vitcost plan --model vit-b", WRONG,
          _gradient_storage),
    Claim("Adam's optimizer states are 2-3x the parameters", "vitcost plan --model vit-b", HOLDS, _adam_states),
    Claim("activation checkpointing makes training 2-3x slower",
          "vitcost plan --gpu a100 --batch 64 --checkpointing full", WRONG, _checkpointing_slower),
    Claim("memory scales roughly linearly with the parameters",
          "vitcost compare ... (vitcost plan --model vit-s|vit-b|vit-l --batch 32)", WRONG, _memory_linear_in_params),
    Claim("training time scales super-linearly with model size",
          "vitcost plan --model vit-s|vit-b|vit-l --batch 32 --gpu a100", WRONG, _time_superlinear),
    Claim("variants: ViT-B/16 86M, ViT-L/16 307M, ViT-H/14 632M, ViT-Giant/14 1.8B parameters",
          "vitcost plan --model vit_gigantic_patch14_224", HOLDS, _variant_params),
    Claim("variants' memory (FP16): 1.2 / 4.1 / 8.7 / 22 GB", "vitcost plan --precision fp16", OUTSIDE,
          _variant_fp16_memory),
    Claim("relative positions: a 7-distance window gives (2x7+1)^2 = 225 relative positions",
          "vitcost plan --model swin-t", WRONG, _relative_positions),
    Claim("the linear projection has D(P^2 C + 1) parameters and O(P^2 C D) work per patch",
          "vitcost plan --model vit-b", HOLDS, _projection_params),
    Claim("train at 224 (197 positions), run at 384 (577 positions)",
          "vitcost transfer --model vit_base_patch16_224 --to 384", HOLDS, _transfer_positions),
    Claim("hardware tier up to 24 GB (RTX 3090/4090): up to 384x384, patch 16, batch 4-8",
          "vitcost plan --image 384 --gpu rtx4090 --batch 8", WRONG, _tier("rtx4090", 384, 16, 8)),
    Claim("hardware tier 40-80 GB (A100/H100): up to 512x512, patch 14, batch 16-32",
          "vitcost plan --image 512 --patch 14 --gpu a100 --batch 32", WRONG, _tier("a100", 512, 14, 32)),
    Claim("hardware tier above 80 GB (8xA100): up to 1024x1024, any patch, batch 64+",
          "vitcost plan --image 1024 --gpu 8xa100 --batch 64", WRONG, _tier("8xa100", 1024, 16, 64)),
    Claim("decision matrix: ImageNet patch 16 (8 for fine detail), medical 8 or 4, satellite 32, mobile 32 or more",
          "vitcost compare --patch 4,8,16,32", OUTSIDE, _decision_matrix),
]


def run() -> list[tuple[Claim, str, str]]:
    return [(c, *c.check()) for c in CLAIMS]


def write(path: Path, rows: list[tuple[Claim, str, str]]) -> None:
    counts = {v: sum(1 for _, got, _ in rows if got == v) for v in (HOLDS, WRONG, OUTSIDE)}
    lines = [
        "# The tutorials' claims, checked",
        "",
        "Written by `python benchmarks/seed_claims.py` (do not edit by hand). Every numeric claim of the",
        "tutorials vitcost grew from, paraphrased, with the vitcost command that checks it, vitcost's figure",
        "and the verdict: **holds**, **wrong** (the figure says what is right) or **outside** vitcost's scope",
        "(and why). Unless a row says otherwise: training, amp-bf16, SDPA, AdamW, batch 8, CUDA rules.",
        "`tests/test_seed_claims.py` holds every verdict.",
        "",
        f"{len(rows)} claims: {counts[HOLDS]} hold, {counts[WRONG]} are wrong, {counts[OUTSIDE]} are outside "
        "vitcost's scope.",
        "",
        "| # | claim | command | vitcost's figure | verdict |",
        "|---|---|---|---|---|",
    ]
    for i, (claim, verdict, figure) in enumerate(rows, 1):
        cells = [str(i), claim.claim, f"`{claim.command}`" if claim.command != "-" else "-", figure, f"**{verdict}**"]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "seed-claims.md")
    args = parser.parse_args()
    rows = run()
    write(args.out, rows)
    flipped = [c.claim for c, got, _ in rows if got != c.expected]
    print(f"{len(rows)} claims; wrote {args.out}" + (f"; verdicts changed: {flipped}" if flipped else ""),
          file=sys.stderr)
    sys.exit(1 if flipped else 0)


if __name__ == "__main__":
    main()
