"""``--impl hf`` and ``--hf-config`` against Hugging Face's own models (transformers, built
from configs with random weights): parameters and MACs equal ``sum(p.numel())`` and
FlopCounterMode's count, and a step's peak equals MemTracker's, to the byte.

The grid here is small; ``benchmarks/accuracy_hf.py`` runs the larger one (docs/accuracy-hf.md).
"""

from __future__ import annotations

import json
import os

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import vitcost  # noqa: E402
from vitcost.errors import ConfigError  # noqa: E402
from vitcost.formulas import mac_counts, param_counts  # noqa: E402
from vitcost.hf_models import hf_config  # noqa: E402
from vitcost.measure import count_forward_macs, count_params, measure_cpu  # noqa: E402
from vitcost.memory import replay_memory  # noqa: E402
from vitcost.program import estimate_memory  # noqa: E402

from conftest import cpu_workload, tiny  # noqa: E402

FAMILIES = {
    "vit": dict(impl="hf"),
    "deit-distilled": dict(impl="hf", dist_token=True),
    "dinov2": dict(impl="hf", layer_scale=True, pooling="token+avg", mask_token=True),
    "dinov2-registers": dict(impl="hf", layer_scale=True, pooling="token+avg", mask_token=True, registers=4),
    "dinov2-swiglu": dict(impl="hf", layer_scale=True, pooling="token+avg", mask_token=True, mlp="swiglu",
                          mlp_hidden=176),  # (int(64 * 4 * 2 / 3) + 7) // 8 * 8
    "videomae": dict(impl="hf", frames=4, tubelet=2, class_token=False, pos_embed="sincos", pooling="avg",
                     image_h=32, image_w=32),
    "mae": dict(impl="hf", classes=0, image_h=56, image_w=56,
                mae=dict(mask_ratio=0.6, decoder_dim=32, decoder_depth=2, decoder_heads=2, decoder_mlp_hidden=128)),
    "mae-norm-pix": dict(impl="hf", classes=0, image_h=56, image_w=56,
                         mae=dict(mask_ratio=0.75, decoder_dim=32, decoder_depth=1, decoder_heads=2,
                                  decoder_mlp_hidden=128, norm_pix_loss=True)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_params_and_macs_equal_the_hf_model(family):
    spec = tiny(patch=8, **FAMILIES[family])
    assert sum(param_counts(spec).values()) == count_params(spec)
    assert sum(mac_counts(spec).values()) == count_forward_macs(spec)


# (family, spec changes, workload changes): every precision, both kernels, train and infer,
# batch 1, one head, checkpointing, depth 1 and 3, a non-square image
GRID = [
    ("vit", {}, dict(attention="eager", batch=3)),
    ("vit", dict(depth=3), dict(precision="amp-bf16", batch=3)),
    ("vit", dict(image_h=48, image_w=80), dict(precision="bf16", attention="eager", checkpointing="full")),
    ("vit", {}, dict(mode="infer", precision="amp-bf16", attention="eager", batch=4)),
    ("vit", dict(heads=1, depth=1), dict(batch=1, attention="eager", precision="bf16")),
    ("deit-distilled", {}, dict(precision="amp-bf16", attention="eager")),
    ("deit-distilled", dict(depth=3), dict(mode="infer", batch=1)),
    ("dinov2", {}, dict(precision="bf16", attention="eager", batch=3)),
    ("dinov2", dict(depth=3), dict(precision="amp-bf16", checkpointing="full")),
    ("dinov2", {}, dict(mode="infer", precision="amp-bf16", attention="eager")),
    ("dinov2-registers", {}, dict(batch=1, attention="eager")),
    ("dinov2-registers", dict(depth=3), dict(precision="amp-bf16", batch=3, attention="eager")),
    ("dinov2-registers", {}, dict(mode="infer", precision="bf16", batch=4)),
    # built for 56 px (a 7 x 7 grid), run at 64: the table interpolated every forward
    ("dinov2", dict(pos_grid=7), dict(precision="bf16", batch=3)),
    ("dinov2-registers", dict(pos_grid=7, depth=3), dict(precision="amp-bf16", attention="eager")),
    ("dinov2-swiglu", dict(depth=3), dict(precision="amp-bf16", attention="eager", batch=3, checkpointing="full")),
    ("dinov2-swiglu", {}, dict(precision="bf16", batch=1)),
    ("dinov2-swiglu", {}, dict(mode="infer", precision="amp-bf16", attention="eager")),
    ("videomae", {}, dict(precision="amp-bf16", attention="eager", batch=3)),
    ("videomae", dict(depth=3, qkv_bias=False), dict(precision="bf16", checkpointing="full")),
    ("videomae", dict(heads=1), dict(batch=1, attention="eager")),
    ("videomae", {}, dict(mode="infer", precision="amp-bf16", batch=4)),
    ("mae", {}, dict(precision="amp-bf16", attention="eager", batch=3)),
    ("mae", dict(depth=3), dict(batch=1, checkpointing="full")),
    ("mae", {}, dict(precision="bf16", batch=1, attention="eager")),
    ("mae", {}, dict(mode="infer", precision="amp-bf16", batch=4)),
    ("mae-norm-pix", {}, dict(precision="bf16", batch=3)),
    ("mae-norm-pix", {}, dict(precision="amp-bf16", attention="eager", batch=1)),
]


@pytest.mark.parametrize("family,spec_kw,wl_kw", GRID, ids=lambda v: v if isinstance(v, str) else None)
def test_the_replay_equals_memtracker_on_the_hf_model(family, spec_kw, wl_kw):
    spec = tiny(patch=8, **{**FAMILIES[family], **spec_kw})
    wl = cpu_workload(**wl_kw)
    measured = measure_cpu(spec, wl)  # builds the Hugging Face class the spec describes
    predicted = replay_memory(spec, wl)[0]
    assert predicted.peak == measured.peak_bytes
    assert predicted.at_peak == {"weights": measured.weights_bytes, "gradients": measured.gradients_bytes,
                                 "optimizer": measured.optimizer_bytes, "activations": measured.activations_bytes,
                                 "temporaries": measured.temporaries_bytes}
    assert estimate_memory(spec, wl) == predicted


def test_checkpointing_with_layer_scale_reruns_fc2():
    """Training MACs of a checkpointed DINOv2 step, as FlopCounterMode counts them: LayerScale
    saves fc2's output, so the recompute runs fc2 as well."""
    from vitcost.measure import build_meta, count_macs

    spec = tiny(patch=8, **FAMILIES["dinov2"])
    wl = cpu_workload(checkpointing="full")
    report = vitcost.api._plan_spec(spec, (), batch=2, gpu=None, device="cpu", mode="train", precision="fp32",
                                    attention="sdpa", optimizer="adamw", keep_grads=False, checkpointing="full")
    counted = count_macs(build_meta(spec, wl), spec, training=True)
    assert report.macs_training_per_image == counted.training_macs


def test_hf_and_timm_differ_by_what_their_code_allocates():
    """Under autocast each of Hugging Face's q, k, v projections casts (and saves) its own
    copy of the normed input, where timm's fused qkv casts one: 2 more (B, N, D) bf16
    tensors saved per block."""
    timm = vitcost.plan("vit-b", batch=8, precision="amp-bf16")
    hf = vitcost.plan("vit-b", batch=8, precision="amp-bf16", impl="hf")
    b, n, d, depth = 8, 197, 768, 12
    assert hf.memory.activations - timm.memory.activations == depth * 2 * b * n * d * 2
    assert hf.params_total == timm.params_total


# --- --hf-config --------------------------------------------------------------------------

CONFIGS = [
    ("ViTConfig", "ViTForImageClassification", dict(num_labels=10)),
    ("DeiTConfig", "DeiTForImageClassificationWithTeacher", {}),
    ("Dinov2Config", "Dinov2ForImageClassification", dict(num_labels=7)),
    ("Dinov2Config", "Dinov2Model", dict(image_size=518, use_mask_token=False)),
    ("Dinov2Config", "Dinov2ForImageClassification", dict(use_swiglu_ffn=True, hidden_size=96, num_attention_heads=4)),
    ("Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification", {}),
    ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", {}),
    ("ViTMAEConfig", "ViTMAEForPreTraining", {}),
    ("VideoMAEConfig", "VideoMAEForVideoClassification", dict(num_labels=5)),
]


def _save(tmp_path, config_cls: str, arch: str, **kw) -> str:
    cfg = getattr(transformers, config_cls)(architectures=[arch], **kw)
    cfg.save_pretrained(tmp_path)
    return str(tmp_path / "config.json")


@pytest.mark.parametrize("config_cls,arch,kw", CONFIGS, ids=[c[1] for c in CONFIGS])
def test_hf_config_counts_the_parameters_of_the_model_it_describes(tmp_path, config_cls, arch, kw):
    path = _save(tmp_path, config_cls, arch, **kw)
    cfg = getattr(transformers, config_cls).from_pretrained(tmp_path)
    with torch.device("meta"):
        expected = sum(p.numel() for p in getattr(transformers, arch)(cfg).parameters())
    report = vitcost.plan(hf_config=path, mode="infer", device="cpu")
    assert report.params_total == expected
    assert report.spec.impl.value == "hf" and report.spec.name == arch
    # and the spec builds that very class back
    assert hf_config(report.spec)[1].__name__ == arch


def test_the_issue_command_works_for_every_family(tmp_path):
    from typer.testing import CliRunner

    from vitcost.cli import app

    for k, (config_cls, arch, kw) in enumerate(CONFIGS):
        folder = tmp_path / str(k)
        path = _save(folder, config_cls, arch, **kw)
        result = CliRunner().invoke(app, ["plan", "--hf-config", path, "--image", "224", "--batch", "8",
                                          "--device", "cpu", "--json"])
        assert result.exit_code == 0, (arch, result.output)
        data = json.loads(result.stdout)
        assert data["inputs"]["impl"] == "hf" and data["inputs"]["batch"] == 8
        assert data["memory_bytes"]["peak"] > data["memory_bytes"]["weights"] > 0


def test_explicit_options_override_the_config(tmp_path):
    path = _save(tmp_path, "ViTConfig", "ViTForImageClassification", num_labels=10)
    report = vitcost.plan(hf_config=path, depth=2, classes=5)
    assert (report.spec.depth, report.spec.classes, report.spec.dim) == (2, 5, 768)
    timm = vitcost.plan(hf_config=path, impl="timm")
    assert timm.spec.impl.value == "timm"


def test_dinov2_at_another_image_counts_the_table_it_was_built_with(tmp_path):
    """facebook/dinov2-* are built for 518 px and fine-tuned at 224: the table keeps its 37 x 37
    grid (and its parameters), interpolated to 16 x 16 every forward."""
    path = _save(tmp_path, "Dinov2Config", "Dinov2ForImageClassification", image_size=518, num_labels=10)
    cfg = transformers.Dinov2Config.from_pretrained(tmp_path)
    with torch.device("meta"):
        expected = sum(p.numel() for p in transformers.Dinov2ForImageClassification(cfg).parameters())
    report = vitcost.plan(hf_config=path, image=224, device="cpu")
    assert report.params_total == expected and report.spec.pos_grid == 37
    assert report.spec.tokens == 16 * 16 + 1 and not report.warnings


def test_a_backbone_trains_with_a_stated_head(tmp_path):
    path = _save(tmp_path, "Dinov2Config", "Dinov2Model")
    report = vitcost.plan(hf_config=path)
    assert report.spec.classes == 1000
    assert any("feature backbone" in w and "mean" in w for w in report.warnings)


@pytest.mark.parametrize("text,message", [
    ('{"architectures": ["ViTForImageClassification"], "hidden_size": 768}', "missing key 'num_attention_heads'"),
    ('{"architectures": ["ViTMAEForPreTraining"]}', "missing key 'hidden_size'"),
    ('{"architectures": ["VideoMAEForPreTraining"]}', "VideoMAE pretraining is not modelled yet"),
    ('{"architectures": ["BertModel"]}', "is not one vitcost models"),
    ('{"hidden_size": 768}', "missing key 'architectures'"),
    ('[1, 2]', "expected a JSON object"),
    ('{"architectures": ["ViTModel"]}', "pooler"),
    ("{", "--hf-config"),
])
def test_bad_configs_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        vitcost.plan(hf_config=str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_mistyped_and_out_of_range_keys_name_the_key(tmp_path):
    base = json.loads(open(_save(tmp_path, "ViTConfig", "ViTForImageClassification")).read())
    for key, value, message in [("hidden_size", "768", "hidden_size: expected an integer"),
                                ("num_hidden_layers", 0, "num_hidden_layers 0: expected 1 to"),
                                ("qkv_bias", 1, "qkv_bias: expected true or false"),
                                ("image_size", [224], "image_size: expected a size"),
                                ("hidden_act", "relu", "hidden_act 'relu'")]:
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({**base, key: value}))
        with pytest.raises(ConfigError, match=message):
            vitcost.plan(hf_config=str(path))


def test_the_cli_reads_a_config_and_refuses_a_directory(tmp_path):
    from typer.testing import CliRunner

    from vitcost.cli import app

    path = _save(tmp_path, "ViTConfig", "ViTForImageClassification")
    ok = CliRunner().invoke(app, ["plan", "--hf-config", path, "--device", "cpu"])
    assert ok.exit_code == 0 and "ViTForImageClassification" in ok.stdout
    bad = CliRunner().invoke(app, ["plan", "--hf-config", os.path.dirname(path)])
    assert bad.exit_code != 0 and bad.stderr.startswith("Error: --hf-config")
