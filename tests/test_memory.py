"""The memory replay against a real CPU step (MemTracker), to the byte; and its pure-python behaviour.

On the CPU the allocator does not round, so MemTracker's peak is the exact sum of live tensor
storages: a replay that is off by one byte is wrong somewhere, not noisy (measuring.md). Every
configuration measured here is tiny (D <= 192, depth <= 4, image <= 64, batch <= 8).
"""

from __future__ import annotations

import contextlib
from functools import lru_cache

import pytest

from vitcost.api import make_model_spec
from vitcost.memory import CATEGORIES, replay_memory
from vitcost.program import estimate_memory
from vitcost.specs import make_workload

from conftest import cpu_workload, tiny


# (id, spec overrides on the tiny ViT, workload overrides on fp32 / batch 2 / CPU rules, marks)
CASES = [
    ("fp32-sdpa", {}, {}, ()),
    ("fp32-eager", {}, dict(attention="eager"), ()),
    ("bf16-sdpa", {}, dict(precision="bf16"), ()),
    ("bf16-eager", {}, dict(precision="bf16", attention="eager", batch=4), ()),
    ("amp-sdpa", {}, dict(precision="amp-bf16"), ()),
    ("amp-eager", {}, dict(precision="amp-bf16", attention="eager"), ()),
    ("infer-fp32-b8", {}, dict(mode="infer", batch=8), ()),
    ("infer-amp-eager-b4", {}, dict(mode="infer", precision="amp-bf16", attention="eager", batch=4), ()),
    ("infer-bf16-depth4-b1", dict(depth=4), dict(mode="infer", precision="bf16", batch=1), ()),
    ("keep-grads", {}, dict(keep_grads=True), ()),
    ("keep-grads-amp-sgd", {}, dict(keep_grads=True, precision="amp-bf16", optimizer="sgd"), ()),
    ("adam", {}, dict(optimizer="adam"), ()),
    ("sgd", {}, dict(optimizer="sgd"), ()),
    ("sgd-momentum-b4", {}, dict(optimizer="sgd-momentum", batch=4), ()),
    ("checkpoint-fp32-depth3-b4", dict(depth=3), dict(checkpointing="full", batch=4), ()),
    ("checkpoint-amp-eager-depth3", dict(depth=3), dict(checkpointing="full", precision="amp-bf16", attention="eager"), ()),
    ("checkpoint-bf16-sgd", {}, dict(checkpointing="full", precision="bf16", optimizer="sgd"), ()),
    ("depth1-b2", dict(depth=1), {}, ()),
    ("depth1-b1", dict(depth=1), dict(batch=1), ()),
    ("depth4-b8-eager", dict(depth=4), dict(batch=8, attention="eager"), ()),
    ("depth3-amp-b4-d96", dict(depth=3, dim=96, heads=3, mlp_hidden=384), dict(precision="amp-bf16", batch=4), ()),
    ("dist-token-amp", dict(dist_token=True), dict(precision="amp-bf16"), ()),
    ("dist-token-fp32", dict(dist_token=True), {}, ()),
    ("registers-no-prefix-pos", dict(registers=4, pos_embed_prefix=False), {}, ()),
    ("registers-prefix-pos-amp", dict(registers=4, pos_embed_prefix=True), dict(precision="amp-bf16"), ()),
    ("avg-pool-no-class-token", dict(class_token=False, pooling="avg"), {}, ()),
    ("avg-pool-amp", dict(pooling="avg"), dict(precision="amp-bf16"), ()),
    ("sincos-fp32", dict(pos_embed="sincos"), {}, ()),
    ("sincos-amp", dict(pos_embed="sincos"), dict(precision="amp-bf16"), ()),
    ("sincos-bf16", dict(pos_embed="sincos"), dict(precision="bf16"), ()),
    ("no-pos-eager", dict(pos_embed="none"), dict(attention="eager"), ()),
    ("non-square-non-divisible", dict(image_h=64, image_w=40), dict(attention="eager"), ()),
    ("one-channel-no-qkv-bias-bf16", dict(channels=1, qkv_bias=False), dict(precision="bf16"), ()),
    ("d192-depth3-amp-b4", dict(dim=192, heads=3, mlp_hidden=768, depth=3), dict(precision="amp-bf16", batch=4), ()),
    ("head-dominated", dict(depth=1, classes=20000), dict(optimizer="sgd", batch=8), ()),
    # many tokens per width: the attention maps (B*H*N^2) outweigh the token tensors, so the
    # peak sits in eager attention's backward, where softmax backward reads its saved output
    ("maps-dominated-fp32-eager", dict(image_h=128, image_w=128, patch=8), dict(attention="eager", optimizer="sgd"), ()),
    ("maps-dominated-bf16-eager", dict(image_h=128, image_w=128, patch=8), dict(attention="eager", precision="bf16", batch=4), ()),
    ("maps-dominated-amp-eager", dict(image_h=128, image_w=128, patch=8), dict(attention="eager", precision="amp-bf16"), ()),
    # batch 1 or one head: eager attention's q, k, v reshape as views of the qkv output
    ("eager-b1-views", dict(image_h=128, image_w=128, patch=8), dict(attention="eager", batch=1, optimizer="sgd"), ()),
    ("eager-b1-views-amp-keep", dict(image_h=128, image_w=128, patch=8), dict(attention="eager", batch=1, precision="amp-bf16", keep_grads=True), ()),
    ("eager-b1-views-infer", dict(image_h=128, image_w=128, patch=8), dict(attention="eager", batch=1, mode="infer"), ()),
    ("eager-one-head", dict(heads=1), dict(attention="eager", batch=3), ()),
    # (q @ k^T) * scale: the scores themselves are scaled (timm before 0.9, HF ViT)
    ("postscale-fp32", {}, dict(attention="eager-postscale"), ()),
    ("postscale-amp-maps", dict(image_h=128, image_w=128, patch=8), dict(attention="eager-postscale", precision="amp-bf16"), ()),
    ("postscale-bf16-b1-views", dict(image_h=128, image_w=128, patch=8), dict(attention="eager-postscale", precision="bf16", batch=1), ()),
    ("postscale-infer-amp", dict(image_h=128, image_w=128, patch=8), dict(attention="eager-postscale", precision="amp-bf16", mode="infer", batch=4), ()),
    ("postscale-checkpoint-one-head", dict(depth=3, heads=1), dict(attention="eager-postscale", checkpointing="full"), ()),
    ("eager-b1-checkpoint", dict(depth=3), dict(attention="eager", batch=1, checkpointing="full"), ()),
    # LayerScale (DINOv2, DeiT III): each branch output saved by the multiplication by gamma
    ("layer-scale-fp32-sdpa", dict(layer_scale=True), {}, ()),
    ("layer-scale-amp-sdpa", dict(layer_scale=True), dict(precision="amp-bf16"), ()),
    ("layer-scale-amp-eager-b4", dict(layer_scale=True), dict(precision="amp-bf16", attention="eager", batch=4), ()),
    ("layer-scale-bf16-keep-grads", dict(layer_scale=True), dict(precision="bf16", keep_grads=True), ()),
    ("layer-scale-infer-amp", dict(layer_scale=True), dict(precision="amp-bf16", mode="infer", batch=4), ()),
    ("layer-scale-b1-registers-sgd", dict(layer_scale=True, registers=4, pos_embed_prefix=False), dict(batch=1, optimizer="sgd"), ()),
    ("layer-scale-depth1-adam", dict(layer_scale=True, depth=1), dict(optimizer="adam"), ()),
    ("layer-scale-depth4-amp-keep", dict(layer_scale=True, depth=4), dict(precision="amp-bf16", keep_grads=True, optimizer="sgd-momentum"), ()),
    ("layer-scale-checkpointing-amp", dict(layer_scale=True, depth=3), dict(precision="amp-bf16", checkpointing="full"), ()),
    ("drop-path-amp-eager", dict(drop_path=True, depth=3), dict(precision="amp-bf16", attention="eager"), ()),
    ("drop-path-layer-scale-bf16-b1", dict(drop_path=True, layer_scale=True), dict(precision="bf16", batch=1), ()),
    ("drop-path-infer", dict(drop_path=True), dict(mode="infer", precision="amp-bf16"), ()),
    ("distillation-amp-keep", dict(dist_token=True, distillation=True, depth=3), dict(precision="amp-bf16", keep_grads=True), ()),
    ("distillation-bf16-b1-checkpointing", dict(dist_token=True, distillation=True), dict(precision="bf16", batch=1, checkpointing="full"), ()),
    ("layer-scale-checkpointing-fp32-eager-b1", dict(layer_scale=True), dict(checkpointing="full", attention="eager", batch=1), ()),
    ("amp-no-pos-no-prefix-infer", dict(pos_embed="none", class_token=False, pooling="avg"),
     dict(precision="amp-bf16", mode="infer", batch=8), ()),
    ("amp-no-pos-no-prefix-sgd-eager", dict(pos_embed="none", class_token=False, pooling="avg"),
     dict(precision="amp-bf16", optimizer="sgd", attention="eager", batch=8), ()),
]


def _params(cases, only_training: bool = False, marks_for=lambda case: case[3]):
    out = []
    for case in cases:
        case_id, s, w, _ = case
        if only_training and w.get("mode") == "infer":
            continue
        out.append(pytest.param(s, w, id=case_id, marks=marks_for(case)))
    return out


@lru_cache(maxsize=None)
def _measured(spec, workload):
    from vitcost.measure import measure_cpu

    return measure_cpu(spec, workload)


def _measured_categories(m) -> dict[str, int]:
    return {
        "weights": m.weights_bytes,
        "gradients": m.gradients_bytes,
        "optimizer": m.optimizer_bytes,
        "activations": m.activations_bytes,
        "temporaries": m.temporaries_bytes,
    }


@pytest.fixture(scope="module")
def torch_mod():
    return pytest.importorskip("torch")


# --- against MemTracker ---------------------------------------------------------------------


@pytest.mark.parametrize("spec_over, wl_over", _params(CASES))
def test_peak_equals_memtracker(spec_over, wl_over, torch_mod):
    spec, wl = tiny(**spec_over), cpu_workload(**wl_over)
    est = estimate_memory(spec, wl)
    measured = _measured(spec, wl)
    assert est.peak == measured.peak_bytes
    assert est.at_peak == _measured_categories(measured)


def test_memtracker_case_list_covers_what_it_claims():
    """The cases above put the peak where their names say (checked on the replay; the
    test above then holds the replay's categories at that peak against torch)."""
    phases = {case_id: estimate_memory(tiny(**s), cpu_workload(**w)).peak_phase for case_id, s, w, _ in CASES}
    assert phases["fp32-sdpa"] == "optimizer step"
    assert phases["head-dominated"] == "backward: loss + head"
    assert phases["infer-fp32-b8"].startswith("forward: blocks.")
    assert any(p.startswith("backward: blocks.") for p in phases.values())
    assert any(p == "backward: patch embedding" for p in phases.values())


def test_optimizer_step_peak_holds_adam_temporaries(torch_mod):
    """At an optimizer-step peak MemTracker's OPT category holds more than the two states: the
    step's own temporaries (the replay's ``denom``), so the peak really is inside step()."""
    spec, wl = tiny(), cpu_workload()
    est = estimate_memory(spec, wl)
    measured = _measured(spec, wl)
    assert est.peak_phase == "optimizer step"
    assert measured.optimizer_bytes > est.optimizer_states
    assert measured.optimizer_bytes == est.at_peak["optimizer"]


def test_head_dominated_peak_is_in_the_head_backward(torch_mod):
    """depth 1, 20,000 classes: the head's weight gradient (64 * 20,000 * 4 = 5,120,000 bytes)
    plus every saved activation is the peak, not the end of the backward pass."""
    spec, wl = tiny(depth=1, classes=20000), cpu_workload(optimizer="sgd", batch=8)
    est = estimate_memory(spec, wl)
    assert est.peak_phase == "backward: loss + head"
    assert est.at_peak["gradients"] < est.gradients  # only some gradients exist yet
    assert est.at_peak["activations"] > 0  # the forward's saved tensors are still there
    assert _measured(spec, wl).peak_bytes == est.peak


def _forward_tensors(spec, wl, torch):
    """The real input batch, labels and loss of one training forward (the sizes MemTracker sees)."""
    import torch.nn.functional as F

    from vitcost.measure import _loss, make_batch, param_dtype
    from vitcost.reference_vit import build

    dtype = param_dtype(wl)
    model = build(spec, attention=wl.attention.value, checkpointing=wl.checkpointing.value).to(dtype=dtype)
    x, y = make_batch(spec, wl, "cpu")  # (with distillation, the teacher's labels too)
    amp = wl.precision.value.startswith("amp-")
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with ctx:
        loss = _loss(model(x), y) if spec.distillation else F.cross_entropy(model(x), y)
    return x, y, loss


@pytest.mark.parametrize("spec_over, wl_over", _params(
    CASES + [("amp-no-pos-no-prefix-adamw", dict(pos_embed="none", class_token=False, pooling="avg"),
              dict(precision="amp-bf16"), ())],
    only_training=True,
    # the batch-1 gradient view appears in backward only: what the forward saves is right
    marks_for=lambda case: () if case[0] == "depth1-b1" else case[3],
))
def test_saved_after_forward_equals_memtracker(spec_over, wl_over, torch_mod):
    """MemTracker's ACT bytes between forward and backward = saved activations + autocast's weight
    copies + the input batch and labels + the loss scalar; the last three are sized from the real
    tensors here."""
    spec, wl = tiny(**spec_over), cpu_workload(**wl_over)
    est = estimate_memory(spec, wl)
    x, y, loss = _forward_tensors(spec, wl, torch_mod)
    assert est.inputs == x.nbytes + y.nbytes
    measured = _measured(spec, wl)
    assert measured.saved_after_forward_bytes == est.activations + est.autocast_copies + est.inputs + loss.nbytes


# --- pure python: how the peak moves --------------------------------------------------------


def vit_b(image=224, patch=16, **workload):
    spec, _ = make_model_spec("vit-b", image=image, patch=patch)
    return spec, make_workload(**workload)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_peak_grows_with_batch(device, mode):
    spec = tiny()
    peaks = [estimate_memory(spec, cpu_workload(device=device, mode=mode, batch=b)).peak for b in range(1, 17)]
    assert all(a < b for a, b in zip(peaks, peaks[1:]))


def test_weights_and_states_do_not_grow_with_batch():
    spec = tiny()
    one, eight = (estimate_memory(spec, cpu_workload(batch=b)) for b in (1, 8))
    assert (one.weights, one.gradients, one.optimizer_states) == (eight.weights, eight.gradients, eight.optimizer_states)
    # the input batch is affine in the batch: 3*64*64 fp32 pixels + one int64 label per image
    assert eight.inputs == 8 * (3 * 64 * 64 * 4 + 8)


def test_weights_gradients_states_worked_example():
    # tiny ViT: 151,114 parameters (all fp32 = 604,456 bytes); AdamW keeps exp_avg and
    # exp_avg_sq (2 x 604,456) plus a 4-byte CPU step counter per tensor: 32 tensors
    # (class token, position, conv weight and bias; 12 per block x 2; final norm 2; head 2)
    spec = tiny()
    est = estimate_memory(spec, cpu_workload())
    assert est.weights == 604_456
    assert est.gradients == 604_456
    assert est.optimizer_states == 2 * 604_456 + 4 * 32 == 1_209_040
    assert estimate_memory(spec, cpu_workload(optimizer="sgd-momentum")).optimizer_states == 604_456
    assert estimate_memory(spec, cpu_workload(optimizer="sgd")).optimizer_states == 0
    # on CUDA the step counters do not live on the GPU, and every tensor rounds up to 512 bytes
    cuda = estimate_memory(spec, cpu_workload(device="cuda"))
    assert cuda.optimizer_states == 2 * cuda.weights


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_eager_attention_beats_sdpa_at_large_n(device):
    # ViT-B, 384 px, patch 8: N = 48*48 + 1 = 2305 tokens, batch 8, amp-bf16
    spec, sdpa = vit_b(384, 8, device=device)
    eager = sdpa.model_copy(update={"attention": "eager"})
    e, s = estimate_memory(spec, eager), estimate_memory(spec, sdpa)
    assert e.peak > s.peak
    if device == "cpu":
        # per block eager saves the bf16 probabilities (B, H, N, N) where sdpa saves the fp32
        # log-sum-exp (B, H, N); the q/k/v copies eager saves weigh what sdpa's qkv output does:
        # 12 * (8*12*2305^2*2 - 8*12*2305*4) = 12 * (1,020,100,800 - 885,120)
        assert e.activations - s.activations == 12 * (1_020_100_800 - 885_120)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_checkpointing_reduces_activations_and_peak(device):
    spec, plain = vit_b(384, 16, device=device)
    ck = plain.model_copy(update={"checkpointing": "full"})
    p, c = estimate_memory(spec, plain), estimate_memory(spec, ck)
    assert c.activations < p.activations
    assert c.peak < p.peak
    assert (c.weights, c.gradients, c.optimizer_states) == (p.weights, p.gradients, p.optimizer_states)
    # a checkpointed block saves its input and nothing else: every in-block component is empty
    inside = [k for k in c.saved_by_component if k.startswith("blocks/") and k != "blocks/residual"]
    assert inside and all(c.saved_by_component[k] == 0 for k in inside)
    assert all(p.saved_by_component[k] > 0 for k in inside)
    # 12 block inputs of the (8, 577, 768) fp32 residual stream, 14,180,352 bytes each: the first
    # is the patch embedding's output, saved with autocast's bf16 copy of the image (the conv's
    # input, 8*3*384*384*2 = 7,077,888 bytes); the other 11 are the residual stream
    assert c.saved_by_component["blocks/residual"] == 11 * 8 * 577 * 768 * 4
    assert c.saved_by_component["patch_embed"] == 8 * 577 * 768 * 4 + 8 * 3 * 384 * 384 * 2


def test_checkpointing_saves_only_block_inputs_worked_example():
    # tiny, fp32, batch 2, depth 2: one (B, N, D) tensor = 2*17*64*4 = 8,704 bytes
    # saved: the 2 block inputs + final norm input + its output (the head's class-token row keeps
    # it alive) = 4 * 8,704; norm mean and rstd 2 * 2*17*4 = 272; log-softmax 2*10*4 = 80;
    # cross-entropy's total_weight 4  -> 35,172
    est = estimate_memory(tiny(), cpu_workload(checkpointing="full"))
    assert est.activations == 4 * 8_704 + 272 + 80 + 4 == 35_172


def test_keep_grads_puts_every_gradient_in_the_peak():
    spec, wl = vit_b(224, 16, device="cpu", optimizer="sgd")
    kept = estimate_memory(spec, wl.model_copy(update={"keep_grads": True}))
    freed = estimate_memory(spec, wl)
    assert kept.at_peak["gradients"] == kept.gradients  # allocated before the step starts
    assert kept.peak > freed.peak
    # both peak at the same point of the last block's backward: what differs is the gradients
    # not yet formed there
    assert kept.peak_phase == freed.peak_phase
    assert kept.peak - freed.peak == freed.gradients - freed.at_peak["gradients"]


def test_keep_grads_means_nothing_for_inference():
    spec, wl = vit_b(224, 16, mode="infer")
    assert estimate_memory(spec, wl).peak == estimate_memory(spec, wl.model_copy(update={"keep_grads": True})).peak


def test_inference_has_no_gradients_states_or_saved_activations():
    spec, wl = vit_b(224, 16, mode="infer")
    est = estimate_memory(spec, wl)
    assert (est.gradients, est.optimizer_states, est.activations) == (0, 0, 0)
    assert est.at_peak["gradients"] == est.at_peak["optimizer"] == est.at_peak["temporaries"] == 0


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_at_peak_categories_add_up_to_the_peak(device):
    for wl in (cpu_workload(device=device), cpu_workload(device=device, mode="infer"),
               cpu_workload(device=device, precision="amp-bf16", attention="eager")):
        est = estimate_memory(tiny(depth=4), wl)
        assert set(est.at_peak) == set(CATEGORIES)
        assert sum(est.at_peak.values()) == est.peak
        assert max(replay_memory(tiny(depth=4), wl)[1]) == est.peak


def test_cuda_rules_round_every_tensor_to_512_bytes():
    # width 48: a LayerNorm weight or a bias of width 48 is 192 bytes, a 512-byte block on CUDA
    spec = tiny(dim=48, heads=2, mlp_hidden=96, depth=1)
    cpu = estimate_memory(spec, cpu_workload())
    cuda = estimate_memory(spec, cpu_workload(device="cuda"))
    assert cuda.weights % 512 == 0
    assert cuda.weights > cpu.weights
    assert cuda.peak % 512 == 0


# --- saved activations by component ----------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "amp-bf16"])
@pytest.mark.parametrize("checkpointing", ["none", "full"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4, 12])
def test_saved_by_component_sums_to_saved_total(depth, checkpointing, precision):
    """Every saved byte is in exactly one component. (Depth >= 3 is where the middle blocks,
    replayed as a lump, can fall out of the breakdown.)"""
    est = estimate_memory(tiny(depth=depth), cpu_workload(checkpointing=checkpointing, precision=precision))
    assert sum(est.saved_by_component.values()) == est.activations


@pytest.mark.parametrize("depth", [2, 3, 12])
def test_every_block_input_after_the_first_is_a_residual(depth):
    # tiny fp32 batch 2: each (B, N, D) block input is 2*17*64*4 = 8,704 bytes; block 0's input
    # is the patch embedding's output, the other depth-1 are the residual stream
    est = estimate_memory(tiny(depth=depth), cpu_workload())
    assert est.saved_by_component["patch_embed"] == 8_704
    assert est.saved_by_component["blocks/residual"] == (depth - 1) * 8_704


def test_saved_by_component_is_empty_for_inference():
    est = estimate_memory(tiny(), cpu_workload(mode="infer"))
    assert est.saved_by_component == {}
    assert est.activations == 0
