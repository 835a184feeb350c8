"""The compiled program against the replay it is compiled from: every figure equal, always.

``vitcost.memory.replay_memory`` is what tests/test_memory.py holds to the byte against a real
CPU step; ``vitcost.program.estimate_memory`` (what reports use) must give exactly what the
replay gives, for every structure and every size, on both device rules.
"""

from __future__ import annotations

import random

import pytest

from vitcost import program
from vitcost.memory import replay_memory
from vitcost.program import _candidates, _Poly, _Vec, compile_program, estimate_memory, peak_at, structure_key
from vitcost.specs import make_spec, make_workload

from conftest import cpu_workload, tiny

@pytest.fixture(autouse=True)
def _compile_at_once(monkeypatch):
    """Every evaluation here goes through a compiled program, none through the replay."""
    monkeypatch.setattr(program, "COMPILE_AFTER", 1)


_SPEC_VARIANTS = [
    {}, dict(dist_token=True), dict(registers=4, pos_embed_prefix=False), dict(registers=1),
    dict(pooling="avg", class_token=False), dict(pooling="avg"), dict(pos_embed="sincos"),
    dict(pos_embed="none"), dict(pos_embed="none", class_token=False, pooling="avg"),
    dict(qkv_bias=False), dict(pos_embed_prefix=False), dict(classes=0), dict(layer_scale=True),
    dict(layer_scale=True, registers=4, pos_embed_prefix=False),
    # Hugging Face's code: ViT, DeiT distilled, DINOv2 with and without registers
    dict(impl="hf"), dict(impl="hf", dist_token=True),
    dict(impl="hf", layer_scale=True, pooling="token+avg", mask_token=True),
    dict(impl="hf", layer_scale=True, pooling="token+avg", mask_token=True, registers=4),
    dict(impl="hf", layer_scale=True, pooling="token+avg", mlp="swiglu"),
    dict(impl="hf", frames=4, tubelet=2, class_token=False, pos_embed="sincos", pooling="avg"),  # VideoMAE
    dict(dist_token=True, distillation=True),
]


def _random_config(rng: random.Random):
    heads = rng.choice([1, 2, 3, 4])
    dim = heads * rng.choice([16, 24, 32, 48])
    variant = rng.choice(_SPEC_VARIANTS)
    spec = make_spec(**{
        "dim": dim, "depth": rng.choice([1, 2, 3, 4, 5, 7, 12, 32]), "heads": heads,
        "mlp_hidden": dim * rng.choice([2, 4]), "patch": rng.choice([4, 8, 14, 16]),
        "image_h": rng.choice([32, 48, 64, 72]), "image_w": rng.choice([32, 64, 80]), "classes": 100, **variant,
    })
    mode = "infer" if not spec.classes else rng.choice(["train", "train", "infer"])
    kw = dict(batch=rng.choice([1, 1, 2, 3, 5, 8, 64]), mode=mode,
              precision=rng.choice(["fp32", "bf16", "fp16", "amp-bf16", "amp-fp16"]),
              attention=rng.choice(["sdpa", "eager"]), device=rng.choice(["cpu", "cuda"]))
    if mode == "train":
        kw.update(checkpointing=rng.choice(["none", "full"]), keep_grads=rng.choice([False, True]),
                  optimizer=rng.choice(["adamw", "adam", "sgd", "sgd-momentum"]))
    return spec, make_workload(**kw)


def test_program_equals_the_replay_on_random_configurations():
    rng = random.Random(20261121)
    structures = set()
    for _ in range(600):
        spec, wl = _random_config(rng)
        structures.add(structure_key(spec, wl))
        expected, totals = replay_memory(spec, wl)
        got = estimate_memory(spec, wl)
        assert got == expected, (spec, wl)
        assert peak_at(spec, wl, wl.batch) == max(totals)
    assert len(structures) > 300  # the sample spans many programs, not a few


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("precision,attention", [("fp32", "eager"), ("amp-bf16", "sdpa"), ("bf16", "eager")])
def test_one_program_serves_every_size_and_depth_of_a_structure(device, precision, attention):
    """The program is compiled at depth 3 and 4 and read at others; sizes are symbols."""
    wl = cpu_workload(device=device, precision=precision, attention=attention)
    program._PROGRAMS.clear()
    seen = set()
    for depth in (3, 4, 6, 12, 24, 40):
        for dim, heads, image, patch in ((48, 3, 64, 16), (64, 4, 80, 8), (96, 2, 48, 4)):
            spec = tiny(depth=depth, dim=dim, heads=heads, mlp_hidden=4 * dim, image_h=image, image_w=image, patch=patch)
            for batch in (2, 7, 64):
                w = wl.model_copy(update={"batch": batch})
                seen.add(structure_key(spec, w))
                assert estimate_memory(spec, w) == replay_memory(spec, w)[0], (depth, dim, image, batch)
    assert len(seen) == 1 and len(program._PROGRAMS) == 1


@pytest.mark.parametrize("depth", [3, 7, 24])
def test_the_last_block_is_named_by_the_depth_asked_for(depth):
    spec, wl = tiny(depth=depth), cpu_workload(attention="eager", batch=8)
    assert estimate_memory(spec, wl).peak_phase == f"backward: blocks.{depth - 1}.mlp"
    assert replay_memory(spec, wl)[0].peak_phase == f"backward: blocks.{depth - 1}.mlp"


def test_batch_one_has_its_own_program():
    """At batch 1 reshapes are views and prefix-token gradients are slices: other tensors."""
    spec, wl = tiny(), cpu_workload(attention="eager")
    one = compile_program(spec, wl.model_copy(update={"batch": 1}), one=True)
    two = compile_program(spec, wl, one=False)
    assert one.source != two.source
    assert structure_key(spec, wl.model_copy(update={"batch": 1})) != structure_key(spec, wl)


def test_candidates_drop_only_totals_that_can_never_be_the_peak():
    x, y = _Vec({0: 1}), _Vec({1: 1})
    totals = [x, x + y, x + x, y, x + y, 3 * y]
    # 0 and 3 are below the totals after them (an allocation followed); 4 repeats 1 (the first counts)
    assert _candidates(totals, 2) == [1, 2, 5]


def test_candidates_keep_negative_counts_apart():
    """A count made from the depth may be negative (``depth - 2`` lumps read at depth 0)."""
    totals = [_Vec({0: -2, 1: 1}), _Vec({0: -1, 1: 1}), _Vec({0: 5})]
    assert _candidates(totals, 2) == [1, 2]


def test_symbolic_sizes_multiply_out():
    b, n, d = (_Poly.var(v) for v in "bnd")
    size = b * n * d * 2 + 0
    assert size.source() == "2*b*d*n"
    assert (size - size) == _Poly({}) and not (size - size)
    assert (3 * (b * n)).source() == "3*b*n"


def _forget_programs():
    for cache in (program._PROGRAMS, program._USES, program._PREPARED):
        cache.clear()


def test_a_structure_is_replayed_until_it_is_used_often(monkeypatch):
    monkeypatch.setattr(program, "COMPILE_AFTER", 3)
    _forget_programs()
    spec, wl = tiny(depth=5), cpu_workload(attention="eager")
    for uses in (1, 2, 3, 4):
        batch = 2 + uses
        w = wl.model_copy(update={"batch": batch})
        assert estimate_memory(spec, w) == replay_memory(spec, w)[0]
        assert len(program._PROGRAMS) == (uses >= 3)


def test_one_plan_compiles_nothing(monkeypatch):
    """A single ``vitcost plan`` makes a handful of evaluations: replays are cheaper then."""
    import vitcost
    from vitcost import estimate

    monkeypatch.setattr(program, "COMPILE_AFTER", 16)
    _forget_programs()
    estimate._MAX_BATCH.clear()
    report = vitcost.plan(image=384, patch=16, gpu="a100")
    assert program._PROGRAMS == {}
    assert report.gpu.max_batch_size > report.workload.batch
