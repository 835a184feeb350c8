"""`vitcost calibrate`: real torch steps on the CPU, every predicted figure against the measured one.

Nothing in the measurement path is mocked: each test runs the reference ViT (or a user's
model) in torch, and MemTracker / FlopCounterMode say what it allocated and computed. On
the CPU the allocator does not round, so a correct prediction is exact, and a formula that
is wrong by a few bytes shows here. CUDA tests skip without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from vitcost.calibrate import Figure, calibrate, read_architecture  # noqa: E402
from vitcost.cli import app  # noqa: E402
from vitcost.errors import ConfigError, MeasurementError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# N = (64/16)^2 + 1 = 17 tokens, D = 64, 2 heads, MLP 256, 2 blocks, 10 classes: a real CPU
# step takes well under a second. Depth 3 in places, so a middle block is replayed too.
TINY = dict(dim=64, depth=2, heads=2, mlp_hidden=256, classes=10)
TINY_FLAGS = ["--dim", "64", "--depth", "2", "--heads", "2", "--mlp-hidden", "256", "--classes", "10",
              "--image", "64", "--patch", "16"]
MEMORY_KEYS = ("weights_at_peak_bytes", "gradients_at_peak_bytes", "optimizer_at_peak_bytes",
               "activations_at_peak_bytes", "temporaries_at_peak_bytes", "end_of_forward_bytes", "peak_bytes")
no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread, and a busy machine does not starve them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def invoke(*args: str):
    return CliRunner().invoke(app, ["calibrate", *args])


def one_line_error(res, code: int, fragment: str) -> None:
    assert res.exit_code == code, (res.stdout, res.stderr)
    assert res.stderr.startswith("Error: "), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert fragment in res.stderr, res.stderr


def assert_exact(cal) -> None:
    """Every figure torch gave equals the prediction to the byte (the CPU does not round)."""
    assert cal.status == "ok", (cal.label, cal.message, cal.failures)
    for f in cal.figures:
        assert f.measured == f.predicted, (cal.label, f)


# --- Figure arithmetic -----------------------------------------------------------------------


def test_figure_error_is_relative_to_the_measurement():
    f = Figure("peak_bytes", "peak", "bytes", predicted=1020, measured=1000)
    assert f.difference == 20
    assert f.error == pytest.approx(0.02)  # 20 / 1000
    assert f.within(0.02) and not f.within(0.019)
    assert Figure("x", "x", "bytes", 0, 0).error == 0.0
    zero = Figure("x", "x", "bytes", 16, 0)  # torch saw nothing, we predicted 16 bytes
    assert zero.error is None and not zero.within(10.0)
    assert Figure("x", "x", "bytes", 5, None).within(0.0)  # nothing to hold it against


# --- the reference ViT on the CPU: every category, exact ---------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16", "amp-bf16"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_training_step_every_category_exact(precision, attention):
    run = calibrate(None, image=64, patch=16, batch=3, device="cpu", precision=precision,
                    attention=attention, **{**TINY, "depth": 3})
    (cal,) = run.results
    assert cal.method == "measured" and cal.device == "cpu"
    assert {f.key for f in cal.figures} >= set(MEMORY_KEYS) | {"parameters", "forward_macs_per_image",
                                                               "training_macs_per_image"}
    assert_exact(cal)
    at_peak = sum(cal.figure(k).measured for k in MEMORY_KEYS if k.endswith("_at_peak_bytes"))
    assert at_peak == cal.figure("peak_bytes").measured  # the categories add up to the peak
    assert run.ok


@pytest.mark.parametrize("keep_grads", [False, True])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd-momentum"])
def test_zero_grad_modes_and_optimizers_exact(keep_grads, optimizer):
    (cal,) = calibrate(None, image=64, patch=16, batch=2, device="cpu", precision="fp32",
                       optimizer=optimizer, keep_grads=keep_grads, **TINY).results
    assert_exact(cal)
    # the optimizer's states at the peak: AdamW two per parameter, SGD momentum one (fp32 = 4 bytes)
    states = cal.figure("optimizer_at_peak_bytes").measured
    per_param = 2 if optimizer == "adamw" else 1
    assert states >= per_param * 4 * cal.figure("parameters").measured


@pytest.mark.parametrize("precision", ["fp32", "bf16", "amp-bf16"])
def test_inference_exact(precision):
    (cal,) = calibrate(None, image=64, patch=16, batch=4, device="cpu", mode="infer", precision=precision,
                       attention="eager", **TINY).results
    assert_exact(cal)
    assert cal.figure("gradients_at_peak_bytes").measured == 0
    assert "training_macs_per_image" not in {f.key for f in cal.figures}
    # under no_grad only the input batch is live at the end of the forward: 4 * 3 * 64 * 64 elements
    element = 2 if precision == "bf16" else 4
    assert cal.figure("end_of_forward_bytes").measured == 4 * 3 * 64 * 64 * element


def test_checkpointing_and_model_variants_exact():
    for extra in (dict(checkpointing="full"), dict(pool="avg", class_token=False), dict(registers=4),
                  dict(pos_embed="sincos"), dict(dist_token=True)):
        kw = {**TINY, **extra}
        if "pool" in kw:
            kw["pooling"] = kw.pop("pool")
        (cal,) = calibrate(None, image=64, patch=16, batch=2, device="cpu", precision="fp32", **kw).results
        assert_exact(cal)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "amp-bf16"])
def test_eager_attention_backward_as_the_peak_exact(precision, batch):
    """Softmax backward reads its saved output: the attention maps are live three at a time.
    Invisible while the MLP backward is the peak (small N); here N = 257 and the maps are the
    peak. At batch 1 matmul reshapes q, k, v as views: the qkv output is saved, not copies."""
    # N = (128/8)^2 + 1 = 257 tokens; one layer's maps: 2 * 2 * 257^2 * 4 = 1,056,784 bytes in fp32
    # at batch 2, against an MLP hidden of 2 * 257 * 64 * 4 = 131,584 bytes: the attention backward peaks
    (cal,) = calibrate(None, image=128, patch=8, batch=batch, device="cpu", precision=precision,
                       attention="eager", dim=32, depth=2, heads=2, mlp_hidden=64, classes=10).results
    assert cal.report.memory.peak_phase == "backward: blocks.1.attn"
    assert_exact(cal)


def test_a_wrong_prediction_is_caught():
    """The same harness on a model the formulas do not describe: the LayerNorm before the
    blocks of timm's CLIP towers saves its input and adds 2 D parameters, and calibrate says so."""
    run = calibrate(model_factory="tests.factories:timm_like_norm_pre", batch=2, device="cpu", precision="fp32")
    (cal,) = run.results
    assert cal.status == "off" and not run.ok
    assert cal.figure("end_of_forward_bytes").measured > cal.figure("end_of_forward_bytes").predicted
    assert cal.figure("parameters").measured - cal.figure("parameters").predicted == 2 * 64


def test_a_timm_model_with_layer_scale_is_read_and_exact():
    """timm's LayerScale (init_values, as in DINOv2 and DeiT III) is read from the blocks'
    ls1.gamma and replayed: every figure equals MemTracker's."""
    run = calibrate(model_factory="tests.factories:timm_like_layerscale", batch=2, device="cpu", precision="fp32")
    (cal,) = run.results
    assert cal.report.spec.layer_scale
    assert_exact(cal)


# --- the command line ------------------------------------------------------------------------


def test_cli_single_configuration_table_and_exit_0():
    res = invoke(*TINY_FLAGS, "--batch", "2", "--precision", "fp32", "--device", "cpu")
    assert res.exit_code == 0, (res.stdout, res.stderr)
    for text in ("weights at peak", "gradients at peak", "optimizer states at peak", "activations at peak",
                 "temporaries at peak", "peak", "forward MACs per image", "+0.00%", "MemTracker"):
        assert text in res.stdout
    assert res.stderr == ""


def test_cli_json_matches_the_plan_and_measurement():
    res = invoke(*TINY_FLAGS, "--batch", "2", "--precision", "amp-bf16", "--json", "--steps", "2")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["ok"] is True and data["tolerance_percent"] == 2.0
    (row,) = data["rows"]
    assert row["status"] == "ok" and row["method"] == "measured" and row["device"] == "cpu"
    assert row["measured"] == {k: v for k, v in row["predicted"].items()}
    assert row["inputs"]["batch"] == 2 and row["inputs"]["precision"] == "amp-bf16"
    plan = CliRunner().invoke(app, ["plan", *TINY_FLAGS, "--batch", "2", "--precision", "amp-bf16",
                                    "--device", "cpu", "--json"])
    assert json.loads(plan.stdout)["memory_bytes"]["peak"] == row["measured"]["peak_bytes"]


def test_cli_sweep_every_combination_with_out_file(tmp_path):
    out = tmp_path / "report.json"
    res = invoke("--dim", "64", "--depth", "2", "--heads", "2", "--mlp-hidden", "256", "--classes", "10",
                 "--image", "32,64", "--patch", "8,16", "--batch", "1,3", "--precision", "fp32",
                 "--mode", "infer", "--out", str(out))
    assert res.exit_code == 0, res.stderr
    assert "every combination" in res.stdout
    assert res.stderr.strip() == f"wrote 8 row(s) to {out}"
    rows = json.loads(out.read_text())["rows"]
    combos = [(r["inputs"]["image_h"], r["inputs"]["patch"], r["inputs"]["batch"]) for r in rows]
    assert combos == [(32, 8, 1), (32, 8, 3), (32, 16, 1), (32, 16, 3),
                      (64, 8, 1), (64, 8, 3), (64, 16, 1), (64, 16, 3)]
    for r in rows:
        assert r["status"] == "ok" and r["measured"]["peak_bytes"] == r["predicted"]["peak_bytes"]
    # tokens: (32/8)^2 + 1 = 17, (64/16)^2 + 1 = 17, (64/8)^2 + 1 = 65
    assert [r["tokens"] for r in rows][::2] == [17, 5, 65, 17]


def test_cli_out_file_is_read_by_check_measured(tmp_path):
    budgets = pytest.importorskip("vitcost.budgets")
    out = tmp_path / "report.json"
    assert invoke(*TINY_FLAGS, "--batch", "2", "--precision", "fp32", "--out", str(out)).exit_code == 0
    (row,) = budgets.load_measured(out)
    assert row.peak_bytes > 0 and row.inputs["batch"] == 2 and row.inputs["patch"] == 16


def test_cli_exits_1_beyond_the_tolerance_and_0_within_it():
    args = ["--model-factory", "tests.factories:timm_like_norm_pre", "--batch", "2", "--precision", "fp32"]
    res = invoke(*args)
    one_line_error(res, 1, "off by more than 2%")
    assert "OFF" in res.stdout  # the table still shows every figure
    res = invoke(*args, "--tolerance", "50")
    assert res.exit_code == 0, res.stderr


# --- --meta: traced on fake tensors ----------------------------------------------------------


def test_meta_trace_equals_the_real_measurement():
    kw = dict(image=64, patch=16, batch=3, precision="amp-bf16", attention="eager", **TINY)
    (real,) = calibrate(None, device="cpu", **kw).results
    (traced,) = calibrate(None, meta=True, **kw).results
    assert traced.method == "traced"
    assert [(f.key, f.measured) for f in traced.figures] == [(f.key, f.measured) for f in real.figures]
    assert_exact(traced)


def test_meta_vit_h_14_at_1024px_batch_64_in_seconds():
    start = time.perf_counter()
    res = invoke("--model", "vit-h", "--image", "1024", "--patch", "14", "--batch", "64", "--meta",
                 "--precision", "amp-bf16")
    seconds = time.perf_counter() - start
    assert res.exit_code == 0, res.stderr
    assert "TRACED, not measured" in res.stdout
    assert "every figure torch gave matches the prediction exactly" in res.stdout
    assert seconds < 60  # about 3 s on an idle 2-core machine; no memory is allocated


def test_meta_refuses_cuda():
    one_line_error(invoke("--meta", "--device", "cuda"), 1, "--meta traces on fake CPU tensors")


# --- the user's own model --------------------------------------------------------------------


@pytest.mark.parametrize("factory, convention", [
    ("reference", "vitcost reference"), ("timm_like", "timm attributes"), ("hf_like", "Hugging Face"),
])
def test_factory_architecture_is_read_and_measured_exactly(factory, convention):
    # the model's attention kernel is the workload's to say: --attention eager
    run = calibrate(model_factory=f"tests.factories:{factory}", factory_kwargs='{"attention": "eager"}',
                    batch=2, device="cpu", precision="fp32", attention="eager")
    (cal,) = run.results
    assert any(convention in w for w in cal.warnings)
    assert cal.model_source == f"factory tests.factories:{factory}"
    s = cal.report.spec
    assert (s.dim, s.depth, s.heads, s.mlp_hidden, s.patch, s.image_h, s.classes) == (64, 2, 2, 256, 16, 64, 10)
    assert_exact(cal)


def test_read_architecture_of_a_timm_style_model():
    from tests.factories import timm_like

    fields, how = read_architecture(timm_like(image_h=96, image_w=96, patch=8, classes=5))
    assert how == "timm attributes"
    assert fields == dict(patch=8, image=(96, 96), channels=3, dim=64, depth=2, heads=2, qkv_bias=True,
                          mlp_hidden=256, layer_scale=False, class_token=True, dist_token=False, registers=0,
                          pos_embed="learned", pos_embed_prefix=True, pooling="token", classes=5)


def test_flags_override_what_the_model_says_and_name_it():
    (cal,) = calibrate(model_factory="tests.factories:opaque", factory_kwargs={"image_h": 32, "image_w": 32},
                       image=32, patch=16, batch=2, device="cpu", precision="fp32", **TINY).results
    assert_exact(cal)
    assert cal.to_dict()["inputs"]["model"] == "tests.factories:opaque"


@pytest.mark.parametrize("args, fragment", [
    (["--model-factory", "tests.factories:broken", "--factory-kwargs", '{"model_name": "vit_x"}'],
     "calling it failed (ValueError: no such model: vit_x (second line of the message))"),
    (["--model-factory", "tests.factories:not_a_model"], "returned int, not a torch.nn.Module"),
    (["--model-factory", "tests.no_such_module:make"], "cannot import 'tests.no_such_module'"),
    (["--model-factory", "tests.factories:nope"], "'tests.factories' has no attribute 'nope'"),
    (["--model-factory", "tests.factories"], "expected module:callable"),
    (["--model-factory", "tests.factories:opaque"], "could not read the architecture of Sequential"),
    (["--model-factory", "tests.factories:timm_like", "--factory-kwargs", "{bad"], "--factory-kwargs: not valid JSON"),
    (["--model-factory", "tests.factories:timm_like", "--factory-kwargs", "[1]"], "expected a JSON object"),
    (["--factory-kwargs", "{}"], "--factory-kwargs needs --model-factory"),
])
def test_bad_factory_is_one_line(args, fragment):
    one_line_error(invoke(*args, "--device", "cpu"), 1, fragment)


# --- out of memory, too large to run ---------------------------------------------------------


def test_out_of_memory_is_a_result_and_the_sweep_goes_on():
    """The model's forward asks the CPU allocator for an exabyte: a real allocation failure."""
    res = invoke("--model-factory", "tests.factories:out_of_memory", "--batch", "1,2", "--precision", "fp32",
                 "--json")
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)["rows"]
    assert [r["status"] for r in rows] == ["out of memory", "out of memory"]
    assert [r["message"] for r in rows] == ["does not fit: out of memory at batch 1",
                                            "does not fit: out of memory at batch 2"]
    assert all(r["measured"] is None and r["predicted"]["peak_bytes"] > 0 for r in rows)


def test_too_large_for_this_machine_is_not_run_and_the_sweep_goes_on():
    run = calibrate(None, image=64, patch=16, batch=[2, 10**7], device="cpu", mode="infer", precision="fp32", **TINY)
    small, huge = run.results
    assert_exact(small)
    assert huge.status == "not run" and "--meta traces it" in huge.message
    assert run.ok


# --- devices, --save, torch missing ----------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line():
    one_line_error(invoke(*TINY_FLAGS, "--device", "cuda"), 1, "--device cuda: torch")


def test_save_needs_a_gpu_profile_and_a_cuda_run():
    one_line_error(invoke(*TINY_FLAGS, "--save"), 2, "--gpu PROFILE")
    if not torch.cuda.is_available():
        one_line_error(invoke(*TINY_FLAGS, "--save", "--gpu", "h100-sxm"), 1, "needs a CUDA run")
    one_line_error(invoke(*TINY_FLAGS, "--save", "--gpu", "no-such-gpu"), 1, "no-such-gpu")


def test_bad_values_are_usage_errors():
    one_line_error(invoke(*TINY_FLAGS, "--batch", "2,x"), 2, "'x' is not a whole number")
    one_line_error(invoke(*TINY_FLAGS, "--tolerance", "-1"), 2, "--tolerance")
    with pytest.raises(ConfigError):
        calibrate(None, tolerance=-0.1, **TINY)
    with pytest.raises(MeasurementError):
        calibrate(model_factory="nope:nope")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_torch_missing_names_what_to_install_and_plan_never_imports_torch():
    blocked = "import sys; sys.modules['torch'] = None\nfrom vitcost.cli import app\n"
    res = _run(blocked + "app(['calibrate', '--device', 'cpu'], prog_name='vitcost')")
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines() == [
        "Error: measuring needs PyTorch: pip install torch==2.13.0"]
    res = _run(blocked + "app(['plan', '--json'], prog_name='vitcost', standalone_mode=True)")
    assert res.returncode == 0, res.stderr
    res = _run("import sys, json\nfrom vitcost.cli import app\n"
               "try:\n    app(['compare', '--patch', '16,32', '--json'], prog_name='vitcost')\n"
               "except SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)")
    assert res.stderr.strip().splitlines()[-1] == "False"


def test_calibrate_help_lists_every_option():
    res = invoke("--help")
    assert res.exit_code == 0
    for flag in ("--device", "--steps", "--tolerance", "--meta", "--model-factory", "--factory-kwargs", "--out",
                 "--save", "--image", "--patch", "--batch", "--json"):
        assert flag in res.stdout
    assert "Warm-up" in res.stdout  # the options carry their help text


# --- CUDA (skipped without a GPU) ------------------------------------------------------------


@no_cuda
def test_cuda_peak_within_tolerance():
    run = calibrate(None, image=64, patch=16, batch=4, device="cuda", precision="amp-bf16", **TINY)
    (cal,) = run.results
    assert cal.device == "cuda" and cal.cuda["device_name"]
    assert cal.figure("weights_bytes").measured == cal.figure("weights_bytes").predicted
    assert cal.figure("peak_bytes").within(0.02), cal.figure("peak_bytes")
    assert cal.cuda["max_memory_reserved_bytes"] >= cal.cuda["max_memory_allocated_bytes"]


@no_cuda
def test_cuda_save_is_read_by_plan(tmp_path, monkeypatch):
    path = tmp_path / "calibration.json"
    monkeypatch.setenv("VITCOST_CALIBRATION", str(path))
    res = invoke(*TINY_FLAGS, "--device", "cuda", "--batch", "4", "--save", "--gpu", "h100-sxm", "--tolerance", "100")
    assert res.exit_code == 0, res.stderr
    assert str(path) in res.stderr
    entry = json.loads(path.read_text())["profiles"]["h100-sxm"]
    assert entry["cuda_context_bytes"] > 0 and entry["reserved_over_allocated"] >= 1.0
    plan = json.loads(CliRunner().invoke(app, ["plan", "--gpu", "h100-sxm", "--json"]).stdout)
    assert plan["gpu"]["usable_memory_source"] == f"calibrated: {path}"


def test_cuda_figures_hold_the_reserved_peak_to_the_allocator_model():
    import vitcost

    """On CUDA, calibrate puts max_memory_reserved (net of what was reserved before the model)
    beside the allocator model's reserved peak."""
    from types import SimpleNamespace

    from vitcost.calibrate import _cuda_figures
    from vitcost.fit import allocator_stats

    report = vitcost.plan("vit-ti", batch=4)
    mm = SimpleNamespace(weights_bytes=1, peak_bytes=2, extra={
        "allocated_at_step_start": 3, "max_memory_reserved": 10**9, "reserved_at_start": 10**6})
    figures = {f.key: f for f in _cuda_figures(report, mm)}
    reserved = figures["peak_reserved_bytes"]
    assert reserved.predicted == allocator_stats(report.spec, report.workload).peak_reserved > report.memory.peak
    assert reserved.measured == 10**9 - 10**6
