"""Swin (Hugging Face's ``SwinForImageClassification``): parameters, MACs and memory, each
held against the torch model; the stages' table; the names, the config files and the errors."""

from __future__ import annotations

import json

import pytest

import vitcost
from vitcost.errors import ConfigError

# two stages of a shifted and a plain block each, at a 16 x 16 then 8 x 8 grid of 4 x 4 windows
TINY = dict(image=64, dim=16, swin=dict(depths=(2, 2), heads=(2, 4), window=4), classes=10, device="cpu", batch=2)


@pytest.mark.parametrize("name", ["swin-t", "swin-s", "swin-b", "swin_base_patch4_window12_384"])
def test_params_and_macs_equal_hugging_faces(name):
    """Every parameter tensor in order, the total, and FlopCounterMode's forward and training
    MACs of Hugging Face's model, built on the meta device."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from vitcost import formulas, measure

    report = vitcost.plan(name)
    with torch.device("meta"):
        model = measure.build_model(report.spec, attention="eager")
    assert [n for _, n in formulas.param_tensors(report.spec)] == [p.numel() for p in model.parameters()]
    counts = measure.count_macs(model, report.spec, training=True)
    assert counts.params == report.params_total
    assert counts.forward_macs == report.macs_forward_per_image
    assert counts.training_macs == report.macs_training_per_image


def test_published_sizes():
    """Swin-T/S/B at 224 with 1000 classes: 28,288,354 / 49,606,258 / 87,768,224 parameters
    (the paper's 28M, 50M, 88M) and 4.49 / 8.74 / 15.43 GMACs (its 4.5G, 8.7G, 15.4G FLOPs,
    which are MACs)."""
    sizes = {name: (vitcost.plan(name).params_total, vitcost.plan(name).macs_forward_per_image)
             for name in ("swin-t", "swin-s", "swin-b")}
    assert sizes == {"swin-t": (28_288_354, 4_490_566_656), "swin-s": (49_606_258, 8_740_875_264),
                     "swin-b": (87_768_224, 15_430_946_816)}


@pytest.mark.parametrize("options", [
    dict(precision="fp32", attention="eager"),
    dict(precision="fp32", attention="sdpa", keep_grads=True, optimizer="sgd-momentum"),
    dict(precision="amp-bf16", attention="eager", image="64x128"),
    dict(precision="amp-bf16", attention="sdpa"),
    dict(precision="bf16", attention="sdpa"),
    dict(precision="bf16", attention="eager", batch=1, mode="infer"),
    dict(precision="bf16", attention="sdpa", mode="infer"),
    dict(precision="fp32", attention="eager", swin=dict(depths=(2, 2, 2), heads=(1, 2, 4), window=4)),
    dict(precision="amp-bf16", attention="eager", image=112, swin=dict(depths=(2, 2, 2), heads=(1, 2, 4), window=7)),
    dict(precision="amp-bf16", attention="sdpa", mode="infer", image=112,
         swin=dict(depths=(2, 2, 2), heads=(1, 2, 4), window=7)),
])
def test_every_figure_equals_torchs(options):
    """``calibrate``'s figures against Hugging Face's model under MemTracker: the peak, its
    categories, what is saved after forward, the MACs and parameters, all exact. The third
    stage of the 3-stage models runs a grid no larger than the window (one window, no shift);
    SDPA trains through its math fallback on the CPU (the bias needs a gradient), in fp32."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from vitcost.calibrate import calibrate

    (cal,) = calibrate("swin-t", **{**TINY, **options}).results
    assert all(f.within(0) for f in cal.figures), [(f.name, f.predicted, f.measured) for f in cal.figures]


@pytest.mark.parametrize("options", [
    dict(precision="fp32", attention="eager"),
    dict(precision="amp-bf16", attention="eager"),
    dict(precision="bf16", attention="sdpa"),
    dict(precision="amp-bf16", attention="sdpa", batch=1),
    dict(precision="fp32", attention="eager", mode="infer"),
])
def test_every_allocation_follows_torchs(options):
    """The live total after every allocation of a step, from the input batch to the optimizer
    step, against torch's (each storage an operator makes): the window copies, the roll, the
    mask built every forward, the bias's sums, patch merging's slices, all in torch's order."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.tracing import allocation_rises, replayed_step, traced_step

    report = vitcost.plan("swin-t", **{**TINY, **options})
    traced = allocation_rises(traced_step(report.spec, report.workload), "randn", "sqrt")
    replayed = allocation_rises(replayed_step(report.spec, report.workload), "x", "opt.temporaries")
    assert replayed == traced


def test_stages_worked_example():
    """Swin-T at 224: the grid halves from 56 (4-pixel patches) and the width doubles from 96;
    7 x 7 windows, shifted by 3 but in the last stage, whose 7 x 7 grid is one window; each
    block's maps are heads x windows x 49^2 elements (stage 1: 3 x 64 x 2,401)."""
    report = vitcost.plan("swin-t", batch=32, precision="fp32", attention="eager")
    got = [(s["dim"], s["heads"], s["grid_h"], s["tokens"], s["windows"], s["shift"], s["attention_elements_per_block"])
           for s in report.stages]
    assert got == [(96, 3, 56, 3136, 64, 3, 460_992), (192, 6, 28, 784, 16, 3, 230_496),
                   (384, 12, 14, 196, 4, 3, 115_248), (768, 24, 7, 49, 1, 0, 57_624)]
    data = report.to_dict()
    # eager attention in fp32 keeps each block's probabilities for backward; SDPA none
    assert data["stages"][0]["attention_bytes_per_block"] == 32 * 460_992 * 4
    assert vitcost.plan("swin-t", batch=32, precision="fp32").to_dict()["attention_maps"]["bytes_all_layers"] == 0
    assert data["attention_maps"]["bytes_all_layers"] == 32 * 4 * (2 * 460_992 + 2 * 230_496 + 6 * 115_248
                                                                    + 2 * 57_624)
    # every block's table: (2 x 7 - 1)^2 = 169 rows per head
    assert data["position_encoding"]["params"] == sum(k * 169 * h for k, h in ((2, 3), (2, 6), (6, 12), (2, 24)))
    assert data["position_encoding"]["buffer_bytes"] == 12 * 49 * 49 * 8  # each block's int64 (49, 49) index
    assert data["inputs"]["swin"] == {"depths": [2, 2, 6, 2], "heads": [3, 6, 12, 24], "window": 7, "mlp_ratio": 4.0}
    # linear in the image's area, where a ViT's attention is quadratic in it
    big = vitcost.plan("swin-t", batch=32, precision="fp32", image=448)
    assert big.macs_forward["blocks/attn/q_kT"] == 4 * report.macs_forward["blocks/attn/q_kT"]


def test_names():
    """timm's names, Hugging Face's hub names and the presets resolve to the same model; a
    window-12 model at 384 gets its window."""
    t = vitcost.plan("swin-t").spec
    assert vitcost.plan("swin_tiny_patch4_window7_224.ms_in1k").spec.swin == t.swin
    assert vitcost.plan("microsoft/swin-tiny-patch4-window7-224").spec.swin == t.swin
    b384 = vitcost.plan("swin_base_patch4_window12_384").spec
    assert (b384.swin.window, b384.image_h, b384.dim) == (12, 384, 128)
    assert vitcost.plan("swin-b", image=384, window=12).params_total == vitcost.plan(
        "swin_base_patch4_window12_384").params_total


def test_hf_config(tmp_path):
    """``--hf-config`` reads a SwinConfig's file: the parameters are Hugging Face's own count."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SwinConfig(embed_dim=64, depths=[2, 2, 4, 2], num_heads=[2, 4, 8, 16], window_size=7,
                                  num_labels=37, drop_path_rate=0.0)
    cfg.architectures = ["SwinForImageClassification"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    report = vitcost.plan(hf_config=str(path))
    with torch.device("meta"):
        model = transformers.SwinForImageClassification(cfg)
    assert report.params_total == sum(p.numel() for p in model.parameters())
    assert report.spec.swin.depths == (2, 2, 4, 2) and report.spec.classes == 37


@pytest.mark.parametrize("kwargs,message", [
    (dict(image=16), "window 7 is larger than the 4x4 patch grid"),
    (dict(window=8), "stage 2's 28x28 grid is not a whole number of 8x8 windows"),
    (dict(image=128, window=8), "stage 4's 4x4 grid is smaller than the window 8"),
    (dict(image=200, window=5), "stage 2's 25x25 grid is odd"),
    (dict(image=226), "not a whole number of 4-pixel patches"),
    (dict(pos_embed="learned"), "Swin is modelled as Hugging Face's SwinForImageClassification"),
    (dict(checkpointing="full"), "--checkpointing full with Swin is not modelled"),
    (dict(strategy="fsdp", gpus=2), "not for MAE pretraining, video models, distillation or Swin"),
    (dict(depth=5), "--depth is the stages' blocks together"),
])
def test_impossible_combinations_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError) as err:
        vitcost.plan("swin-t", **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_window_on_a_vit_is_an_error():
    with pytest.raises(ConfigError, match="only a Swin model"):
        vitcost.plan("vit-b", window=7)


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from vitcost.cli import app

    out = CliRunner().invoke(app, ["plan", "--model", "swin_base_patch4_window12_384", "--batch", "16", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert [s["window"] for s in data["stages"]] == [12, 12, 12, 12] and data["stages"][-1]["shift"] == 0
    out = CliRunner().invoke(app, ["plan", "--model", "swin-t", "--window", "9"])
    assert out.exit_code != 0 and "windows" in out.output and "Traceback" not in out.output
    out = CliRunner().invoke(app, ["plan", "--model", "swin-t"])
    assert out.exit_code == 0 and "Stages" in out.output and "stage" in out.output
