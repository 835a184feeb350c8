"""Step time: the kernel list against torch's FLOP counter, the engine's arithmetic on worked
examples, the time half of ``plan`` through the API and the CLI, its errors, and a fuzz of the
time flags.

Conventions checked against torch (``FlopCounterMode``, MACs = FLOPs / 2):

* a linear's bias and the loss are not counted (torch's counter counts matmuls and convs only);
* the patch embedding's backward computes the weight's gradient only (the image needs none):
  torch's counter reports ``aten.convolution_backward`` with the FLOPs of one forward conv, and
  the kernel list has one GEMM (the weight's) for it;
* SDPA's backward is counted as four matmuls of the forward's size (torch's ``sdpa_backward``
  count), although the fused kernel runs five: ``model_macs`` scales the FLASH backward by 4/5;
* a checkpoint's recompute is counted by torch but not in ``model_macs``: it is checked apart.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import vitcost
from vitcost import formulas, kernels
from vitcost.errors import ConfigError, ProfileError
from vitcost.kernels import FLASH, GEMM, STREAM, Kernel, model_macs, step_kernels
from vitcost.measure import build_model, count_forward_macs, count_macs
from vitcost.memory import shapes_of
from vitcost.profiles import load_profile
from vitcost.specs import make_spec, make_workload
from vitcost.timing import Rates, allreduce_seconds, kernel_seconds, run_cost, step_time, tile_utilisation

from conftest import REPO
from test_cli import invoke, ok, table_rows, words
from test_fuzz import HF_CONFIGS, assert_clean

# --- the kernel list against torch -------------------------------------------------------------

# dim 64, depth 2, two heads of 32, MLP 256, image 32, patch 8: (32/8)^2 = 16 patches (+1 class token)
SMALL = dict(dim=64, depth=2, heads=2, mlp_hidden=256, patch=8, image_h=32, image_w=32, classes=10)
VARIANTS = {
    "class-token": {},
    "avg-pool": dict(class_token=False, pooling="avg"),
    "layer-scale": dict(layer_scale=True),
    "avg-pool+layer-scale": dict(class_token=False, pooling="avg", layer_scale=True),
}
B = 3  # an odd batch: a per-image figure that is off by the batch shows


def small(**kw):
    return make_spec(**{**SMALL, **kw})


def kernel_list(spec, **wl):
    w = make_workload(**{"batch": B, "precision": "fp32", "attention": "eager", "device": "cpu", **wl})
    return step_kernels(spec, w, shapes_of(spec, w))


def torch_macs(spec, *, training: bool, attention: str = "eager", checkpointing: str = "none",
               device: str = "cpu", batch: int = B) -> tuple[int, dict]:
    """MACs of one step of the reference model at ``batch``, counted by torch (FLOPs / 2), and the
    counter's FLOPs by operator."""
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(spec, attention=attention, checkpointing=checkpointing)
        x = torch.randn(batch, spec.channels, spec.image_h, spec.image_w)
        y = torch.randint(0, spec.classes, (batch,))
    counter = FlopCounterMode(display=False)
    if training:
        model.train()
        with counter, torch.device(device):
            F.cross_entropy(model(x), y).backward()
    else:
        model.eval()
        with counter, torch.no_grad(), torch.device(device):
            model(x)
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return flops // 2, {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_training_step_macs_match_torch(variant):
    """One fp32 training step (forward + backward), eager attention, reference model, batch 3."""
    spec = small(**VARIANTS[variant])
    ks = kernel_list(spec)
    macs, by_op = torch_macs(spec, training=True)
    assert model_macs(ks) == macs
    # a second, independent source: the per-image formulas (3x a layer's forward, 2x the patch
    # embedding's), times the batch
    assert model_macs(ks) == B * sum(formulas.training_macs(formulas.mac_counts(spec)).values())
    # the patch embedding's backward: the weight's gradient only. Its conv is 16 patches x 64
    # outputs x (3 x 8 x 8 = 192) inputs per image = 196,608 MACs; torch counts the backward at
    # exactly one forward's FLOPs (no input gradient), and so does the kernel list
    conv = B * 16 * 64 * 192
    assert by_op["aten.convolution"] == 2 * conv
    assert by_op["aten.convolution_backward"] == 2 * conv
    embed_bwd = [k for k in ks if k.name == "patch_embed" and k.phase == "backward" and k.kind == GEMM]
    assert [(k.m, k.n, k.k, k.macs) for k in embed_bwd] == [(64, 192, B * 16, conv)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_inference_forward_macs_match_torch(variant):
    spec = small(**VARIANTS[variant])
    ks = kernel_list(spec, mode="infer")
    macs, _ = torch_macs(spec, training=False)
    assert model_macs(ks) == macs
    # and the repo's own counter (batch 1, meta device) per image
    assert model_macs(ks) == B * count_forward_macs(spec, attention="eager")
    assert {k.phase for k in ks} == {"forward"}


def test_worked_macs_of_the_small_model():
    """The class-token variant by hand, per image: N = 17, D = 64, F = 256, head dim 32.
    patch embedding 16 x 192 x 64 = 196,608; per block qkv 17 x 64 x 192 = 208,896, q k^T and
    attn v 2 heads x 17^2 x 32 x 2 = 36,992, proj 17 x 64 x 64 = 69,632, fc1 + fc2
    2 x 17 x 64 x 256 = 557,056: 872,576 a block, 1,745,152 for two; head 64 x 10 = 640.
    Forward 196,608 + 1,745,152 + 640 = 1,942,400; training 3 x (1,745,152 + 640) + 2 x 196,608
    = 5,630,592 per image."""
    spec = small()
    assert model_macs(kernel_list(spec, mode="infer")) == B * 1_942_400
    assert model_macs(kernel_list(spec)) == B * 5_630_592


def test_sdpa_counts_like_torchs_sdpa_on_meta():
    """On the meta device torch's counter gives SDPA its matmuls: forward 2, backward 4 products
    of N^2 x head dim per head. The FLASH kernel's backward runs 5 (the scores recomputed);
    ``model_macs`` counts 4 of them, as torch does."""
    spec = small(layer_scale=True)
    ks = kernel_list(spec, attention="sdpa")
    with torch.device("meta"):
        model = build_model(spec, attention="sdpa")
    counted = count_macs(model, spec, training=True)  # batch 1
    assert model_macs(ks) == B * counted.training_macs
    flash_bwd = [k for k in ks if k.kind == FLASH and k.phase == "backward"]
    # 2 heads x 17^2 x 32 x 5 = 92,480 per image, times the batch
    assert [k.macs for k in flash_bwd] == [B * 2 * 17 * 17 * 32 * 5]
    assert model_macs(ks) == model_macs(kernel_list(spec))  # the same model FLOPs as eager


@pytest.mark.parametrize("variant", ["class-token", "layer-scale"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_recompute_macs_match_torchs_checkpoint(variant, attention):
    """Full checkpointing: torch counts the blocks' forward again; the kernel list's "recompute"
    phase holds exactly those MACs (fc2 rerun only with LayerScale), and ``model_macs`` leaves
    them out."""
    spec = small(**VARIANTS[variant])
    ks = kernel_list(spec, attention=attention, checkpointing="full")
    plain, _ = torch_macs(spec, training=True, attention=attention, device="meta")
    checkpointed, _ = torch_macs(spec, training=True, attention=attention, checkpointing="full", device="meta")
    recompute = sum(k.macs * k.count for k in ks if k.phase == "recompute")
    assert recompute == checkpointed - plain
    # per block and image: qkv 208,896 + attention 36,992 + proj 69,632 + fc1 278,528 = 594,048
    # (+ fc2 278,528 = 872,576 with LayerScale), two blocks
    per_image = 2 * (872_576 if spec.layer_scale else 594_048)
    assert recompute == B * per_image
    assert model_macs(ks) == plain


def test_macs_do_not_depend_on_precision_or_device():
    spec = small()
    fp32 = model_macs(kernel_list(spec))
    assert model_macs(kernel_list(spec, precision="amp-bf16", device="cuda")) == fp32
    assert model_macs(kernel_list(spec, precision="bf16", device="cuda")) == fp32


# --- the engine, on worked examples ------------------------------------------------------------


def rates(**kw) -> Rates:
    """100 TFLOP/s at half efficiency (50 TFLOP/s for matmuls), attention at a quarter (25),
    1 TB/s, 2 us a launch on the device, 10 on the host, 8 units, 128-wide tiles."""
    base = dict(matmul_flops_per_s=100e12, matmul_efficiency=0.5, attention_efficiency=0.25,
                memory_bytes_per_s=1e12, kernel_seconds=2e-6, host_seconds=10e-6, compute_units=8,
                tile=128, attention_tile=128, asynchronous=True)
    return Rates(**{**base, **kw})


def gemm(m, n, k, bytes_, batch=1, **kw) -> Kernel:
    return Kernel("g", kw.pop("phase", "forward"), kw.pop("group", "matmul"), GEMM, bytes_, macs=batch * m * n * k,
                  m=m, n=n, k=k, batch=batch, **kw)


def stream(bytes_, phase="forward", group="memory", **kw) -> Kernel:
    return Kernel("s", phase, group, STREAM, bytes_, **kw)


@pytest.mark.parametrize("m, n, k, batch, units, expected", [
    # whole tiles, whole waves: 2 x 4 = 8 tiles on 8 units, one wave
    (256, 512, 64, 1, 8, 1.0),
    # 8 x 8 = 64 tiles on 8 units: 8 full waves
    (1024, 1024, 1024, 1, 8, 1.0),
    # 197 x 197 in 128-tiles: ceil(197/128) = 2 tiles a side, 4 tiles of which 197^2 / 256^2 is
    # useful; 27 of them: 108 tiles, one full wave on 108 units
    (197, 197, 64, 27, 108, (197 * 197) / (256 * 256)),
    # the same map once (an attention head's q k^T, head dim 64): 4 tiles on 108 units, and k = 64
    # is under 2 tiles (256) so no split-K: 4 of 108 units busy
    (197, 197, 64, 1, 108, (197 * 197) / (256 * 256) * 4 / 108),
    # a partial last wave: 10 x 1 tiles on 8 units take 2 waves, 10 of 16 slots used
    (1280, 128, 64, 1, 8, 10 / 16),
    # split-K: one tile, k = 4096 cut into min(ceil(8/1) = 8, 4096 // 256 = 16) = 8 pieces: every unit busy
    (128, 128, 4096, 1, 8, 1.0),
    # split-K limited by the reduction: k = 512 gives 512 // 256 = 2 pieces, 2 of 8 units
    (128, 128, 512, 1, 8, 2 / 8),
    # k = 255 is under two tiles: no split, 1 of 8 units
    (128, 128, 255, 1, 8, 1 / 8),
])
def test_tile_utilisation(m, n, k, batch, units, expected):
    assert tile_utilisation(m, n, k, batch, rates(compute_units=units)) == pytest.approx(expected, rel=1e-12)


def test_tile_utilisation_off_without_a_tile():
    assert tile_utilisation(197, 197, 64, 1, rates(tile=0)) == 1.0
    assert tile_utilisation(197, 197, 64, 1, rates(compute_units=0)) == 1.0


def test_kernel_seconds_compute_bound_gemm():
    """1024^3 MACs = 2^31 FLOPs at 100 TFLOP/s x 0.5, 64 whole tiles in 8 waves (utilisation 1):
    2^31 / 5e13 = 42.95 us; its bf16 bytes 3 x 1024^2 x 2 = 6,291,456 take 6.3 us at 1 TB/s."""
    kern = gemm(1024, 1024, 1024, 3 * 1024 * 1024 * 2)
    assert kernel_seconds(kern, rates()) == pytest.approx(2**31 / 5e13, rel=1e-12)


def test_kernel_seconds_memory_bound_gemm():
    """1024 x 128 x 128 in fp32: 2 x 16,777,216 FLOPs / 5e13 = 0.67 us, but it moves
    4 x (1024 x 128 + 128 x 128 + 1024 x 128) = 1,114,112 bytes: 1.114 us at 1 TB/s."""
    kern = gemm(1024, 128, 128, 4 * (1024 * 128 + 128 * 128 + 1024 * 128))
    assert 2 * kern.macs / 5e13 < 1.114112e-6
    assert kernel_seconds(kern, rates()) == pytest.approx(1.114112e-6, rel=1e-12)


def test_kernel_seconds_takes_the_tile_utilisation():
    """1280 x 128 x 1024: 10 tiles on 8 units (10/16 used) -> 2 x 167,772,160 FLOPs at
    5e13 x 0.625 = 3.125e13 FLOP/s = 10.74 us."""
    kern = gemm(1280, 128, 1024, 2 * (1280 * 1024 + 1024 * 128 + 1280 * 128))
    assert kernel_seconds(kern, rates()) == pytest.approx(2 * 167_772_160 / 3.125e13, rel=1e-12)


def test_flash_kernel_pads_the_sequence_to_its_tile():
    """One head of 197 tokens, head dim 64, forward (2 products): 197^2 x 64 x 2 = 4,967,552
    MACs; padded to 256 tokens the kernel does (256/197)^2 times that = 256^2 x 128 = 8,388,608
    MACs, at 100 TFLOP/s x 0.25 attention efficiency: 2 x 8,388,608 / 2.5e13 = 0.671 us."""
    macs = 197 * 197 * 64 * 2
    kern = Kernel("a", "forward", "attention", FLASH, 1000, macs=macs, tokens=197)
    assert kernel_seconds(kern, rates()) == pytest.approx(2 * 256 * 256 * 128 / 2.5e13, rel=1e-12)
    assert kernel_seconds(kern, rates()) == pytest.approx(2 * macs * (256 / 197) ** 2 / 2.5e13, rel=1e-12)
    # no padding without a tile, nor when the tokens fill whole tiles
    assert kernel_seconds(kern, rates(attention_tile=0)) == pytest.approx(2 * macs / 2.5e13, rel=1e-12)
    full = Kernel("a", "forward", "attention", FLASH, 1000, macs=256 * 256 * 128, tokens=256)
    assert kernel_seconds(full, rates()) == pytest.approx(2 * 256 * 256 * 128 / 2.5e13, rel=1e-12)


def test_stream_kernel_moves_its_bytes():
    assert kernel_seconds(stream(3_000_000), rates()) == pytest.approx(3e-6, rel=1e-12)  # 3 MB at 1 TB/s


def test_allreduce_ring():
    """1 GB over 8 GPUs at 100 GB/s bus bandwidth: 2 x 7/8 x 1e9 / 1e11 = 17.5 ms; over 2 GPUs
    2 x 1/2 = 1 pass: 10 ms; one GPU, or no link: nothing."""
    link = dict(allreduce_bytes_per_s=100e9)
    assert allreduce_seconds(10**9, rates(gpus=8, **link)) == pytest.approx(0.0175, rel=1e-12)
    assert allreduce_seconds(10**9, rates(gpus=2, **link)) == pytest.approx(0.010, rel=1e-12)
    assert allreduce_seconds(10**9, rates(gpus=1, **link)) == 0.0
    assert allreduce_seconds(10**9, rates(gpus=8)) == 0.0


# 1 MB forward three times (3 us) and 2 MB backward once in two launches (2 us): 5 launches
TWO_KERNELS = (stream(1_000_000, count=3), stream(2_000_000, phase="backward", group="attention", launches=2))


def test_step_time_host_bound_asynchronous():
    """Device: 5 us of work + 5 launches x 2 us = 15 us; host: 5 x 10 us = 50 us. The host runs
    ahead, so the step is the host's 50 us: launch part 10 us + (50 - 15) us = 45 us."""
    st_ = step_time(TWO_KERNELS, rates())
    assert st_.launches == 5
    assert st_.device_seconds == pytest.approx(15e-6, rel=1e-12)
    assert st_.host_seconds == pytest.approx(50e-6, rel=1e-12)
    assert st_.breakdown_seconds["launch"] == pytest.approx(45e-6, rel=1e-12)
    assert st_.step_seconds == pytest.approx(50e-6, rel=1e-12)
    assert st_.breakdown_seconds["memory"] == pytest.approx(3e-6, rel=1e-12)
    assert st_.breakdown_seconds["attention"] == pytest.approx(2e-6, rel=1e-12)
    assert st_.phase_seconds == pytest.approx({"forward": 3e-6, "backward": 2e-6}, rel=1e-12)
    assert sum(st_.breakdown_seconds.values()) == pytest.approx(st_.step_seconds, rel=1e-12)


def test_step_time_synchronous_host_adds():
    """On a CPU the host's 50 us and the device's 15 us add: 65 us (launch part 10 + 50)."""
    st_ = step_time(TWO_KERNELS, rates(asynchronous=False))
    assert st_.breakdown_seconds["launch"] == pytest.approx(60e-6, rel=1e-12)
    assert st_.step_seconds == pytest.approx(65e-6, rel=1e-12)


def test_step_time_device_bound_asynchronous():
    """1 GB at 1 TB/s = 1 ms, one launch: the host's 10 us hides behind it; the step is
    1 ms + 2 us of device launch."""
    st_ = step_time((stream(10**9),), rates())
    assert st_.breakdown_seconds["launch"] == pytest.approx(2e-6, rel=1e-12)
    assert st_.step_seconds == pytest.approx(1.002e-3, rel=1e-12)


LAST_BUCKET = 25 * 2**20 * 2 * 7 / 8 / 100e9  # 26,214,400 B x 1.75 / 1e11 = 458.752 us


@pytest.mark.parametrize("grads, backward_bytes, phase, communication", [
    # 1 GB all-reduce: 17.5 ms against 2 us of backward: 17.5 ms - 2 us is exposed
    (10**9, 2_000_000, "backward", 0.0175 - 2e-6),
    # 100 MB: 1.75 ms, hidden behind 10 ms of backward but for the last 25 MiB bucket
    (10**8, 10**10, "backward", LAST_BUCKET),
    # the recompute of a checkpoint runs in backward too: it hides the all-reduce as well
    (10**8, 10**10, "recompute", LAST_BUCKET),
    # 1 MB, smaller than a bucket: all of it (1e6 x 1.75 / 1e11 = 17.5 us) waits for backward's end
    (10**6, 10**10, "backward", 17.5e-6),
])
def test_step_time_allreduce_overlap(grads, backward_bytes, phase, communication):
    ks = (stream(1_000_000), stream(backward_bytes, phase=phase))
    r = rates(gpus=8, allreduce_bytes_per_s=100e9)
    st_ = step_time(ks, r, grad_bytes=grads)
    assert st_.allreduce_seconds == pytest.approx(grads * 1.75 / 1e11, rel=1e-12)
    assert st_.breakdown_seconds["communication"] == pytest.approx(communication, rel=1e-9)
    assert sum(st_.breakdown_seconds.values()) == pytest.approx(st_.step_seconds, rel=1e-12)
    # one GPU: no all-reduce at all
    assert step_time(ks, rates(), grad_bytes=grads).breakdown_seconds["communication"] == 0.0


def test_run_cost_imagenet():
    """ImageNet-1k (1,281,167 images) at a global batch of 1,024: ceil(1,251.14) = 1,252 steps an
    epoch, x 300 = 375,600 steps; at 0.5 s: 187,800 s; x 8 GPUs / 3600 = 417.33 GPU-hours; at
    2 an hour 834.67."""
    run = run_cost(0.5, 1024, 8, 300, 1_281_167, 2.0)
    assert run.steps == 375_600
    assert run.run_seconds == pytest.approx(187_800, rel=1e-12)
    assert run.run_gpu_hours == pytest.approx(187_800 * 8 / 3600, rel=1e-12)
    assert run.run_cost == pytest.approx(2 * 187_800 * 8 / 3600, rel=1e-12)
    assert run_cost(0.5, 1024, 8, 300, 1_281_167).run_cost is None


def test_run_cost_fractional_epochs():
    """1,001 samples at batch 2: ceil(500.5) = 501 steps an epoch (the last batch partial);
    1.5 epochs: ceil(751.5) = 752 steps."""
    assert run_cost(1.0, 2, 1, 1.5, 1001).steps == 752
    assert run_cost(1.0, 2, 1, 1, 1001).steps == 501


def test_run_cost_exact_fractional_epochs():
    """100 samples at batch 1 for 1.1 epochs: 100 x 1.1 = 110 steps (10 x 0.3 = 3, likewise)."""
    assert run_cost(1.0, 1, 1, 1.1, 100).steps == 110
    assert run_cost(1.0, 1, 1, 0.7, 100).steps == 70


# --- the time half through the API and the CLI -------------------------------------------------

A100_BF16 = 312e12  # a100-80gb: dense bf16 peak


@pytest.fixture(scope="module")
def vit_b():
    """vit-b at 224, batch 8, amp-bf16, sdpa, AdamW on one A100."""
    return vitcost.plan("vit-b", gpu="a100")


def test_plan_prices_a_training_step(vit_b):
    t = vit_b.time
    assert vit_b.time_reason is None
    assert t.step_seconds > 0
    assert t.samples_per_s == pytest.approx(8 / t.step_seconds, rel=1e-12)
    # model FLOPs: 2 x the per-image training MACs of the formulas x the batch of 8
    assert t.model_flops_per_step == 2 * 8 * vit_b.macs_training_per_image
    assert t.matmul_dtype == "bf16" and t.peak_flops_per_s == A100_BF16
    assert t.mfu == pytest.approx(t.model_flops_per_step / t.step_seconds / A100_BF16, rel=1e-12)
    assert 0 < t.mfu < 1
    parts = t.step.breakdown_seconds
    assert sum(parts.values()) == pytest.approx(t.step_seconds, rel=1e-12)
    # the phases are the work; launches and communication the rest
    assert sum(t.step.phase_seconds.values()) + parts["launch"] + parts["communication"] == pytest.approx(
        t.step_seconds, rel=1e-12)
    assert set(t.step.phase_seconds) == {"forward", "backward", "optimizer"}
    assert parts["communication"] == 0.0 and t.step.allreduce_seconds == 0.0
    d = vit_b.to_dict()["time"]
    assert d["step_seconds"] == t.step_seconds and d["model_flops_per_step"] == t.model_flops_per_step
    assert d["steps"] is None and d["run_cost"] is None


@pytest.mark.parametrize("gpu, kw", [
    ("a100", dict(batch=1)),  # batch 1: a kernel list of its own
    ("a100", dict(batch=1, attention="eager")),
    ("a100", dict(batch=2, attention="eager")),
    ("a100", dict(batch=5)),
    ("a100", dict(batch=8, attention="eager", image=384)),
    ("a100", dict(batch=4, layer_scale=True, checkpointing="full")),
    ("a100", dict(batch=7, mode="infer")),
    ("a100", dict(batch=3, precision="fp32", tf32=True)),
    ("a100", dict(batch=6, impl="hf", attention="eager-postscale")),
    ("8xa100", dict(batch=64)),
    ("rtx3090", dict(batch=33, precision="amp-fp16", optimizer="sgd-momentum", keep_grads=True)),
])
def test_plan_prices_the_whole_kernel_list(gpu, kw):
    """Whatever shortcut ``plan`` takes (kernels as lines in the batch, memory-bound kernels
    merged), its step is the engine's price of every kernel of ``step_kernels`` at that batch,
    with one GPU's gradients all-reduced on a multi-GPU profile."""
    tf32 = kw.pop("tf32", False)
    report = vitcost.plan("vit-b", gpu=gpu, tf32=tf32, **kw)
    t, spec, wl = report.time, report.spec, report.workload
    rates = load_profile(gpu).profile.rates(t.matmul_dtype)
    ks = step_kernels(spec, wl, shapes_of(spec, wl))
    grads = 4 * report.params_total if wl.training and rates.gpus > 1 else 0  # fp32 parameters' gradients
    direct = step_time(ks, rates, grad_bytes=grads)
    assert t.step_seconds == pytest.approx(direct.step_seconds, rel=1e-9)
    assert t.step.launches == direct.launches
    assert t.step.breakdown_seconds == pytest.approx(direct.breakdown_seconds, rel=1e-9, abs=1e-15)
    assert t.step.phase_seconds == pytest.approx(direct.phase_seconds, rel=1e-9, abs=1e-15)
    assert t.step.allreduce_seconds == pytest.approx(direct.allreduce_seconds, rel=1e-12)
    assert t.model_flops_per_step == 2 * model_macs(ks)


def test_training_is_slower_than_inference(vit_b):
    infer = vitcost.plan("vit-b", gpu="a100", mode="infer").time
    assert infer.step_seconds < vit_b.time.step_seconds
    assert set(infer.step.phase_seconds) == {"forward"}
    assert infer.model_flops_per_step == 2 * 8 * vitcost.plan("vit-b", mode="infer").macs_forward_per_image


def test_sdpa_is_faster_than_eager_at_384():
    """577 tokens: the eager maps (12 heads x 577^2 per image) go through memory, the fused kernel's do not."""
    sdpa = vitcost.plan("vit-b", image=384, gpu="a100").time
    eager = vitcost.plan("vit-b", image=384, gpu="a100", attention="eager").time
    assert sdpa.step_seconds < eager.step_seconds
    assert sdpa.step.breakdown_seconds["attention"] < eager.step.breakdown_seconds["attention"]
    assert sdpa.model_flops_per_step == eager.model_flops_per_step  # same model FLOPs either way


def test_tf32_speeds_up_fp32_on_a100():
    """fp32 matmuls at 19.5 TFLOP/s, or with --tf32 at 156: the matmul part shrinks 8x where
    compute-bound, and the MFU is taken over the TF32 peak."""
    plain = vitcost.plan("vit-b", gpu="a100", precision="fp32").time
    tf32 = vitcost.plan("vit-b", gpu="a100", precision="fp32", tf32=True).time
    assert (plain.matmul_dtype, plain.peak_flops_per_s) == ("fp32", 19.5e12)
    assert (tf32.matmul_dtype, tf32.peak_flops_per_s) == ("tf32", 156e12)
    assert tf32.step_seconds < plain.step_seconds
    assert tf32.step.breakdown_seconds["matmul"] < plain.step.breakdown_seconds["matmul"] / 4
    assert tf32.step.breakdown_seconds["memory"] == plain.step.breakdown_seconds["memory"]
    assert tf32.model_flops_per_step == plain.model_flops_per_step
    # autocast runs its matmuls in bf16 whatever --tf32 says
    assert vitcost.plan("vit-b", gpu="a100", tf32=True).time.matmul_dtype == "bf16"


def test_eight_a100s_add_the_allreduce(vit_b):
    """Global batch 64 on 8 GPUs: each runs vit-b's batch of 8, then all-reduces 86,567,656 fp32
    gradients (346,270,624 bytes) at 235 GB/s: x 2 x 7/8 / 235e9 = 2.58 ms, hidden behind
    backward but for the last 25 MiB bucket (26,214,400 x 1.75 / 235e9 = 0.195 ms)."""
    report = vitcost.plan("vit-b", gpu="8xa100", batch=64)
    t = report.time
    assert t.gpus == 8 and report.workload.batch == 8
    assert t.step.allreduce_seconds == pytest.approx(86_567_656 * 4 * 1.75 / 235e9, rel=1e-12)
    backward = t.step.phase_seconds["backward"]
    comm = t.step.breakdown_seconds["communication"]
    assert comm >= 0
    assert comm == pytest.approx(max(t.step.allreduce_seconds - backward, 25 * 2**20 * 1.75 / 235e9), rel=1e-9)
    # the same per-GPU work as one A100 at batch 8, plus what the all-reduce leaves exposed
    assert t.step_seconds == pytest.approx(vit_b.time.step_seconds + comm, rel=1e-9)
    assert t.samples_per_s == pytest.approx(64 / t.step_seconds, rel=1e-12)
    assert t.model_flops_per_step == vit_b.time.model_flops_per_step  # per GPU
    d = report.to_dict()["time"]
    assert d["allreduce_seconds"] > 0 and d["allreduce_overlapped_with_backward"] is True
    # inference: no gradients, nothing to all-reduce
    infer = vitcost.plan("vit-b", gpu="8xa100", batch=64, mode="infer").time
    assert infer.step.allreduce_seconds == 0.0 and infer.step.breakdown_seconds["communication"] == 0.0


def test_full_checkpointing_adds_a_recompute_phase(vit_b):
    ckpt = vitcost.plan("vit-b", gpu="a100", checkpointing="full").time
    assert "recompute" in ckpt.step.phase_seconds and "recompute" not in vit_b.time.step.phase_seconds
    assert ckpt.step.phase_seconds["recompute"] > 0
    assert ckpt.step_seconds > vit_b.time.step_seconds
    # the recompute is not model FLOPs: the same FLOPs in a longer step, a lower MFU
    assert ckpt.model_flops_per_step == vit_b.time.model_flops_per_step
    assert ckpt.mfu < vit_b.time.mfu


def test_cli_run_cost():
    """vitcost plan --gpu a100 --epochs 300 --dataset-size 1281167 --price-per-gpu-hour 2:
    batch 8: ceil(1,281,167 / 8) = ceil(160,145.875) = 160,146 steps an epoch, x 300 = 48,043,800."""
    args = ["plan", "--gpu", "a100", "--epochs", "300", "--dataset-size", "1281167", "--price-per-gpu-hour", "2"]
    step = vitcost.plan("vit-b", gpu="a100").time.step_seconds
    hours = 48_043_800 * step / 3600
    d = json.loads(ok(*args, "--json").stdout)["time"]
    assert d["steps"] == 48_043_800
    assert d["epochs"] == 300 and d["dataset_size"] == 1_281_167 and d["price_per_gpu_hour"] == 2
    assert d["run_seconds"] == pytest.approx(48_043_800 * step, rel=1e-12)
    assert d["run_gpu_hours"] == pytest.approx(hours, rel=1e-12)
    assert d["run_cost"] == pytest.approx(2 * hours, rel=1e-12)
    out = words(ok(*args).stdout)
    assert "run: 300 epochs x 1,281,167 samples = 48,043,800 steps" in out
    assert f"{hours:,.1f} GPU-hours, cost {2 * hours:,.2f} at 2 per GPU-hour" in out
    assert "where the time goes (per GPU)" in out
    # the breakdown table has no column bars (box.SIMPLE_HEAD): its rows split on whitespace
    rows = [line.split() for line in ok(*args).stdout.splitlines()]
    assert ["step", f"{step * 1e3:,.2f}", "100.0%"] in rows


def test_cli_tf32_flag():
    base = ["plan", "--gpu", "a100", "--precision", "fp32", "--json"]
    plain = json.loads(ok(*base).stdout)["time"]
    tf32 = json.loads(ok(*base, "--tf32").stdout)["time"]
    assert (plain["matmul_dtype"], tf32["matmul_dtype"]) == ("fp32", "tf32")
    assert (plain["peak_flops_per_s"], tf32["peak_flops_per_s"]) == (19.5e12, 156e12)
    assert tf32["step_seconds"] < plain["step_seconds"]


def test_compare_time_table():
    """compare's second table: ms/step, samples/s and MFU of each row, as plan gives them."""
    out = ok("compare", "--image", "224,384", "--gpu", "a100").stdout
    assert "time per step on NVIDIA A100 80GB SXM4" in out
    rows = [r for r in table_rows(out.split("time per step on", 1)[1]) if r[0] in ("224", "384")]
    assert [r[0] for r in rows] == ["224", "384"]
    for row in rows:
        t = vitcost.plan("vit-b", image=int(row[0]), gpu="a100").time
        assert row[2:5] == [f"{t.step_seconds * 1e3:,.1f}", f"{t.samples_per_s:,.0f}", f"{t.mfu:.0%}"]


# --- bad input ------------------------------------------------------------------------------------


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, (result.exit_code, result.stdout[-300:], result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


RUN = ["--epochs", "5", "--dataset-size", "1000"]


@pytest.mark.parametrize("args, needles", [
    (["--epochs", "0", "--dataset-size", "1000"], ["--epochs 0", "greater than 0"]),
    (["--epochs", "-1", "--dataset-size", "1000"], ["--epochs -1", "greater than 0"]),
    (["--epochs", "0"], ["--epochs 0", "greater than 0"]),
    (["--epochs", "nan", "--dataset-size", "1000"], ["--epochs nan"]),
    (["--epochs", "inf", "--dataset-size", "1000"], ["--epochs inf"]),
    (["--epochs", "5", "--dataset-size", "0"], ["--dataset-size 0", "greater than 0"]),
    (["--epochs", "5", "--dataset-size", "-7"], ["--dataset-size -7"]),
    (RUN + ["--price-per-gpu-hour", "0"], ["--price-per-gpu-hour 0", "greater than 0"]),
    (RUN + ["--price-per-gpu-hour", "-3"], ["--price-per-gpu-hour -3", "greater than 0"]),
    (["--epochs", "5"], ["--epochs and --dataset-size go together"]),
    (["--dataset-size", "1000"], ["--epochs and --dataset-size go together"]),
    (["--price-per-gpu-hour", "2"], ["--price-per-gpu-hour prices a run"]),
    (["--epochs", "5", "--price-per-gpu-hour", "2"], ["--epochs and --dataset-size go together"]),
])
@pytest.mark.parametrize("gpu", [[], ["--gpu", "a100"]])
def test_bad_time_flags_are_one_line(args, needles, gpu):
    """Refused whether or not a profile is given (the flags are checked before anything runs)."""
    one_line_error(invoke("plan", "--model", "vit-ti", *gpu, *args), *needles)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(epochs=0, dataset_size=10), "--epochs 0"),
    (dict(epochs=True, dataset_size=10), "--epochs True"),
    (dict(epochs="5", dataset_size=10), "--epochs 5"),
    (dict(epochs=1, dataset_size=2.5), "--dataset-size 2.5: a whole number"),
    (dict(epochs=1, dataset_size=10, price_per_gpu_hour=float("inf")), "--price-per-gpu-hour inf"),
    (dict(epochs=1), "go together"),
    (dict(price_per_gpu_hour=1.0), "prices a run"),
])
def test_bad_time_options_in_the_api(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        vitcost.plan("vit-ti", gpu="a100", **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_huge_epochs_are_not_a_traceback():
    """Found by the fuzz: 1e308 epochs overflowed the step count to infinity (a traceback);
    figures past any run (1e6 epochs, 1e15 samples, 1e9 per GPU-hour) are refused in one line."""
    result = invoke("plan", "--model", "vit-ti", "--gpu", "a100", "--epochs", "1e308", "--dataset-size", "100000")
    assert_clean(result, "huge epochs")
    assert result.exit_code == 1 and "--epochs 1e+308: must be a number greater than 0 and at most 1e+06" in result.stderr


def test_huge_dataset_size_is_not_a_traceback():
    result = invoke("plan", "--model", "vit-ti", "--epochs", "1", "--dataset-size", "1" + "0" * 400)
    assert_clean(result, "huge dataset size")
    assert result.exit_code == 1 and "--dataset-size (a huge number)" in result.stderr
    with pytest.raises(ConfigError):
        vitcost.plan("vit-ti", epochs=1, dataset_size=10**400)


def test_huge_run_cost_is_valid_json():
    result = invoke("plan", "--model", "vit-ti", "--gpu", "a100", "--epochs", "1e300", "--dataset-size", "1000000000",
                    "--price-per-gpu-hour", "1e300", "--json")
    assert_clean(result, "huge cost")
    if result.exit_code == 0:
        data = json.loads(result.stdout, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        assert math.isfinite(data["time"]["run_cost"])


# --- profiles without, or with a broken, time section ----------------------------------------------


def shipped(name: str = "a100-80gb") -> dict:
    return yaml.safe_load((REPO / "hardware_profiles" / f"{name}.yaml").read_text())


def write_profile(tmp_path: Path, data: dict, name: str = "card.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_profile_without_time_still_plans_memory(tmp_path):
    data = shipped()
    del data["time"]
    path = write_profile(tmp_path, data, "notime.yaml")
    d = json.loads(ok("plan", "--model", "vit-ti", "--gpu", path, "--json").stdout)
    ref = json.loads(ok("plan", "--model", "vit-ti", "--gpu", "a100", "--json").stdout)
    assert d["time"] is None
    assert "no 'time' section" in d["time_reason"] and "not priced" in d["time_reason"]
    assert ref["time"] is not None and ref["time_reason"] is None
    # the memory half is the shipped a100's, figure for figure
    assert d["memory_bytes"] == ref["memory_bytes"]
    assert (d["fits"], d["max_batch_size"]) == (ref["fits"], ref["max_batch_size"]) and d["fits"] is True
    out = words(ok("plan", "--model", "vit-ti", "--gpu", path).stdout)
    assert "time: not priced: profile notime has no 'time' section" in out
    assert "where the time goes" not in out
    # a run asked for on such a profile: still memory, no run
    d = json.loads(ok("plan", "--model", "vit-ti", "--gpu", path, *RUN, "--json").stdout)
    assert d["time"] is None and d["max_batch_size"] == ref["max_batch_size"]


def test_no_gpu_no_time():
    d = json.loads(ok("plan", "--model", "vit-ti", "--json").stdout)
    assert d["time"] is None and "--gpu" in d["time_reason"]
    assert "time:" not in ok("plan", "--model", "vit-ti").stdout


MAE = dict(mask_ratio=0.75, decoder_dim=32, decoder_depth=1, decoder_heads=2, decoder_mlp_hidden=128)


def test_mae_is_not_priced():
    report = vitcost.plan(dim=64, depth=2, heads=2, mlp_hidden=256, image=64, patch=16, impl="hf", classes=0,
                          mae=MAE, gpu="a100")
    assert report.time is None and "MAE" in report.time_reason and "not priced" in report.time_reason
    assert report.gpu is not None and report.gpu.fits and report.peak_bytes > 0
    spec = report.spec
    with pytest.raises(kernels.NotModelled, match="MAE"):
        step_kernels(spec, report.workload, shapes_of(spec, report.workload))


def test_mae_hf_config_through_the_cli(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HF_CONFIGS[2]))  # ViTMAEForPreTraining, D 64, two blocks
    d = json.loads(ok("plan", "--hf-config", str(path), "--gpu", "a100", "--json").stdout)
    assert d["time"] is None and "MAE" in d["time_reason"]
    assert d["memory_bytes"]["peak"] > 0 and d["fits"] is True
    assert "time: not priced: MAE" in words(ok("plan", "--hf-config", str(path), "--gpu", "a100").stdout)


@pytest.mark.parametrize("change, message", [
    (dict(memory_bandwidth_efficiency=2), "time.memory_bandwidth_efficiency: Input should be less than or equal to 1"),
    (dict(attention_efficiency=0), "time.attention_efficiency: Input should be greater than or equal to 0.01"),
    (dict(compute_units=0), "time.compute_units: Input should be greater than 0"),
    (dict(kernel_overhead_us=-1), "time.kernel_overhead_us: Input should be greater than or equal to 0"),
    (dict(compute_units=None), "missing key 'time.compute_units'"),
    (dict(kernel_overhead=2), "unknown key 'time.kernel_overhead' (did you mean 'kernel_overhead_us'?)"),
])
def test_broken_time_section_is_a_one_line_profile_error(tmp_path, change, message):
    data = copy.deepcopy(shipped())
    for key, value in change.items():
        if value is None:
            del data["time"][key]
        else:
            data["time"][key] = value
    path = write_profile(tmp_path, data)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert str(err.value) == f"profile {path}: {message}"
    one_line_error(invoke("plan", "--model", "vit-ti", "--gpu", path), message)


def test_profile_rates_from_the_time_section():
    """a100-80gb: 2,039 GB/s x 0.90 = 1,835.1 GB/s; 2 us and 10 us a launch; 108 SMs; one GPU
    on NVLink3 at 300 GB/s; 8xa100: the measured 235 GB/s bus bandwidth."""
    r = load_profile("a100").profile.rates("tf32")
    assert r.matmul_flops_per_s == 156e12 and r.matmul_efficiency == 0.87
    assert r.memory_bytes_per_s == pytest.approx(2039e9 * 0.90, rel=1e-12)
    assert (r.kernel_seconds, r.host_seconds) == pytest.approx((2e-6, 10e-6), rel=1e-12)
    assert (r.compute_units, r.tile, r.attention_tile, r.asynchronous, r.gpus) == (108, 128, 128, True, 1)
    r8 = load_profile("8xa100").profile.rates("bf16")
    assert (r8.gpus, r8.allreduce_bytes_per_s, r8.matmul_flops_per_s) == (8, 235e9, 312e12)


# --- fuzz ------------------------------------------------------------------------------------------

# Values for the time flags: strings that break parsers, plain numbers (up to float overflow and
# past it), random text.
TIME_WEIRD = ["", " ", "0", "-0", "-1", "1", "2.5", "1e-320", "1e40", "1e308", "1e309", "inf", "-inf", "nan", "NaN",
              "9" * 40, "9" * 400,
              "0x10", "1_000", "３", "1,000", "abc", "\x1b[31m", "True", "1e3", "300", "1281167"]
TIME_VALUES = st.one_of(
    st.sampled_from(TIME_WEIRD),
    st.integers(-5, 10**12).map(str),
    st.floats(min_value=-1e6, max_value=1.7e308).map(repr),  # nan and inf come as strings above
    st.text(max_size=6),
)
TIME_FLAGS = ["--epochs", "--dataset-size", "--price-per-gpu-hour"]


@st.composite
def time_command_lines(draw):
    args = ["plan", "--model", "vit-ti", "--image", "64"]
    for flag in draw(st.lists(st.sampled_from(TIME_FLAGS), max_size=3, unique=True)):
        args += [flag, draw(TIME_VALUES)]
    if draw(st.booleans()):
        args += ["--gpu", draw(st.sampled_from(["a100", "8xa100", "rtx3090"]))]
    args += draw(st.lists(st.sampled_from(["--tf32", "--json", "--mode=infer", "--precision=fp32"]), max_size=2,
                          unique=True))
    return args


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=time_command_lines())
def test_fuzzed_time_flags(args):
    result = invoke(*args)
    assert result.exit_code in (0, 1, 2), (args, result.exit_code)
    assert_clean(result, args)
    if result.exit_code == 0 and "--json" in args:  # strict JSON: no Infinity, no NaN
        data = json.loads(result.stdout, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        t = data["time"]
        if t is not None and t["run_cost"] is not None:
            assert t["run_cost"] > 0 and t["steps"] >= 1
