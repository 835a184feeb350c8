"""`vitcost probe`, the time half of `calibrate`, and a saved step-time ratio.

The probe measures this machine with torch; its profile must load, price a CPU step, and be
what `calibrate` holds against the wall clock. A saved measured/predicted ratio scales every
price by exactly that ratio.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

import vitcost  # noqa: E402
from vitcost.calibrate import _time_ratio, time_figures  # noqa: E402
from vitcost.errors import ProfileError  # noqa: E402
from vitcost.probe import profile_of  # noqa: E402
from vitcost.profiles import _parse  # noqa: E402

from test_cli import invoke, ok  # noqa: E402
from test_fuzz import assert_clean  # noqa: E402

TINY = ["--dim", "64", "--depth", "2", "--heads", "2", "--mlp-hidden", "256", "--classes", "10",
        "--image", "64", "--patch", "16", "--batch", "2"]

FIGURES = {  # a probe's figures, made up with round numbers
    "threads": 4, "fp32_flops_per_s": 200e9, "fp32_efficiency": 0.8, "bf16_flops_per_s": 500e9,
    "bf16_efficiency": 0.6, "fp32_attention_efficiency": 0.5, "bf16_attention_efficiency": 0.3,
    "bandwidth_bytes_per_s": 40e9, "op_seconds": 5e-6, "pointwise": {"gelu/4": 2e9, "gelu/2": 3e9},
}


def test_profile_of_writes_rates_that_price_what_was_measured():
    """fp32: 200 GFLOP/s peak x 0.8 = 160 achieved. bf16 reached 500 x 0.6 = 300 GFLOP/s on the
    ViT shapes: with one efficiency (0.8) its peak is written as 300 / 0.8 = 375 GFLOP/s; its
    attention, 0.3 of 500 = 150 GFLOP/s, is 150 / 375 = 0.4 of the written peak."""
    data = profile_of(FIGURES, "2.13.0")
    profile = _parse(yaml.safe_dump(data), name="machine", where="machine.yaml")
    assert profile.device == "cpu" and profile.cuda_context_mib == 0
    fp32, bf16 = profile.rates("fp32"), profile.rates("bf16")
    assert fp32.matmul_flops_per_s * fp32.matmul_efficiency == pytest.approx(160e9)
    assert bf16.matmul_flops_per_s * bf16.matmul_efficiency == pytest.approx(300e9)
    assert bf16.matmul_flops_per_s * bf16.attention_efficiency == pytest.approx(150e9)
    assert fp32.attention_efficiency == 0.5
    assert fp32.memory_bytes_per_s == pytest.approx(40e9)  # measured: efficiency 1
    assert fp32.host_seconds == pytest.approx(5e-6) and fp32.kernel_seconds == 0
    assert fp32.asynchronous is False and fp32.tile == 0 and fp32.attention_tile == 0
    assert dict(fp32.pointwise_elems_per_s) == {"gelu/2": 3e9, "gelu/4": 2e9}


def test_a_cpu_step_adds_host_and_device_time():
    """On a CPU the host runs the kernels: its dispatch adds to them (on a GPU the longer counts)."""
    path_data = profile_of(FIGURES, "2.13.0")
    profile = _parse(yaml.safe_dump(path_data), name="machine", where="machine.yaml")
    from vitcost import kernels, timing

    report = vitcost.plan("vit-ti", batch=2, device="cpu")
    ks = kernels.at_batch(report.spec, report.workload)
    st = timing.step_time(ks, profile.rates("bf16"))
    assert st.breakdown_seconds["launch"] == pytest.approx(st.launches * 5e-6)
    assert st.step_seconds == pytest.approx(st.device_seconds + st.host_seconds)


def test_probe_writes_a_profile_that_plans_a_cpu_step(tmp_path):
    out = tmp_path / "machine.yaml"
    result = invoke("probe", "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert "GFLOP/s" in result.stdout and result.stderr.startswith(f"wrote the profile to {out}")
    data = yaml.safe_load(out.read_text())
    assert data["device"] == "cpu" and data["time"]["compute_units"] == torch.get_num_threads()
    assert 1e9 < data["dense_tflops"]["fp32"] * 1e12 < 1e15  # a CPU does GFLOP/s to TFLOP/s
    assert 0 < data["matmul_efficiency"] <= 1
    assert {"gelu/4", "gelu/2", "layer_norm_backward/4", "softmax/2"} <= set(data["time"]["pointwise_elements_per_s"])
    d = json.loads(ok("plan", "--model", "vit-ti", "--gpu", str(out), "--json").stdout)
    assert d["inputs"]["device"] == "cpu" and d["time"]["device"] == "cpu"
    assert d["time"]["step_seconds"] > 0 and d["time_reason"] is None
    # the CPU's rules: no 512-byte blocks, so the peak is the CPU replay's
    assert d["memory_bytes"]["peak"] == vitcost.plan("vit-ti", device="cpu").peak_bytes
    assert "where the time goes (on this CPU)" in ok("plan", "--model", "vit-ti", "--gpu", str(out)).stdout


@pytest.mark.parametrize("out,needle", [("machine.txt", "a profile is a .yaml or .yml file"),
                                        ("no/such/dir/machine.yaml", "cannot be written")])
def test_probe_refuses_a_bad_out_in_one_line(tmp_path, out, needle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("probe", "--out", out)
    assert_clean(result, "probe --out")
    assert result.exit_code == 1 and needle in result.stderr
    assert not list(tmp_path.rglob("*.tmp"))  # nothing half-written


def test_calibrate_times_steps_beside_the_prediction(tmp_path):
    out = tmp_path / "machine.yaml"
    out.write_text(yaml.safe_dump(profile_of(FIGURES, "2.13.0")))
    data = json.loads(ok("calibrate", *TINY, "--device", "cpu", "--gpu", str(out), "--json").stdout)
    (row,) = data["rows"]
    t = row["time"]
    plan = vitcost.plan(image=64, patch=16, batch=2, dim=64, depth=2, heads=2, mlp_hidden=256, classes=10,
                        gpu=str(out), device="cpu")
    assert t["predicted_seconds"] == plan.time.step_seconds
    assert len(t["measured_seconds"]) == 3 and all(s > 0 for s in t["measured_seconds"])
    assert t["min_seconds"] == min(t["measured_seconds"]) <= t["median_seconds"]
    assert t["error_vs_min"] == pytest.approx(t["predicted_seconds"] / t["min_seconds"] - 1)
    text = ok("calibrate", *TINY, "--device", "cpu", "--gpu", str(out)).stdout
    assert "step time: predicted" in text and "over 3 steps" in text


def test_calibrate_against_a_gpu_profile_on_the_cpu_times_nothing():
    """A100 prices are no prediction of this CPU's wall clock: nothing is timed."""
    data = json.loads(ok("calibrate", *TINY, "--device", "cpu", "--gpu", "a100", "--json").stdout)
    assert data["rows"][0]["time"] is None


def test_time_figures_and_the_saved_ratio():
    t = time_figures(0.010, [0.012, 0.020, 0.011])
    assert (t["min_seconds"], t["median_seconds"]) == (0.011, 0.012)
    assert t["error_vs_min"] == pytest.approx(0.010 / 0.011 - 1)

    class Row:  # what _time_ratio reads of a Calibration
        def __init__(self, time):
            self.time = time
    rows = [Row(time_figures(0.010, [0.015])), Row(None), Row(time_figures(0.020, [0.050])),
            Row(time_figures(0.010, [0.012]))]
    # measured / predicted: 1.5, 2.5, 1.2 -> median 1.5 over 3 timed rows
    assert _time_ratio(rows) == {"step_time_ratio": 1.5, "step_time_rows": 3}
    assert _time_ratio([Row(None)]) == {}


def _save(path: Path, entry: dict) -> None:
    path.write_text(json.dumps({"version": 1, "profiles": {"a100-80gb": entry}}))


def test_a_saved_ratio_scales_every_price(tmp_path, monkeypatch):
    base = vitcost.plan("vit-b", gpu="a100", batch=32).time
    assert base.calibrated is None
    cal = tmp_path / "calibration.json"
    _save(cal, {"total_bytes": 85_899_345_920, "cuda_context_bytes": 536_870_912, "step_time_ratio": 1.25})
    monkeypatch.setenv("VITCOST_CALIBRATION", str(cal))
    scaled = vitcost.plan("vit-b", gpu="a100", batch=32).time
    assert scaled.step_seconds == pytest.approx(1.25 * base.step_seconds, rel=1e-12)
    for part, seconds in base.step.breakdown_seconds.items():
        assert scaled.step.breakdown_seconds[part] == pytest.approx(1.25 * seconds, rel=1e-12)
    assert scaled.calibrated == f"calibrated: {cal}"
    assert scaled.mfu == pytest.approx(base.mfu / 1.25)
    out = ok("plan", "--model", "vit-b", "--gpu", "a100", "--json").stdout
    assert json.loads(out)["time"]["calibrated"] == f"calibrated: {cal}"
    text = " ".join(ok("plan", "--model", "vit-b", "--gpu", "a100").stdout.split())
    assert f"prices scaled by the step-time ratio measured on this GPU (calibrated: {cal})" in text


@pytest.mark.parametrize("ratio", [0, -1, "fast", 1000, True])
def test_a_bad_saved_ratio_is_one_line(tmp_path, monkeypatch, ratio):
    cal = tmp_path / "calibration.json"
    _save(cal, {"total_bytes": 85_899_345_920, "cuda_context_bytes": 536_870_912, "step_time_ratio": ratio})
    monkeypatch.setenv("VITCOST_CALIBRATION", str(cal))
    with pytest.raises(ProfileError, match="step_time_ratio must be a number between 0.01 and 100"):
        vitcost.plan("vit-b", gpu="a100").time
    result = invoke("plan", "--model", "vit-b", "--gpu", "a100")
    assert_clean(result, "bad ratio")
    assert result.exit_code == 1 and "step_time_ratio" in result.stderr


@pytest.mark.parametrize("change,needle", [
    ({"pointwise_elements_per_s": {"gelu/3": 1e9}}, "key 'gelu/3': an operator and its element bytes"),
    ({"pointwise_elements_per_s": {"gelu/4": 0}}, "gelu/4: elements per second, a number from 1 to 1e15"),
    ({"pointwise_elements_per_s": [1, 2]}, "a mapping of 'operator/element bytes' to elements per second"),
    ({"attention_efficiency_low": 2}, "time.attention_efficiency_low"),
])
def test_bad_probed_keys_are_one_line(tmp_path, change, needle):
    data = profile_of(FIGURES, "2.13.0")
    data["time"].update(change)
    path = tmp_path / "machine.yaml"
    path.write_text(yaml.safe_dump(data))
    result = invoke("plan", "--model", "vit-ti", "--gpu", str(path))
    assert_clean(result, str(change))
    assert result.exit_code == 1 and needle in result.stderr and "machine.yaml" in result.stderr


@pytest.mark.parametrize("device,context,needle", [("tpu", 0, "device"), ("cuda", 0, "cuda_context_mib: a GPU's CUDA context")])
def test_bad_device_is_one_line(tmp_path, device, context, needle):
    data = profile_of(FIGURES, "2.13.0")
    data.update(device=device, cuda_context_mib=context)
    path = tmp_path / "machine.yaml"
    path.write_text(yaml.safe_dump(data))
    result = invoke("plan", "--model", "vit-ti", "--gpu", str(path))
    assert_clean(result, device)
    assert result.exit_code == 1 and needle in result.stderr
