"""Position encodings (``--pos-embed``): what each adds in parameters, tables, MACs and memory,
held against the reference model's torch implementations."""

from __future__ import annotations

import pytest

import vitcost
from vitcost.errors import ConfigError

TINY = dict(image=32, patch=8, dim=64, depth=2, heads=2, mlp_hidden=256, classes=10, device="cpu")


def test_what_each_adds_worked_example():
    """ViT-B/16 at 224, batch 8, amp-bf16: a learned table of 197 x 768 parameters; sin-cos
    tables of the 196 patches' rows (fp32 buffers), no parameters; RoPE-2D two (197, 64)
    tables, and each block saves its rotated q and k: 2 x 8 x 197 x 768 bf16 elements."""
    pos = {kind: vitcost.plan("vit-b", pos_embed=kind).position_encoding
           for kind in ("learned", "sincos", "sincos-1d", "rope-2d", "none")}
    assert pos["learned"]["params"] == 197 * 768 and pos["learned"]["buffer_bytes"] == 0
    assert pos["sincos"]["buffer_bytes"] == pos["sincos-1d"]["buffer_bytes"] == 196 * 768 * 4
    assert pos["rope-2d"] == {"kind": "rope-2d", "params": 0, "buffer_bytes": 2 * 197 * 64 * 4,
                              "saved_per_block_bytes": 2 * 8 * 197 * 768 * 2}
    assert pos["none"]["params"] == pos["none"]["buffer_bytes"] == 0
    learned, rope = vitcost.plan("vit-b"), vitcost.plan("vit-b", pos_embed="rope-2d")
    assert learned.params_total - rope.params_total == 197 * 768
    assert rope.memory.activations - vitcost.plan("vit-b", pos_embed="none").memory.activations \
        == 12 * 2 * 8 * 197 * 768 * 2  # the rotated q and k of every block, and nothing else
    assert rope.macs_forward == learned.macs_forward  # rotations are elementwise: no MACs


def test_sincos_2d_is_sincos():
    assert vitcost.plan("vit-s", pos_embed="sincos-2d").spec == vitcost.plan("vit-s", pos_embed="sincos").spec


@pytest.mark.parametrize("pos_embed,options", [
    ("sincos-1d", dict(precision="fp32")),
    ("sincos-1d", dict(precision="amp-bf16")),
    ("sincos-2d", dict(precision="bf16", mode="infer")),
    ("rope-2d", dict(precision="fp32")),
    ("rope-2d", dict(precision="amp-bf16")),
    ("rope-2d", dict(precision="bf16")),
    ("rope-2d", dict(precision="amp-bf16", mode="infer")),
    ("rope-2d", dict(precision="amp-bf16", checkpointing="full")),
    ("rope-2d", dict(precision="fp32", batch=1, depth=3)),
    ("relative-bias", dict(precision="fp32", attention="eager")),
    ("relative-bias", dict(precision="amp-bf16", attention="eager")),
    ("relative-bias", dict(precision="bf16", attention="eager-postscale")),
    ("relative-bias", dict(precision="amp-bf16", attention="eager", mode="infer")),
    ("relative-bias", dict(precision="amp-bf16", attention="eager", checkpointing="full", keep_grads=True)),
    ("relative-bias", dict(precision="fp32", attention="eager", class_token=False, pooling="avg", batch=1)),
    # the peak inside the attention's backward (forward, in inference): 257 tokens, 8 heads
    ("relative-bias", dict(precision="amp-bf16", attention="eager", image=64, patch=4, depth=1, heads=8,
                           mlp_hidden=64)),
    ("relative-bias", dict(precision="fp32", attention="eager", image=64, patch=4, depth=1, heads=8, mlp_hidden=64,
                           mode="infer")),
])
def test_every_figure_equals_torchs(pos_embed, options):
    """``calibrate``'s figures: MemTracker's peak, its categories, what is saved after
    forward, FlopCounterMode's MACs and the parameter count, all exact."""
    pytest.importorskip("torch")
    from vitcost.calibrate import calibrate

    (cal,) = calibrate("vit-ti", pos_embed=pos_embed, **{**TINY, "batch": 2, **options}).results
    assert all(f.within(0) for f in cal.figures), [(f.name, f.predicted, f.measured) for f in cal.figures]


@pytest.mark.parametrize("precision", ["fp32", "amp-bf16", "bf16"])
def test_rope_backward_allocates_as_torch_does(precision):
    """The total over RoPE's backward in one block, allocation by allocation, against torch's:
    from SDPA's backward to the stack of q's, k's and v's gradients (the peak of these tiny
    models lies elsewhere, so the peak alone would not see it)."""
    pytest.importorskip("torch")
    from tests.tracing import Log, storages_mode

    from vitcost import measure, memory

    report = vitcost.plan("vit-ti", pos_embed="rope-2d", precision=precision, **{**TINY, "depth": 1, "batch": 2})
    model = measure.build_model(report.spec).to(measure.param_dtype(report.workload))
    runner = measure.Runner(model, report.spec, report.workload, "cpu")
    runner.step()
    tracer = storages_mode()
    with tracer:
        runner.step()
    ev = tracer.events
    start = next(i for i, (op, _) in enumerate(ev) if op.startswith("_scaled_dot_product_flash_attention_for_cpu_b"))
    stop = next(i for i, (op, _) in enumerate(ev) if op.startswith("stack"))
    torch_rise = [total - ev[start - 1][1] for _, total in ev[start:stop + 1]]

    replay = Log()
    memory.replay_step(replay, report.spec, report.workload, memory.shapes_of(report.spec, report.workload))
    first = next(i for i, (name, _) in enumerate(replay.log) if name == "b0.g.q")
    last = next(i for i, (name, _) in enumerate(replay.log) if name == "b0.g.stack")
    replay_rise = [total - replay.log[first - 1][1] for _, total in replay.log[first:last + 1]]
    # SDPA's backward frees its saved tensors in another order (frees in a row: the same highs)
    assert max(torch_rise) == max(replay_rise)
    assert torch_rise[6:] == replay_rise[6:]


def test_relative_bias_worked_example():
    """BEiT-B/16 at 224: each block's table has (2 x 14 - 1)^2 + 3 = 732 rows of 12 heads,
    105,408 parameters over 12 blocks; the (197, 197) int64 index is one buffer; the table
    the torch model builds has as many rows, and its index reaches every one."""
    report = vitcost.plan("vit-b", pos_embed="relative-bias", attention="eager")
    assert report.params["blocks/attn/relative_bias"] == 12 * 732 * 12 == report.position_encoding["params"]
    assert report.position_encoding["buffer_bytes"] == 197 * 197 * 8
    assert report.params_total == vitcost.plan("vit-b", pos_embed="none").params_total + 12 * 732 * 12
    torch = pytest.importorskip("torch")
    from vitcost import measure

    small = vitcost.plan("vit-ti", pos_embed="relative-bias", attention="eager", **TINY)
    model = measure.build_model(small.spec, attention="eager")
    table = model.blocks[0].attn.relative_position_bias_table
    assert table.shape == (7 * 7 + 3, 2) and len(torch.unique(model.relative_index.index)) == 7 * 7 + 3
    assert sum(p.numel() for p in model.parameters()) == small.params_total


@pytest.mark.parametrize("options,needle", [
    (dict(pos_embed="relative-bias"), "--attention eager or eager-postscale"),
    (dict(pos_embed="relative-bias", attention="eager", registers=4), "at most a class token"),
    (dict(pos_embed="rope-2d", dim=66, heads=3), "must be divisible by 4"),
    (dict(pos_embed="rope-2d", impl="hf"), "modelled on the reference"),
    (dict(pos_embed="sincos-1d", dim=63, heads=1), "even --dim"),
])
def test_impossible_encodings_are_one_line_errors(options, needle):
    with pytest.raises(ConfigError, match=needle):
        vitcost.plan("vit-ti", **options)
