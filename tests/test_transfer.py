"""Resolution transfer (``vitcost transfer``): the learned table before and after, its bicubic
interpolation once or every forward, and plan at both sizes; the shapes held against torch's
``F.interpolate`` and Hugging Face's ``interpolate_pos_encoding``, the every-forward step's
memory against MemTracker."""

from __future__ import annotations

import json

import pytest

import vitcost
from vitcost.errors import ConfigError

from test_cli import invoke, ok
from test_fuzz import assert_clean

TINY = dict(dim=64, depth=2, heads=2, mlp_hidden=256, classes=10, device="cpu")


def test_vit_b_224_to_384_worked_example():
    """197 positions (14 x 14 + the class token) become 577 (24 x 24 + 1); bicubic reads 16
    rows per output element: 16 x 768 x 576 = 7,077,888 MACs, twice per training step when
    done every forward."""
    t = vitcost.transfer("vit_base_patch16_224", to=384).to_dict()["targets"][0]
    assert (t["positions_before"], t["positions_after"]) == (197, 577)
    i = t["interpolation"]
    assert (i["from_grid"], i["to_grid"], i["prefix_rows_kept"]) == ([14, 14], [24, 24], 1)
    assert i["macs"] == 7_077_888 and i["per_step_macs_if_every_forward"] == 2 * 7_077_888
    assert i["bytes_fp32"] == 4 * 768 * (196 + 576)
    report = t["report"]
    assert report["tokens"]["total"] == 577 and report["params"]["pos_embed"] == 577 * 768


def test_shapes_are_torchs_and_hugging_faces():
    torch = pytest.importorskip("torch")
    import transformers

    t = vitcost.transfer("vit-ti", image=64, patch=16, to=96, impl="hf", **TINY).to_dict()["targets"][0]
    grid = torch.zeros(1, 64, 4, 4)
    assert list(torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).shape[2:]) \
        == t["interpolation"]["to_grid"]
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=256,
                                 image_size=64, patch_size=16)
    embeddings = transformers.ViTModel(cfg).embeddings
    table = embeddings.interpolate_pos_encoding(torch.zeros(1, 37, 64), 96, 96)
    assert table.shape[1] == t["positions_after"] == 37


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_forward_step_is_exact(precision):
    """Hugging Face's ViT built at 64 px run at 96 with interpolate_pos_encoding=True: the
    step's peak (the table interpolated and its backward) against MemTracker."""
    pytest.importorskip("torch")
    from vitcost.measure import measure_cpu

    target = vitcost.transfer("vit-ti", image=64, patch=16, to=96, batch=2, precision=precision, **TINY).targets[0]
    every = target.per_forward
    assert every.spec.pos_grid == 4 and every.spec.impl.value == "hf"
    assert measure_cpu(every.spec, every.workload).peak_bytes == every.peak_bytes
    # the old table is smaller: 37 - 17 = 20 rows of 64 fewer parameters than resizing once
    assert target.resized_hf.params_total - every.params_total == 20 * 64


def test_multi_scale_reports_the_worst_step():
    result = vitcost.transfer("vit-s", to=[224, 320, 288], gpu="a100", batch=32)
    peaks = [t.report.peak_bytes for t in result.targets]
    assert result.worst.report.peak_bytes == max(peaks) and result.worst.report.spec.image_h == 320
    assert result.to_dict()["multi_scale"]["worst_image"] == "320x320/16"


def test_no_learned_table_has_nothing_to_interpolate():
    t = vitcost.transfer("vit-s", pos_embed="sincos", to=384).targets[0]
    assert t.interpolation is None and "no learned position table" in t.per_forward_reason


def test_cli_table_and_json():
    text = " ".join(ok("transfer", "--model", "vit_base_patch16_224", "--to", "384", "--gpu", "a100").stdout.split())
    assert "197 -> 577" in text and "14x14 -> 24x24" in text and "vitcost compare" in text
    data = json.loads(ok("transfer", "--model", "vit-s", "--to", "256,384", "--json").stdout)
    assert [t["image"] for t in data["targets"]] == ["256x256/16", "384x384/16"]


@pytest.mark.parametrize("args,needle", [
    (["--to", ""], "--to"),
    (["--to", "384", "--to-patch", "0"], "patch"),
    (["--to", "8"], "smaller than patch"),
    (["--to", "384", "--hf-config", "x.json"], "No such option: --hf-config"),
])
def test_bad_transfers_are_one_line_errors(args, needle):
    args = ["transfer", "--model", "vit-s", *args]
    result = invoke(*args)
    assert result.exit_code in (1, 2)
    assert_clean(result, " ".join(args))
    assert needle in result.stderr


def test_transfer_needs_a_size():
    with pytest.raises(ConfigError, match="--to"):
        vitcost.transfer("vit-s")


@pytest.mark.parametrize("options", [
    dict(precision="fp32"), dict(precision="amp-bf16"), dict(precision="bf16"), dict(mode="infer"),
    dict(precision="amp-bf16", batch=1), dict(registers=2, pos_embed_prefix=False),
    dict(dist_token=True, attention="eager"),
])
def test_timm_dynamic_img_size_is_exact(options):
    """timm's dynamic_img_size (the reference model's ``resample_abs_pos_embed``, every
    forward): a ViT built for a 4 x 4 grid run at 6 x 6, every calibrate figure exact."""
    pytest.importorskip("torch")
    from vitcost.calibrate import calibrate

    (cal,) = calibrate("vit-ti", image=48, patch=8, pos_grid=4, **{**TINY, "batch": 2, **options}).results
    assert all(f.within(0) for f in cal.figures), [(f.name, f.predicted, f.measured) for f in cal.figures]


@pytest.mark.parametrize("precision", ["fp32", "amp-bf16"])
def test_timm_dynamic_img_size_allocates_as_torch_does(precision):
    """Every allocation of the step, from the input batch to the optimizer step, against torch's:
    the table's fp32 resampling before the class token is put in, its backward after the patch
    gradient's cast (that node was made later), the slices into zero tables."""
    pytest.importorskip("torch")
    from tests.tracing import allocation_rises, replayed_step, traced_step

    report = vitcost.plan("vit-ti", image=48, patch=8, pos_grid=4, precision=precision, **{**TINY, "batch": 2})
    traced = allocation_rises(traced_step(report.spec, report.workload), "randn", "sqrt")
    replayed = allocation_rises(replayed_step(report.spec, report.workload), "x", "opt.temporaries")
    assert replayed == traced


def test_transfer_prices_timms_every_forward_too():
    """On timm's code the old table resampled every step (dynamic_img_size) against the model
    built at the new size: fewer parameters (the old table), the resampling's buffers."""
    t = vitcost.transfer("vit_base_patch16_224", to=384)
    target = t.targets[0]
    timm = target.per_forward_timm
    assert timm.spec.pos_grid == 14 and timm.spec.impl.value == "timm"
    assert target.report.params_total - timm.params_total == (577 - 197) * 768
    every = t.to_dict()["targets"][0]["every_forward_timm"]
    assert every["extra_peak_bytes"] == timm.peak_bytes - target.report.peak_bytes
    assert "timm: +14.16 M MACs/step" in " ".join(ok("transfer", "--model", "vit_base_patch16_224", "--to", "384")
                                                   .stdout.split())
