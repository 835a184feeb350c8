"""The Python API: ``vitcost.plan`` and ``vitcost.compare``, the fit on a GPU, the JSON report."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vitcost
from vitcost.errors import ConfigError, UnknownNameError
from vitcost.estimate import max_batch_size, peak_bytes
from vitcost.fit import allocator_stats, fits_allocator
from vitcost.program import estimate_memory
from vitcost.profiles import load_profile

from conftest import cpu_workload, run_python, tiny

# A100 80GB profile: (81,920 MiB - 512 MiB context) * (1 - 0.05 allocator reserve), floored
# = 85,362,475,008 * 0.95 = 81,094,351,257.6 -> 81,094,351,257 bytes
A100_USABLE = 85_353_955_328  # (81,920 - 512 context - 8.125 cuBLAS workspace) MiB


# --- defaults ------------------------------------------------------------------------------


def test_plan_defaults():
    report = vitcost.plan()
    s, w = report.spec, report.workload
    assert (s.name, s.dim, s.depth, s.heads, s.mlp_hidden) == ("vit-b", 768, 12, 12, 3072)
    assert (s.image_h, s.image_w, s.patch, s.classes) == (224, 224, 16, 1000)
    assert w.batch == 8
    assert w.mode.value == "train"
    assert w.precision.value == "amp-bf16"
    assert w.attention.value == "sdpa"
    assert w.optimizer.value == "adamw"
    assert w.keep_grads is False
    assert w.checkpointing.value == "none"
    assert w.device.value == "cuda"
    assert report.gpu is None
    assert report.warnings == ()
    # the report's memory is the replay of exactly this configuration
    assert report.memory == estimate_memory(s, w)
    assert report.peak_bytes == report.memory.peak  # one GPU: no DDP buckets


def test_plan_options_reach_the_workload():
    report = vitcost.plan("vit-s", image="384x256", patch=32, batch=3, mode="infer", precision="fp16",
                          attention="eager", optimizer="sgd", keep_grads=True, checkpointing="full",
                          device="cpu", registers=4)
    s, w = report.spec, report.workload
    assert (s.dim, s.image_h, s.image_w, s.patch, s.registers) == (384, 384, 256, 32, 4)
    assert report.tokens["total"] == 12 * 8 + 1 + 4  # 384/32 x 256/32 patches + class + 4 registers
    assert (w.batch, w.mode.value, w.precision.value, w.attention.value) == (3, "infer", "fp16", "eager")
    assert (w.optimizer.value, w.keep_grads, w.checkpointing.value, w.device.value) == ("sgd", True, "full", "cpu")


@pytest.mark.parametrize("image, expected", [(384, (384, 384)), ("384", (384, 384)), ("384x256", (384, 256)),
                                             ("384X256", (384, 256)), ((384, 256), (384, 256))])
def test_image_forms(image, expected):
    spec = vitcost.plan(image=image, mode="infer").spec
    assert (spec.image_h, spec.image_w) == expected


@pytest.mark.parametrize("kwargs, match", [
    (dict(patch=0), "--patch 0"),
    (dict(patch=-4), "--patch -4"),
    (dict(image=8, patch=16), "smaller than patch"),
    (dict(heads=5), "does not divide"),
    (dict(batch=0), "--batch 0"),
    (dict(image="abc"), "expected a size"),
    (dict(image=0), "positive"),
    (dict(classes=0), "classification head"),  # training needs a head
    (dict(wings=3), "unknown model option"),
    (dict(precision="fp8"), "precision"),
])
def test_bad_configurations_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        vitcost.plan(**kwargs)


def test_headless_model_plans_inference():
    report = vitcost.plan(classes=0, mode="infer")
    assert report.params["head"] == 0


def test_unknown_model_and_gpu_are_unknown_names():
    with pytest.raises(UnknownNameError, match="did you mean 'vit-b'"):
        vitcost.plan("vit-bb")
    with pytest.raises(UnknownNameError, match="did you mean 'a100'"):
        vitcost.plan(gpu="a1000")


def test_non_divisible_image_warns_and_strict_raises():
    report = vitcost.plan(image=230, patch=16)
    assert len(report.warnings) == 1
    # 230 = 14*16 + 6: 6 rows and 6 columns dropped, a 14x14 grid
    assert "230x230" in report.warnings[0] and "14x14" in report.warnings[0]
    assert report.tokens["total"] == 197
    with pytest.raises(ConfigError, match="not divisible"):
        vitcost.plan(image=230, patch=16, strict=True)
    assert vitcost.plan(image=224, patch=16, strict=True).warnings == ()


# --- max batch size -------------------------------------------------------------------------


def _check_max_batch(spec, wl, budget):
    m = max_batch_size(spec, wl, budget)
    if m == 0:
        assert peak_bytes(spec, wl, 1) > budget
    else:
        assert peak_bytes(spec, wl, m) <= budget < peak_bytes(spec, wl, m + 1)
    return m


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("workload", [
    dict(), dict(mode="infer"), dict(attention="eager", precision="amp-bf16"), dict(optimizer="sgd"),
    dict(checkpointing="full", precision="bf16"), dict(keep_grads=True, optimizer="sgd-momentum"),
])
def test_max_batch_size_is_the_largest_that_fits(device, workload):
    spec = tiny(depth=3)
    wl = cpu_workload(device=device, **workload)
    one = peak_bytes(spec, wl, 1)
    for budget in (one - 1, one, one + 1, 2 * one, 7 * one + 12_345, 100 * one, 10_000 * one):
        _check_max_batch(spec, wl, budget)
    assert max_batch_size(spec, wl, one - 1) == 0
    assert max_batch_size(spec, wl, one) >= 1
    assert max_batch_size(spec, wl, 0) == 0


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_max_batch_size_exact_boundary(device):
    """A budget of exactly peak(b) gives b; one byte less gives b - 1."""
    spec = tiny(depth=2)
    wl = cpu_workload(device=device, attention="eager")
    for b in (1, 2, 3, 17, 64, 1000):
        assert max_batch_size(spec, wl, peak_bytes(spec, wl, b)) == b
        assert max_batch_size(spec, wl, peak_bytes(spec, wl, b) - 1) == b - 1


@settings(max_examples=40, deadline=None)
@given(
    depth=st.integers(1, 5),
    heads_dim=st.sampled_from([(1, 32), (2, 64), (3, 96)]),
    classes=st.sampled_from([10, 1000, 20000]),
    device=st.sampled_from(["cpu", "cuda"]),
    precision=st.sampled_from(["fp32", "bf16", "amp-bf16"]),
    attention=st.sampled_from(["sdpa", "eager"]),
    optimizer=st.sampled_from(["adamw", "sgd"]),
    mode=st.sampled_from(["train", "infer"]),
    scale=st.floats(0.5, 500.0),
)
def test_max_batch_size_property(depth, heads_dim, classes, device, precision, attention, optimizer, mode, scale):
    heads, dim = heads_dim
    spec = tiny(depth=depth, heads=heads, dim=dim, mlp_hidden=4 * dim, classes=classes)
    wl = cpu_workload(device=device, precision=precision, attention=attention, optimizer=optimizer, mode=mode)
    _check_max_batch(spec, wl, int(peak_bytes(spec, wl, 1) * scale))


def test_peak_bytes_is_the_replay_at_that_batch():
    spec, wl = tiny(), cpu_workload(batch=3)
    assert peak_bytes(spec, wl, 5) == estimate_memory(spec, cpu_workload(batch=5)).peak


# --- fit on a GPU ----------------------------------------------------------------------------


def test_a100_profile_usable_memory_arithmetic():
    assert load_profile("a100").profile.usable_memory_bytes == A100_USABLE


@pytest.mark.parametrize("kwargs", [dict(image=224, patch=16), dict(image=384, patch=8, batch=64),
                                    dict(model="vit-l", image=512, patch=14, batch=32, attention="eager")])
def test_a100_fit(kwargs):
    report = vitcost.plan(gpu="a100", **kwargs)
    g = report.gpu
    assert g.name == "a100-80gb" and g.requested == "a100" and g.gpus == 1
    assert g.usable_memory_bytes == A100_USABLE
    assert g.usable_memory_source == "profile"
    assert (g.memory_bytes, g.context_bytes, g.workspace_bytes) == (80 * 2**30, 512 * 2**20, 8_519_680)
    assert g.peak_bytes == report.peak_bytes == report.memory.peak
    assert g.allocator == "native"
    # the reserved peak is the allocator's, at least the tensors' peak
    assert g.peak_reserved_bytes == allocator_stats(report.spec, report.workload).peak_reserved >= g.peak_bytes
    assert g.headroom_bytes == A100_USABLE - g.peak_reserved_bytes
    m = g.max_batch_size
    at = lambda b: report.workload.model_copy(update={"batch": b})
    assert fits_allocator(report.spec, at(m), A100_USABLE) and not fits_allocator(report.spec, at(m + 1), A100_USABLE)
    # the tensors alone bound it from above
    assert m <= max_batch_size(report.spec, report.workload, A100_USABLE)
    assert g.fits == (report.workload.batch <= m)


def test_a100_fit_verdicts_both_ways():
    assert vitcost.plan(image=224, patch=16, gpu="a100").gpu.fits is True
    big = vitcost.plan("vit-l", image=512, patch=8, batch=64, attention="eager", gpu="a100")
    assert big.gpu.fits is False
    assert big.gpu.headroom_bytes < 0


def test_step_time_lower_bound_arithmetic():
    report = vitcost.plan(image=224, patch=16, gpu="a100")
    g = report.gpu
    # amp-bf16 matmuls: 312 TFLOP/s dense bf16 x 0.87 achievable
    assert g.matmul_dtype == "bf16"
    assert g.peak_flops_per_s == 312e12
    # 2 FLOPs per MAC * 52,575,879,168 training MACs per image * 8 images
    assert g.step_seconds_lower_bound == pytest.approx(2 * 52_575_879_168 * 8 / (312e12 * 0.87))
    fp32 = vitcost.plan(image=224, patch=16, gpu="a100", precision="fp32").gpu
    assert fp32.matmul_dtype == "fp32" and fp32.peak_flops_per_s == 19.5e12


def test_eight_a100_data_parallel():
    report = vitcost.plan(image=224, patch=16, batch=64, gpu="8xa100")
    g = report.gpu
    assert g.gpus == 8
    assert g.per_gpu_batch == report.workload.batch == 8  # ceil(64 / 8)
    # DDP keeps a flat copy of every gradient in its buckets
    assert report.ddp_bucket_bytes == g.ddp_bucket_bytes == report.memory.gradients > 0
    assert report.peak_bytes == report.memory.peak + report.memory.gradients
    per_gpu_max = g.max_batch_size // 8
    assert g.fits == (report.workload.batch <= per_gpu_max)
    # the buckets are one more tensor the allocator holds from the start
    at = lambda b: report.workload.model_copy(update={"batch": b})
    usable, ddp = g.usable_memory_bytes, report.ddp_bucket_bytes
    assert fits_allocator(report.spec, at(per_gpu_max), usable, extra_bytes=ddp)
    assert not fits_allocator(report.spec, at(per_gpu_max + 1), usable, extra_bytes=ddp)
    assert per_gpu_max <= max_batch_size(report.spec, report.workload, usable - ddp)
    # the global maximum fits; one image more puts ceil((8m + 1) / 8) = m + 1 on some GPU, and does not
    assert vitcost.plan(image=224, patch=16, batch=g.max_batch_size, gpu="8xa100").gpu.fits is True
    assert vitcost.plan(image=224, patch=16, batch=g.max_batch_size + 1, gpu="8xa100").gpu.fits is False


@pytest.mark.parametrize("batch, per_gpu", [(1, 1), (7, 1), (8, 1), (9, 2), (60, 8), (64, 8), (65, 9)])
def test_eight_a100_per_gpu_batch_is_the_ceiling(batch, per_gpu):
    report = vitcost.plan(image=224, patch=16, batch=batch, gpu="8xa100")
    assert report.gpu.per_gpu_batch == per_gpu == math.ceil(batch / 8)
    uneven = [w for w in report.warnings if "does not split evenly" in w]
    assert len(uneven) == (1 if batch % 8 else 0)


def test_multi_gpu_json_says_the_global_batch_and_the_share_apart():
    data = vitcost.plan(image=224, patch=16, batch=64, gpu="8xa100").to_dict()
    assert (data["inputs"]["batch"], data["inputs"]["per_gpu_batch"], data["gpu"]["per_gpu_batch"]) == (64, 8, 8)
    # per-step figures are for the global batch
    assert data["macs"]["forward_per_batch"] == 64 * data["macs"]["forward_per_image"]
    uneven = vitcost.plan(image=224, patch=16, batch=65, gpu="8xa100")
    assert (uneven.to_dict()["inputs"]["batch"], uneven.workload.batch) == (65, 9)
    assert any("batch 65" in w and "each runs 9" in w for w in uneven.warnings)


def test_eight_a100_inference_has_no_ddp_buckets():
    report = vitcost.plan(image=224, patch=16, batch=64, mode="infer", gpu="8xa100")
    assert report.ddp_bucket_bytes == 0
    assert report.peak_bytes == report.memory.peak


def test_gpu_profile_from_a_file(tmp_path):
    path = tmp_path / "mygpu.yaml"
    path.write_text(
        "display_name: My GPU\nmemory_mib: 24576\ncuda_context_mib: 512\nlibrary_workspace_mib: 8\n"
        "overheads_source: a test\n"
        "memory_bandwidth_gb_per_s: 900\ndense_tflops: {fp32: 30.0, tf32: 60.0, bf16: 120.0, fp16: 120.0}\n"
        "matmul_efficiency: 0.7\ninterconnect: {name: PCIe 4.0 x16, gb_per_s_per_direction: 31.5}\nsource: a test\n"
    )
    g = vitcost.plan(image=224, patch=16, gpu=str(path)).gpu
    assert g.name == "mygpu"
    # (24,576 - 512 - 8) MiB = 24,056 MiB = 25,224,544,256 bytes
    assert g.usable_memory_bytes == 25_224_544_256
    assert g.peak_flops_per_s == 120e12 and g.matmul_efficiency == 0.7


# --- compare ---------------------------------------------------------------------------------


def test_compare_is_images_outer_patches_inner():
    reports = vitcost.compare(image=[224, 384, 512], patch=[16, 32], mode="infer")
    assert [(r.spec.image_h, r.spec.patch) for r in reports] == [
        (224, 16), (224, 32), (384, 16), (384, 32), (512, 16), (512, 32)]
    # each is the plan of its own configuration
    assert reports[3].macs_forward_per_image == vitcost.plan(image=384, patch=32, mode="infer").macs_forward_per_image


def test_compare_accepts_comma_strings_and_one_hw_tuple():
    reports = vitcost.compare(image="224,384x256", patch="16,32", mode="infer")
    assert [(r.spec.image_h, r.spec.image_w, r.spec.patch) for r in reports] == [
        (224, 224, 16), (224, 224, 32), (384, 256, 16), (384, 256, 32)]
    one = vitcost.compare(image=(384, 256), patch=16, mode="infer")
    assert [(r.spec.image_h, r.spec.image_w) for r in one] == [(384, 256)]


def test_compare_passes_options_to_every_plan():
    reports = vitcost.compare(image=[224], patch=[8, 16], gpu="a100", batch=16, attention="eager")
    assert all(r.gpu is not None and r.gpu.name == "a100-80gb" for r in reports)
    assert all(r.workload.batch == 16 and r.workload.attention.value == "eager" for r in reports)


# --- JSON ------------------------------------------------------------------------------------

JSON_PATHS = [
    "schema_version", "tokens.total", "params.total", "macs.forward_per_image",
    "memory_bytes.weights", "memory_bytes.gradients", "memory_bytes.optimizer_states",
    "memory_bytes.activations", "memory_bytes.peak", "fits", "max_batch_size",
]


def dig(data: dict, path: str):
    for key in path.split("."):
        data = data[key]
    return data


def test_json_paths_and_values():
    report = vitcost.plan(image=224, patch=16, gpu="a100")
    data = report.to_dict()
    for path in JSON_PATHS:
        dig(data, path)  # KeyError names a missing path
    assert data["schema_version"] == 1
    assert dig(data, "tokens.total") == 197
    assert dig(data, "params.total") == 86_567_656
    assert dig(data, "macs.forward_per_image") == 17_563_828_224
    assert dig(data, "macs.forward_per_batch") == 8 * 17_563_828_224
    assert dig(data, "flops.forward_per_image") == 2 * 17_563_828_224
    m = report.memory
    assert dig(data, "memory_bytes.weights") == m.weights
    assert dig(data, "memory_bytes.gradients") == m.gradients
    assert dig(data, "memory_bytes.optimizer_states") == m.optimizer_states
    assert dig(data, "memory_bytes.activations") == m.activations
    assert dig(data, "memory_bytes.peak") == report.peak_bytes
    assert data["fits"] is True
    assert data["max_batch_size"] == report.gpu.max_batch_size
    assert data["headroom_bytes"] == A100_USABLE - report.gpu.peak_reserved_bytes
    assert dig(data, "memory_bytes.peak_reserved") == report.gpu.peak_reserved_bytes > report.peak_bytes
    assert sum(dig(data, "peak.at_peak_bytes").values()) == report.memory.peak
    # the component breakdowns add up to their totals
    assert sum(v for k, v in data["params"].items() if k != "total") == data["params"]["total"]
    assert sum(dig(data, "macs.forward_by_component").values()) == dig(data, "macs.forward_per_image")


def test_json_without_gpu_has_null_fit():
    data = vitcost.plan().to_dict()
    assert data["fits"] is None and data["max_batch_size"] is None and data["gpu"] is None


def test_json_inference_reports_no_training_macs():
    data = vitcost.plan(mode="infer").to_dict()
    assert dig(data, "macs.training_per_image") == 0
    assert dig(data, "macs.training_by_component") == {}


@pytest.mark.parametrize("kwargs", [dict(gpu="a100"), dict(gpu="8xa100", batch=20), dict(image=230),
                                    dict(mode="infer", device="cpu", dist_token=True)])
def test_json_round_trips(kwargs):
    data = vitcost.plan(**kwargs).to_dict()
    assert json.loads(json.dumps(data)) == data


# --- no torch ----------------------------------------------------------------------------------


def test_plan_does_not_import_torch():
    result = run_python(
        "import sys, vitcost; vitcost.plan(image=224, patch=16, gpu='a100'); "
        "vitcost.compare(image=[224, 384], patch=[16, 32], gpu='8xa100'); print('torch' in sys.modules)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_a_feature_backbone_trains_with_a_stated_default_head():
    """vit_large_patch14_reg4_dinov2 has no head: in train mode plan assumes timm's
    1000-class linear head and says so, instead of failing."""
    report = vitcost.plan("vit_large_patch14_reg4_dinov2", batch=2)
    assert report.spec.classes == 1000 and report.workload.training
    assert any("feature backbone" in w and "1000-class" in w for w in report.warnings)
    assert vitcost.plan("vit_large_patch14_reg4_dinov2", mode="infer").spec.classes == 0
    with pytest.raises(ConfigError, match="--classes"):
        vitcost.plan(classes=0)  # asked for explicitly: still an error


def test_layer_scale_with_checkpointing_costs_the_recomputed_fc2_output():
    """LayerScale saves fc2's output, so the recompute runs fc2 too: checkpointing saves less
    with LayerScale than without it, but not all of the MLP's activations."""
    plain = vitcost.plan("vit_base_patch14_dinov2", checkpointing="full", layer_scale=False, batch=4)
    scaled = vitcost.plan("vit_base_patch14_dinov2", checkpointing="full", batch=4)
    full = vitcost.plan("vit_base_patch14_dinov2", batch=4)
    assert plain.memory.peak < scaled.memory.peak < full.memory.peak
