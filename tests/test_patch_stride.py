"""An overlapping patch embedding (``--patch-stride S`` below the patch P, padding (P - S) / 2):
tokens, parameters, MACs and memory, held against the reference model in torch."""

from __future__ import annotations

import pytest

import vitcost
from vitcost.errors import ConfigError

TINY = dict(dim=64, depth=2, heads=2, mlp_hidden=256, classes=10, device="cpu")


def test_tokens_worked_examples():
    """floor((H - P + 2 pad) / S) + 1 per side: 224 at 16/8 (pad 4) is 27 + 1 = 28; 30x36 at
    8/4 (pad 2) is floor(26 / 4) + 1 = 7 by 8 + 1 = 9; without a stride, H // P."""
    assert vitcost.plan("vit-s", patch=16, patch_stride=8).tokens["grid_h"] == 28
    report = vitcost.plan("vit-ti", image=(30, 36), patch=8, patch_stride=4, **TINY)
    assert (report.tokens["grid_h"], report.tokens["grid_w"], report.tokens["total"]) == (7, 9, 64)
    assert vitcost.plan("vit-s", patch=16).tokens["grid_h"] == 14


@pytest.mark.parametrize("image,patch,stride", [(32, 8, 6), ((30, 36), 8, 4), (48, 16, 10), (33, 7, 5)])
def test_the_conv_makes_as_many_tokens(image, patch, stride):
    torch = pytest.importorskip("torch")
    from vitcost import measure

    report = vitcost.plan("vit-ti", image=image, patch=patch, patch_stride=stride, **TINY)
    model = measure.build_model(report.spec)
    h, w = (image, image) if isinstance(image, int) else image
    tokens = model.patch_embed(torch.zeros(1, 3, h, w)).shape[1]
    assert tokens == report.tokens["patches"]
    assert sum(p.numel() for p in model.parameters()) == report.params_total  # the conv's weights unchanged


@pytest.mark.parametrize("options", [
    dict(precision="fp32"),
    dict(precision="amp-bf16", attention="eager"),
    dict(precision="bf16", mode="infer"),
    dict(precision="amp-bf16", checkpointing="full", image=48, patch=16, patch_stride=10),
])
def test_memory_and_macs_equal_torchs(options):
    """Every figure ``calibrate`` holds (MemTracker's peak and categories, FlopCounterMode's MACs)."""
    pytest.importorskip("torch")
    from vitcost.calibrate import calibrate

    kw = {**dict(image=32, patch=8, patch_stride=6), **options}
    (cal,) = calibrate("vit-ti", batch=2, **{**TINY, **kw}).results
    assert cal.status == "ok", [f for f in cal.figures if not f.within(0)]
    assert all(f.within(0) for f in cal.figures)


@pytest.mark.parametrize("stride,needle", [(16, "strides less than the patch"), (11, "is not whole"),
                                           (20, "strides less than the patch")])
def test_impossible_strides_are_one_line_errors(stride, needle):
    with pytest.raises(ConfigError, match=needle):
        vitcost.plan("vit-s", patch=16, patch_stride=stride)


def test_more_tokens_cost_more():
    """Halving the stride roughly quadruples the tokens: attention MACs grow with their square."""
    plain = vitcost.plan("vit-s", patch=16, batch=8)
    overlap = vitcost.plan("vit-s", patch=16, patch_stride=8, batch=8)
    assert overlap.tokens["patches"] == 28 * 28 and plain.tokens["patches"] == 14 * 14
    assert overlap.macs_forward["blocks/attn/q_kT"] * 197**2 == plain.macs_forward["blocks/attn/q_kT"] * 785**2
    assert overlap.peak_bytes > plain.peak_bytes
