"""Closed-form counts: tokens, parameters and MACs, held against published figures and PyTorch.

Convention (formulas.py): 1 MAC = one multiply-accumulate; FlopCounterMode counts 2 FLOPs per
MAC, so every torch figure here is FLOPs // 2. The torch side is counted inside each test, on
the ``meta`` device (no memory, no time).
"""

from __future__ import annotations

import pytest

import vitcost
from vitcost import formulas
from vitcost.presets import build_spec

from conftest import tiny


def total_params(spec) -> int:
    return sum(formulas.param_counts(spec).values())


def total_macs(spec) -> int:
    return sum(formulas.mac_counts(spec).values())


# --- published figures (vit-variants.md: ViT paper Table 1, timm, fvcore GMACs) ---------------


@pytest.mark.parametrize(
    "model, expected",
    [
        ("vit-b/16", 86_567_656),
        ("vit-b/32", 88_224_232),
        ("vit-l/16", 304_326_632),
        ("vit-l/32", 306_535_400),
    ],
)
def test_published_parameter_counts(model, expected):
    spec = build_spec(model)  # 224 px, 1000 classes
    assert total_params(spec) == expected
    assert vitcost.plan(model, mode="infer").params_total == expected


def test_vit_b16_parameters_by_hand():
    # D = 768, F = 3072, 12 blocks, 196 patches + 1 class token, 1000 classes:
    # patch embed 768 * (16*16*3 + 1)      =    590,592
    # pos embed   197 * 768                 =    151,296
    # class token 768                       =        768
    # per block: 2 LN (4*768) + qkv (768*2304 + 2304) + proj (768*768 + 768)
    #            + fc1 (768*3072 + 3072) + fc2 (3072*768 + 768) = 7,087,872; x 12 = 85,054,464
    # final norm 2 * 768                    =      1,536
    # head 768 * 1000 + 1000                =    769,000
    # total                                 = 86,567,656
    p = formulas.param_counts(build_spec("vit-b/16"))
    assert p["patch_embed"] == 590_592
    assert p["pos_embed"] == 151_296
    assert p["prefix_tokens"] == 768
    per_block = sum(v for k, v in p.items() if k.startswith("blocks/")) // 12
    assert per_block == 7_087_872
    assert p["norm"] == 1_536
    assert p["head"] == 769_000


def test_vit_b16_forward_gmacs():
    # N = 197, D = 768, F = 3072, 12 blocks:
    # per block qkv 197*768*2304 = 348,585,984; q.k^T and attn.v 197^2*768 = 29,805,312 each;
    #           proj 197*768^2 = 116,195,328; fc1 = fc2 = 197*768*3072 = 464,781,312
    #           -> 1,453,954,560; x 12 = 17,447,454,720
    # patch embed 196 * 3*16*16 * 768 = 115,605,504; head 768 * 1000 = 768,000
    # total 17,563,828,224 = 17.56 GMACs (the published figure, attention matmuls included)
    spec = build_spec("vit-b/16")
    macs = formulas.mac_counts(spec)
    assert macs["blocks/attn/q_kT"] == macs["blocks/attn/attn_v"] == 12 * 29_805_312
    assert macs["patch_embed"] == 115_605_504
    assert macs["head"] == 768_000
    assert total_macs(spec) == 17_563_828_224
    assert round(total_macs(spec) / 1e9, 2) == 17.56
    assert vitcost.plan("vit-b/16").macs_forward_per_image == 17_563_828_224


def test_vit_b16_against_torch_too():
    """The published figures and the reference model agree with each other, not only with us."""
    measure = pytest.importorskip("vitcost.measure")
    spec = build_spec("vit-b/16")
    assert measure.count_params(spec) == 86_567_656
    assert measure.count_forward_macs(spec) == 17_563_828_224


# --- tokens -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image_h, image_w, patch, grid_h, grid_w, total",
    [
        (224, 224, 16, 14, 14, 197),  # 14*14 + 1
        (224, 224, 14, 16, 16, 257),  # 16*16 + 1
        (224, 224, 32, 7, 7, 50),  # 7*7 + 1
        (384, 384, 16, 24, 24, 577),  # 24*24 + 1
        (384, 256, 16, 24, 16, 385),  # non-square: 24*16 + 1
        (256, 384, 32, 8, 12, 97),  # 8*12 + 1
        (230, 230, 16, 14, 14, 197),  # floor(230/16) = 14: 6 rows and columns dropped
        (384, 384, 14, 27, 27, 730),  # floor(384/14) = 27: 27*27 + 1
        (518, 518, 14, 37, 37, 1370),  # DINOv2: 37*37 + 1
        (512, 512, 8, 64, 64, 4097),  # 64*64 + 1
        (17, 33, 16, 1, 2, 3),  # 1*2 + 1
    ],
)
def test_token_counts(image_h, image_w, patch, grid_h, grid_w, total):
    spec = build_spec("vit-b", overrides=dict(image_h=image_h, image_w=image_w, patch=patch))
    assert formulas.grid_tokens(image_h, patch) == grid_h
    assert formulas.grid_tokens(image_w, patch) == grid_w
    assert (spec.grid_h, spec.grid_w) == (grid_h, grid_w)
    assert spec.tokens == total
    assert spec.divisible == (image_h % patch == 0 and image_w % patch == 0)


@pytest.mark.parametrize(
    "overrides, prefix, total",
    [
        (dict(dist_token=True), 2, 198),  # DeiT distilled: 196 + class + distillation
        (dict(registers=4), 5, 201),  # reg4: 196 + class + 4 registers
        (dict(class_token=False, pooling="avg"), 0, 196),  # no prefix at all
        (dict(dist_token=True, registers=4), 6, 202),
    ],
)
def test_prefix_tokens(overrides, prefix, total):
    spec = build_spec("vit-b", overrides=overrides)
    assert spec.prefix_tokens == prefix
    assert spec.tokens == total


def test_attention_map_512_patch8():
    # 512 / 8 = 64 per side: 64*64 + 1 = 4097 tokens; one head's map 4097^2 = 16,785,409 (~16.8M)
    report = vitcost.plan("vit-b", image=512, patch=8)
    assert report.tokens["total"] == 4097
    assert formulas.attention_map_elements(4097) == 16_785_409
    assert report.attention_maps["elements_per_head"] == 16_785_409
    assert round(report.attention_maps["elements_per_head"] / 1e6, 1) == 16.8
    # 12 heads per layer: 201,424,908 elements
    assert report.attention_maps["elements_per_layer"] == 12 * 16_785_409


# --- against the reference model (torch, meta device) -------------------------------------------

# Small specs that exercise every branch of the parameter and MAC formulas.
VARIANTS = {
    "plain": {},
    "no-class-token-avg-pool": dict(class_token=False, pooling="avg"),
    "class-token-avg-pool": dict(pooling="avg"),
    "dist-token": dict(dist_token=True),
    "registers-no-prefix-pos": dict(registers=4, pos_embed_prefix=False),
    "registers-prefix-pos": dict(registers=4, pos_embed_prefix=True),
    "dist-registers-no-prefix-pos": dict(dist_token=True, registers=2, pos_embed_prefix=False),
    "pos-sincos": dict(pos_embed="sincos"),
    "pos-none": dict(pos_embed="none"),
    "pos-none-no-prefix": dict(pos_embed="none", class_token=False, pooling="avg"),
    "no-qkv-bias": dict(qkv_bias=False),
    "no-head": dict(classes=0),
    "non-square": dict(image_h=64, image_w=48),
    "non-divisible": dict(image_h=70, image_w=50),  # 4 x 3 patches, 6 and 2 pixels dropped
    "one-channel": dict(channels=1),
    "odd-mlp": dict(mlp_hidden=100, depth=3),
    "wider": dict(dim=192, heads=3, mlp_hidden=768, depth=1),
    "layer-scale": dict(layer_scale=True),
    "layer-scale-registers": dict(layer_scale=True, registers=4, pos_embed_prefix=False),
}


@pytest.fixture(scope="module")
def torch_mod():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("overrides", list(VARIANTS.values()), ids=list(VARIANTS))
def test_params_equal_reference_model(overrides, torch_mod):
    from vitcost import measure

    spec = tiny(**overrides)
    assert total_params(spec) == measure.count_params(spec)


@pytest.mark.parametrize("overrides", list(VARIANTS.values()), ids=list(VARIANTS))
def test_param_tensors_match_reference_order_and_sizes(overrides, torch_mod):
    """The per-tensor list the memory replay sizes the optimizer from is parameters(), in order."""
    from vitcost.reference_vit import build

    spec = tiny(**overrides)
    with torch_mod.device("meta"):
        model = build(spec)
    assert [n for _, n in formulas.param_tensors(spec)] == [p.numel() for p in model.parameters()]


def _module_macs(spec, torch):
    """Forward MACs of the eager reference model, from FlopCounterMode, by vitcost component."""
    from torch.utils.flop_counter import FlopCounterMode

    from vitcost.reference_vit import build

    with torch.device("meta"):
        model = build(spec, attention="eager")
        x = torch.randn(1, spec.channels, spec.image_h, spec.image_w)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    counts = counter.get_flop_counts()

    def flops(module: str, op: str | None = None) -> int:
        ops = counts.get("VisionTransformer" + module, {})
        return sum(v for k, v in ops.items() if op is None or str(k) == op)

    blocks = [f".blocks.{i}" for i in range(spec.depth)]
    return {
        "total": counter.get_total_flops() // 2,
        "patch_embed": flops(".patch_embed") // 2,
        "blocks/attn/qkv": sum(flops(b + ".attn.qkv") for b in blocks) // 2,
        "attention_matmuls": sum(flops(b + ".attn", "aten.bmm") for b in blocks) // 2,
        "blocks/attn/proj": sum(flops(b + ".attn.proj") for b in blocks) // 2,
        "blocks/mlp/fc1": sum(flops(b + ".mlp.fc1") for b in blocks) // 2,
        "blocks/mlp/fc2": sum(flops(b + ".mlp.fc2") for b in blocks) // 2,
        "head": (flops(".head") + flops(".head_dist")) // 2,
        "non_attention": sum(v for k, v in counts["Global"].items() if str(k) != "aten.bmm") // 2,
    }


@pytest.mark.parametrize("overrides", list(VARIANTS.values()), ids=list(VARIANTS))
def test_forward_macs_equal_flop_counter(overrides, torch_mod):
    from vitcost import measure

    spec = tiny(**overrides)
    assert total_macs(spec) == measure.count_forward_macs(spec)


@pytest.mark.parametrize("overrides", list(VARIANTS.values()), ids=list(VARIANTS))
def test_forward_macs_by_component_equal_flop_counter(overrides, torch_mod):
    spec = tiny(**overrides)
    ours = formulas.mac_counts(spec)
    theirs = _module_macs(spec, torch_mod)
    for path in ("patch_embed", "blocks/attn/qkv", "blocks/attn/proj", "blocks/mlp/fc1", "blocks/mlp/fc2", "head"):
        assert ours[path] == theirs[path], path
    assert ours["blocks/attn/q_kT"] + ours["blocks/attn/attn_v"] == theirs["attention_matmuls"]
    assert sum(ours.values()) == theirs["total"]


@pytest.mark.parametrize("overrides", [{}, dict(image_h=64, image_w=48), dict(dist_token=True, registers=4, depth=3)])
def test_attention_matmuls_are_counted(overrides, torch_mod):
    """What FlopCounterMode counts beyond the linears and the conv is exactly depth * 2 N^2 D."""
    spec = tiny(**overrides)
    theirs = _module_macs(spec, torch_mod)
    n, d = spec.tokens, spec.dim
    attention = spec.depth * 2 * n * n * d  # q.k^T and attention.v: N^2 D each, per block
    assert theirs["total"] - theirs["non_attention"] == attention
    macs = formulas.mac_counts(spec)
    assert macs["blocks/attn/q_kT"] + macs["blocks/attn/attn_v"] == attention


def test_attention_matmuls_worked_example():
    # tiny: N = 4*4 + 1 = 17, D = 64, 2 blocks: 2 * 2 * 17^2 * 64 = 73,984
    macs = formulas.mac_counts(tiny())
    assert macs["blocks/attn/q_kT"] + macs["blocks/attn/attn_v"] == 73_984
    assert formulas.attention_score_macs(17, 64) == 18_496  # 17 * 17 * 64


# --- training MACs: forward + backward ----------------------------------------------------------


def _training_flop_macs(spec, torch, checkpointing: str = "none") -> int:
    """MACs of forward + loss.backward() of the eager reference model, batch 1, on meta."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from vitcost.reference_vit import build

    with torch.device("meta"):
        model = build(spec, attention="eager", checkpointing=checkpointing)
        x = torch.randn(1, spec.channels, spec.image_h, spec.image_w)
        y = torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(x)
        loss = F.cross_entropy(out, y) if spec.classes else out.float().pow(2).mean()
        loss.backward()
    return counter.get_total_flops() // 2


def test_training_macs_rule_worked_example():
    # 3x every forward matmul, 2x the patch embedding (no gradient for the image)
    fwd = {"patch_embed": 10, "blocks/attn/qkv": 7, "head": 1}
    assert formulas.training_macs(fwd) == {"patch_embed": 20, "blocks/attn/qkv": 21, "head": 3}


@pytest.mark.parametrize("overrides", list(VARIANTS.values()), ids=list(VARIANTS))
def test_training_macs_equal_flop_counter(overrides, torch_mod):
    spec = tiny(**overrides)
    train = formulas.training_macs(formulas.mac_counts(spec))
    assert sum(train.values()) == _training_flop_macs(spec, torch_mod)


def test_training_macs_patch_embedding_costs_twice_its_forward(torch_mod):
    """The conv's backward computes its weight gradient only: FlopCounterMode sees 2x, not 3x."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from vitcost.reference_vit import build

    spec = tiny()
    torch = torch_mod
    with torch.device("meta"):
        model = build(spec, attention="eager")
        x = torch.randn(1, 3, 64, 64)
        y = torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), y).backward()
    patch = sum(counter.get_flop_counts()["VisionTransformer.patch_embed"].values()) // 2
    # 16 patches * 3*16*16 * 64 = 786,432 forward MACs; x 2 = 1,572,864
    assert formulas.mac_counts(spec)["patch_embed"] == 786_432
    assert patch == 1_572_864
    assert formulas.training_macs(formulas.mac_counts(spec))["patch_embed"] == patch


def _checkpointed_truth(fwd: dict[str, int]) -> int:
    """What torch runs with non-reentrant checkpointing (early stop, the default): the block is
    recomputed only until the last tensor backward needs exists (GELU's output), so fc2's forward
    is not rerun: blocks 4x except fc2 3x, patch embedding 2x, head 3x."""
    total = 0
    for path, macs in fwd.items():
        factor = 2 if path == "patch_embed" else 3
        if path.startswith("blocks/") and path != "blocks/mlp/fc2":
            factor += 1
        total += factor * macs
    return total


@pytest.mark.parametrize("overrides", [{}, dict(depth=3, mlp_hidden=100), dict(dist_token=True, depth=1)])
def test_checkpointed_training_macs_torch_relation(overrides, torch_mod):
    """Pins what torch does under full checkpointing (the relation the next test expects)."""
    spec = tiny(**overrides)
    fwd = formulas.mac_counts(spec)
    assert _training_flop_macs(spec, torch_mod, checkpointing="full") == _checkpointed_truth(fwd)


@pytest.mark.parametrize("overrides", [{}, dict(depth=3, mlp_hidden=100)])
def test_checkpointed_training_macs_equal_flop_counter(overrides, torch_mod):
    spec = tiny(**overrides)
    train = formulas.training_macs(formulas.mac_counts(spec), recompute_blocks=True)
    assert sum(train.values()) == _training_flop_macs(spec, torch_mod, checkpointing="full")


def test_report_training_macs_vit_b16():
    plain = vitcost.plan("vit-b", image=224, patch=16)
    assert plain.macs_training_per_image == sum(formulas.training_macs(plain.macs_forward).values())
    # 3 x 17,563,828,224 - 115,605,504 (the patch embedding: 2x) = 52,575,879,168
    assert plain.macs_training_per_image == 52_575_879_168


# --- parts add up -----------------------------------------------------------------------------


def test_param_components_sum_to_tensors():
    """Two independent breakdowns of the same model (by component, by tensor) give one total."""
    for overrides in VARIANTS.values():
        spec = tiny(**overrides)
        assert total_params(spec) == sum(n for _, n in formulas.param_tensors(spec))


def test_every_component_is_in_the_display_order():
    spec = tiny(dist_token=True)
    assert set(formulas.param_counts(spec)) <= set(formulas.COMPONENT_ORDER)
    assert set(formulas.mac_counts(spec)) <= set(formulas.COMPONENT_ORDER)
