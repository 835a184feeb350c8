"""Model names: presets against the ViT variants table, timm names against timm's definitions."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from vitcost.errors import ConfigError, UnknownNameError
from vitcost.presets import ModelDefaults, build_spec, preset_names, resolve_model
from vitcost.presets import _TIMM_EXAMPLES

# name: (dim, depth, heads, mlp_hidden), from vit-variants.md (ViT paper Table 1; AugReg /
# big_vision for Ti, S, M; Zhai et al. "Scaling Vision Transformers" Table 2 for g, G).
TABLE = {
    "vit-ti": (192, 12, 3, 768),
    "vit-s": (384, 12, 6, 1536),
    "vit-m": (512, 12, 8, 2048),
    "vit-b": (768, 12, 12, 3072),
    "vit-l": (1024, 24, 16, 4096),
    "vit-h": (1280, 32, 16, 5120),
    "vit-g": (1408, 40, 16, 6144),
    "vit-G": (1664, 48, 16, 8192),
}
# head dim from the same table: 64, 64, 64, 64, 64, 80, 88, 104
HEAD_DIM = {"vit-ti": 64, "vit-s": 64, "vit-m": 64, "vit-b": 64, "vit-l": 64, "vit-h": 80, "vit-g": 88, "vit-G": 104}


def fields_of(m: ModelDefaults) -> tuple[int, int, int, int]:
    return (m.dim, m.depth, m.heads, m.mlp_hidden)


# --- presets -----------------------------------------------------------------------------


def test_preset_names_in_size_order():
    assert preset_names() == list(TABLE)


@pytest.mark.parametrize("name", list(TABLE))
def test_preset_dims_match_table(name):
    m = resolve_model(name)
    assert m.name == name
    assert fields_of(m) == TABLE[name]
    assert m.dim // m.heads == HEAD_DIM[name]


def test_preset_says_nothing_beyond_the_architecture():
    m = resolve_model("vit-b")
    assert (m.patch, m.image, m.class_token, m.dist_token, m.registers, m.pos_embed_prefix, m.classes) == (None,) * 7
    assert m.spec_fields() == {"name": "vit-b", "dim": 768, "depth": 12, "heads": 12, "mlp_hidden": 3072}


@pytest.mark.parametrize(
    "typed, key",
    [("VIT-B", "vit-b"), ("vit_b", "vit-b"), ("ViT-Ti", "vit-ti"), ("vit_TI", "vit-ti"), (" vit-l ", "vit-l"),
     ("ViT-H", "vit-h"), ("VIT_S", "vit-s")],
)
def test_preset_lookup_ignores_case_and_underscores(typed, key):
    m = resolve_model(typed)
    assert m.name == key
    assert fields_of(m) == TABLE[key]


@pytest.mark.parametrize("typed, key", [("vit-g", "vit-g"), ("ViT_g", "vit-g"), ("vit-G", "vit-G"), ("VIT_G", "vit-G")])
def test_g_and_G_are_case_sensitive(typed, key):
    m = resolve_model(typed)
    assert m.name == key
    assert fields_of(m) == TABLE[key]


def test_g_and_G_differ():
    assert resolve_model("vit-g").dim == 1408
    assert resolve_model("vit-G").dim == 1664


def test_paper_notation_adds_the_patch():
    m = resolve_model("ViT-L/14")
    assert (m.name, m.dim, m.patch, m.image) == ("vit-l/14", 1024, 14, None)
    # 224 // 14 = 16; 16 * 16 + 1 = 257
    assert build_spec("ViT-L/14").tokens == 257


# --- timm names ----------------------------------------------------------------------------

# name: (size key, patch, image, dist_token, registers, pos_embed_prefix, classes)
TIMM = {
    "vit_tiny_patch16_224": ("vit-ti", 16, 224, False, 0, True, None),
    "vit_small_patch16_224": ("vit-s", 16, 224, False, 0, True, None),
    "vit_medium_patch16_256": ("vit-m", 16, 256, False, 0, True, None),
    "vit_base_patch16_384": ("vit-b", 16, 384, False, 0, True, None),
    "vit_base_patch32_224": ("vit-b", 32, 224, False, 0, True, None),
    "vit_base_patch16_clip_224": ("vit-b", 16, 224, False, 0, True, None),
    "vit_large_patch14_clip_336": ("vit-l", 14, 336, False, 0, True, None),
    "vit_huge_patch14_224": ("vit-h", 14, 224, False, 0, True, None),
    "vit_giant_patch14_224": ("vit-g", 14, 224, False, 0, True, None),
    "vit_gigantic_patch14_224": ("vit-G", 14, 224, False, 0, True, None),
    "vit_base_patch14_dinov2": ("vit-b", 14, 518, False, 0, True, 0),
    "vit_small_patch14_dinov2": ("vit-s", 14, 518, False, 0, True, 0),
    "vit_large_patch14_reg4_dinov2": ("vit-l", 14, 518, False, 4, False, 0),
    "deit_tiny_patch16_224": ("vit-ti", 16, 224, False, 0, True, None),
    "deit_base_patch16_384": ("vit-b", 16, 384, False, 0, True, None),
    "deit_small_distilled_patch16_224": ("vit-s", 16, 224, True, 0, True, None),
    "deit_base_distilled_patch16_384": ("vit-b", 16, 384, True, 0, True, None),
    "vit_base_patch16": ("vit-b", 16, 224, False, 0, True, None),  # no size in the name: 224
}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_names_parse(name):
    size, patch, image, dist, registers, prefix, classes = TIMM[name]
    m = resolve_model(name)
    assert m.name == name
    assert fields_of(m) == TABLE[size]
    assert (m.patch, m.image, m.class_token, m.dist_token) == (patch, image, True, dist)
    assert (m.registers, m.pos_embed_prefix, m.classes) == (registers, prefix, classes)


def test_dinov2_with_registers():
    m = resolve_model("vit_large_patch14_reg4_dinov2")
    assert (m.dim, m.depth, m.heads, m.mlp_hidden) == (1024, 24, 16, 4096)
    assert (m.patch, m.image, m.registers, m.pos_embed_prefix, m.classes) == (14, 518, 4, False, 0)
    spec = build_spec("vit_large_patch14_reg4_dinov2")
    assert (spec.image_h, spec.image_w, spec.patch, spec.classes) == (518, 518, 14, 0)
    assert spec.pos_embed_prefix is False
    # 518 // 14 = 37; 37 * 37 + 1 class + 4 registers = 1374
    assert spec.prefix_tokens == 5
    assert spec.tokens == 1374


def test_dinov2_without_registers_gives_class_token_a_position():
    spec = build_spec("vit_base_patch14_dinov2")
    assert (spec.dim, spec.class_token, spec.pos_embed_prefix, spec.registers, spec.classes) == (768, True, True, 0, 0)
    # 37 * 37 + 1 = 1370
    assert spec.tokens == 1370


def test_deit_distilled_has_two_prefix_tokens():
    m = resolve_model("deit_small_distilled_patch16_224")
    assert (m.dim, m.dist_token) == (384, True)
    spec = build_spec("deit_small_distilled_patch16_224")
    assert spec.dist_token is True
    assert spec.prefix_tokens == 2
    # 224 // 16 = 14; 14 * 14 + 2 = 198
    assert spec.tokens == 198


def test_vit_base_patch16_384_tokens():
    # 384 // 16 = 24; 24 * 24 + 1 = 577
    assert build_spec("vit_base_patch16_384", overrides={}).tokens == 577


def test_timm_names_ignore_case_dashes_and_pretrained_tag():
    typed = "ViT-Base-Patch16-384.augreg_in21k_ft_in1k"
    m = resolve_model(typed)
    assert m.name == typed
    assert (m.dim, m.patch, m.image) == (768, 16, 384)
    assert resolve_model("vit_large_patch14_reg4_dinov2.lvd142m").registers == 4


def test_timm_spec_fields_use_spec_names():
    f = resolve_model("vit_base_patch16_384").spec_fields()
    assert f == {
        "name": "vit_base_patch16_384", "dim": 768, "depth": 12, "heads": 12, "mlp_hidden": 3072,
        "patch": 16, "image_h": 384, "image_w": 384, "class_token": True, "dist_token": False,
        "registers": 0, "pos_embed_prefix": True,
    }


@pytest.mark.parametrize("name", _TIMM_EXAMPLES)
def test_every_suggested_example_resolves_and_builds(name):
    assert build_spec(name).name == name


def test_dinov2_giant_is_its_own_width_with_swiglu_and_needs_hugging_faces_code():
    """DINOv2's giant is not ViT-g: 1536 wide, 40 blocks of 24 heads, a SwiGLU MLP 4096 wide
    ((int(1536 * 4 * 2 / 3) + 7) // 8 * 8). Only Hugging Face's SwiGLU is modelled: under timm
    (SwiGLUPacked) the name is refused, not guessed."""
    giant = resolve_model("vit_giant_patch14_reg4_dinov2")
    assert (giant.dim, giant.depth, giant.heads, giant.mlp_hidden, giant.mlp) == (1536, 40, 24, 4096, "swiglu")
    with pytest.raises(ConfigError, match="--impl hf"):
        build_spec("vit_giant_patch14_dinov2")
    spec = build_spec("vit_giant_patch14_dinov2", overrides={"impl": "hf"})
    assert spec.mlp.value == "swiglu" and spec.layer_scale


def test_eva_names_say_what_is_missing():
    with pytest.raises(UnknownNameError, match="rotary"):
        resolve_model("eva02_base_patch14_224")


# --- unknown names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "typed, expected",
    [
        ("vit_bsae_patch16_224", "vit_base_patch16_224"),
        ("vit_large_patch14_reg4_dinov", "vit_large_patch14_reg4_dinov2"),
        ("deit_small_distiled_patch16_224", "deit_small_distilled_patch16_224"),
        ("vit-bb", "vit-b"),
        ("vit-x", "vit-s"),
    ],
)
def test_unknown_name_suggests_near_matches(typed, expected):
    with pytest.raises(UnknownNameError) as err:
        resolve_model(typed)
    msg = str(err.value)
    assert msg.startswith(f"unknown model {typed!r}; did you mean ")
    assert repr(expected) in msg
    assert "or a timm name such as vit_base_patch16_224" in msg


def test_unknown_name_without_near_match_still_hints():
    with pytest.raises(UnknownNameError) as err:
        resolve_model("resnet50")
    msg = str(err.value)
    assert "did you mean" not in msg
    assert msg.startswith("unknown model 'resnet50' (use a preset (vit-ti, vit-s, vit-m, vit-b, vit-l, vit-h, vit-g, vit-G; "
                          "swin-t, swin-s, swin-b, swin-l)")


@pytest.mark.parametrize(
    "name", ["", "vit-22b", "vit_base_patch16_gap_256", "vit_base_patch16_siglip_224", "vit_base_224", "swin_tiny_patch4_window3_224x", "vit_base_patch0_224"]
)
def test_names_outside_the_grammar_are_unknown(name):
    with pytest.raises(UnknownNameError):
        resolve_model(name)


# --- build_spec ----------------------------------------------------------------------------------


def test_defaults_patch16_image224():
    spec = build_spec("vit-b", overrides={})
    assert (spec.name, spec.patch, spec.image_h, spec.image_w) == ("vit-b", 16, 224, 224)
    # 14 * 14 + 1 = 197
    assert spec.tokens == 197
    assert build_spec() == spec


def test_overrides_win_over_name_defaults():
    spec = build_spec(
        "vit_large_patch14_reg4_dinov2",
        overrides={"image_h": 224, "image_w": 224, "registers": 0, "pos_embed_prefix": True, "classes": 1000, "depth": 12},
    )
    assert (spec.dim, spec.depth, spec.patch, spec.image_h, spec.registers, spec.classes) == (1024, 12, 14, 224, 0, 1000)
    assert spec.pos_embed_prefix is True
    # 224 // 14 = 16; 16 * 16 + 1 = 257
    assert spec.tokens == 257


def test_override_patch_and_image_shorthand():
    spec = build_spec("vit_base_patch16_384", overrides={"patch": 32, "image": 224})
    # 224 // 32 = 7; 7 * 7 + 1 = 50
    assert (spec.patch, spec.image_h, spec.image_w, spec.tokens) == (32, 224, 224, 50)
    # explicit image_h beats the shorthand: 256 // 16 = 16 rows, 224 // 16 = 14 cols
    assert build_spec("vit-b", overrides={"image": 224, "image_h": 256}).tokens == 16 * 14 + 1


def test_none_overrides_are_ignored():
    spec = build_spec("deit_small_distilled_patch16_224", overrides={"dist_token": None, "dim": None, "mlp_ratio": None})
    assert (spec.dim, spec.dist_token) == (384, True)


def test_mlp_ratio_override():
    assert build_spec("vit-b", overrides={"mlp_ratio": 2.0}).mlp_hidden == 1536  # 768 * 2
    # ratio applies to the final dim: 512 * 3 = 1536
    assert build_spec("vit-b", overrides={"dim": 512, "heads": 8, "mlp_ratio": 3}).mlp_hidden == 1536
    # int(): 192 * 2.5 = 480; 100 * 2.5 = 250
    assert build_spec("vit-ti", overrides={"mlp_ratio": 2.5}).mlp_hidden == 480
    assert build_spec(None, overrides={"dim": 100, "depth": 1, "heads": 4, "mlp_ratio": 2.5}).mlp_hidden == 250


def test_mlp_ratio_and_hidden_together_is_an_error():
    with pytest.raises(ConfigError, match="--mlp-ratio or --mlp-hidden"):
        build_spec("vit-b", overrides={"mlp_ratio": 2, "mlp_hidden": 100})
    with pytest.raises(ConfigError, match="--mlp-ratio must be greater than 0"):
        build_spec("vit-b", overrides={"mlp_ratio": 0})


def test_dim_override_keeps_the_models_mlp_ratio():
    assert build_spec("vit-b", overrides={"dim": 1024, "heads": 16}).mlp_hidden == 4096  # 1024 * 3072 / 768
    assert build_spec("vit-g", overrides={"dim": 1408 * 2, "heads": 32}).mlp_hidden == 6144 * 2
    assert build_spec("vit-b", overrides={"dim": 1024, "heads": 16, "mlp_hidden": 1000}).mlp_hidden == 1000


def test_custom_model():
    spec = build_spec(None, overrides={"dim": 256, "depth": 6, "heads": 4})
    assert (spec.name, spec.dim, spec.depth, spec.heads, spec.mlp_hidden) == ("custom", 256, 6, 4, 1024)  # 4 * 256
    assert (spec.patch, spec.image_h, spec.tokens) == (16, 224, 197)


def test_custom_model_needs_its_architecture():
    with pytest.raises(ConfigError, match="a custom model needs --heads"):
        build_spec(None, overrides={"dim": 256, "depth": 6})


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"heads": 7}, "--heads 7 does not divide --dim 768"),
        ({"image": 8}, "smaller than patch"),
        ({"patch": 0}, "patch"),
        ({"no_such_field": 1}, "no-such-field"),
    ],
)
def test_impossible_combinations_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_spec("vit-b", overrides=overrides)


def test_unknown_model_in_build_spec():
    with pytest.raises(UnknownNameError):
        build_spec("vit-q", overrides={})


# --- cost and imports --------------------------------------------------------------------------


def test_resolve_model_is_cached_and_frozen():
    first = resolve_model("vit_base_patch16_384")
    before = resolve_model.cache_info().hits
    for _ in range(10_000):
        assert resolve_model("vit_base_patch16_384") is first
    assert resolve_model.cache_info().hits == before + 10_000
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.dim = 1  # type: ignore[misc]


def test_no_heavy_imports():
    code = "import sys, vitcost.presets; print(sorted({'torch', 'typer', 'rich'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_dinov2_and_deit3_count_layer_scale():
    """DINOv2 and DeiT III blocks carry LayerScale (timm init_values): two D-vectors per block.
    vit_large_patch14_reg4_dinov2 is published by timm at 304.37 M parameters; counted here:
    pos 37*37*1024 + patch (14*14*3 + 1)*1024 + (1 + 4)*1024 prefix
    + 24 * (12*1024^2 + 13*1024 + 2*1024 LayerScale) + 2*1024 norm = 304,370,688."""
    from vitcost.formulas import param_counts

    spec = build_spec("vit_large_patch14_reg4_dinov2")
    counts = param_counts(spec)
    assert spec.layer_scale and counts["blocks/layer_scale"] == 24 * 2 * 1024
    assert sum(counts.values()) == 304_370_688
    deit3 = build_spec("deit3_base_patch16_224")
    assert deit3.layer_scale and deit3.pos_embed_prefix is False and deit3.classes == 1000
    # timm's deit3_base_patch16_224: 86.59 M (ViT-B/16 less the class token's position, plus LayerScale)
    assert sum(param_counts(deit3).values()) == 86_567_656 - 768 + 12 * 2 * 768 == 86_585_320
    assert not build_spec("vit_base_patch16_224").layer_scale
