"""The command line: documented examples run, JSON parses, every error is one line on stderr.

This typer's ``CliRunner`` has no ``mix_stderr`` parameter: its ``Result`` keeps ``stdout`` and
``stderr`` apart (``output`` is the two interleaved), so they are asserted separately here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer.main
import yaml
from typer.testing import CliRunner

import vitcost
from vitcost.cli import app

from conftest import TEST_PROFILE, REPO, run_python

runner = CliRunner(env={"COLUMNS": None})  # piped output: 120 columns, whatever the shell exports


def invoke(*args: str):
    return runner.invoke(app, list(args))


def ok(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr + result.stdout
    assert result.stderr == ""
    return result


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the rich tables in ``text`` (with or without an outer edge), as lists of
    stripped cells. A cell may take more than one line (a wrapped name, compare's ratios): the
    continuation lines (first cell empty) are dropped."""
    rows = []
    for line in text.splitlines():
        if "│" not in line:
            continue
        cells = [c.strip() for c in line.split("│")]
        if line.strip().startswith("│"):  # an outer edge: nothing before the first bar or after the last
            cells = cells[1:-1]
        rows.append(cells)
    return [r for r in rows if r[0]]


def words(text: str) -> str:
    """``text`` with every run of whitespace (and so every wrap) made one space."""
    return " ".join(text.split())


VALID_PROFILE = TEST_PROFILE


# --- plan ---------------------------------------------------------------------------------


def test_documented_plan_example():
    """vitcost plan --image 384 --patch 16 --gpu a100"""
    out = ok("plan", "--image", "384", "--patch", "16", "--gpu", "a100").stdout
    header, rest = out.split("left at their defaults:", 1)
    header = words(header)
    assert header.startswith("vitcost: vit-b (D=768, depth 12, 12 heads, MLP 3072)")
    assert "image 384x384, patch 16, batch 8, train, amp-bf16, sdpa, adamw" in header
    assert header.endswith("on a100 -> a100-80gb")
    assert words(rest).startswith("model vit-b, batch 8, mode train, precision amp-bf16, "
                                  "attention sdpa, optimizer adamw")
    rows = {r[0]: r[1:] for r in table_rows(out)}
    assert rows["tokens N"] == ["577"]  # (384/16)^2 + 1
    # 86,567,656 at 224 px plus (577 - 197) * 768 = 291,840 more position-embedding parameters
    assert rows["total"][0] == "86,859,496"
    assert "FITS on NVIDIA A100 80GB SXM4" in out
    report = vitcost.plan(image=384, patch=16, gpu="a100")
    assert f"largest batch that fits: {report.gpu.max_batch_size:,}" in out
    assert rows["peak (tensors: max_memory_allocated)"][0] == f"{report.peak_bytes:,}"
    assert rows["peak reserved (native allocator: max_memory_reserved)"][0] == f"{report.gpu.peak_reserved_bytes:,}"
    assert "fit rests on: 80.00 GiB memory - CUDA context 512.0 MiB - library workspaces 8.1 MiB" in words(out)


def test_plan_json_is_the_api_report():
    result = ok("plan", "--image", "384", "--patch", "16", "--gpu", "a100", "--json")
    data = json.loads(result.stdout)
    for path in ("tokens.total", "params.total", "macs.forward_per_image", "memory_bytes.weights",
                 "memory_bytes.gradients", "memory_bytes.optimizer_states", "memory_bytes.activations",
                 "memory_bytes.peak", "fits", "max_batch_size", "schema_version"):
        node = data
        for key in path.split("."):
            node = node[key]
    assert data["tokens"]["total"] == 577
    # the CLI is a thin layer: its JSON is the API's report, key for key
    assert data == vitcost.plan(image=384, patch=16, gpu="a100").to_dict()


def test_plan_json_keeps_warnings_in_the_json():
    result = ok("plan", "--json", "--image", "230", "--patch", "16")
    data = json.loads(result.stdout)
    assert len(data["warnings"]) == 1 and "not divisible" in data["warnings"][0]


def test_plan_model_and_workload_options():
    data = json.loads(ok("plan", "--json", "--model", "deit_small_distilled_patch16_224", "--batch", "32",
                         "--mode", "infer", "--precision", "fp16", "--attention", "eager", "--image", "384x256",
                         "--registers", "4", "--device", "cpu").stdout)
    i = data["inputs"]
    assert (i["dim"], i["dist_token"], i["registers"], i["image_h"], i["image_w"]) == (384, True, 4, 384, 256)
    assert (i["batch"], i["mode"], i["precision"], i["attention"], i["device"]) == (32, "infer", "fp16", "eager", "cpu")
    assert data["tokens"]["total"] == 24 * 16 + 2 + 4  # class + distillation + 4 registers


# --- compare ------------------------------------------------------------------------------


def test_documented_compare_example():
    """vitcost compare --image 384 --patch 8,14,16,32 --gpu a100: one row per patch."""
    result = ok("compare", "--image", "384", "--patch", "8,14,16,32", "--gpu", "a100")
    rows = [r for r in table_rows(result.stdout) if r[0] == "384"]
    assert [r[1] for r in rows[:4]] == ["8", "14", "16", "32"]
    # tokens: 48^2+1, 27^2+1 (384 = 27*14 + 6), 24^2+1, 12^2+1
    assert [r[2].split()[0] for r in rows[:4]] == ["2,305", "730", "577", "145"]
    # batch 8 fits at every patch: the largest batch is shown unmarked
    main, timed = rows[:4], rows[4:]
    assert all(int(r[7].replace(",", "")) >= 8 for r in main) and "does not fit" not in result.stdout
    # the step's time and throughput (a second table): patch 8 (2,305 tokens) is the slowest, 32 the fastest
    assert [r[1] for r in timed] == ["8", "14", "16", "32"]
    ms = [float(r[2].replace(",", "")) for r in timed]
    samples = [float(r[3].replace(",", "")) for r in timed]
    assert ms == sorted(ms, reverse=True) and samples == sorted(samples)
    assert words(result.stdout).count("not divisible by patch") == 1  # the one warning, for 14
    assert "not divisible by patch 14" in words(result.stdout)


def test_compare_json_six_objects_in_order():
    result = ok("compare", "--image", "224,384,512", "--patch", "16,32", "--json")
    data = json.loads(result.stdout)
    assert isinstance(data, list) and len(data) == 6
    assert [(d["inputs"]["image_h"], d["inputs"]["patch"]) for d in data] == [
        (224, 16), (224, 32), (384, 16), (384, 32), (512, 16), (512, 32)]
    # 512/32 = 16 per side: 16*16 + 1
    assert data[-1]["tokens"]["total"] == 257


# --- gpus ---------------------------------------------------------------------------------

SHIPPED = ["8xa100", "8xh100", "a100-40gb", "a100-80gb", "h100-pcie", "h100-sxm", "h200", "l40s", "rtx-pro-6000-maxq",
           "rtx3090", "rtx4090", "rtx5090"]


def test_gpus_lists_every_profile():
    out = ok("gpus").stdout
    names = [r[0] for r in table_rows(out) if r[2]]  # the display name's lines leave GB/s empty
    assert names == SHIPPED
    data = json.loads(ok("gpus", "--json").stdout)
    assert [d["name"] for d in data] == SHIPPED
    a100 = data[SHIPPED.index("a100-80gb")]
    assert a100["usable_memory_bytes"] == 85_353_955_328  # (81,920 - 512 - 8.125) MiB
    assert "a100" in a100["aliases"]


def test_gpu_profile_from_a_yaml_file(tmp_path):
    path = tmp_path / "testgpu.yaml"
    path.write_text(yaml.safe_dump(VALID_PROFILE))
    data = json.loads(ok("plan", "--gpu", str(path), "--json", "--model", "vit-ti", "--image", "64", "--patch", "16").stdout)
    assert data["gpu"]["name"] == "testgpu"
    assert data["gpu"]["requested"] == str(path)
    # (1,024 - 24 - 8) MiB = 1,040,187,392
    assert data["gpu"]["usable_memory_bytes"] == 1_040_187_392
    assert data["fits"] == (data["inputs"]["per_gpu_batch"] <= data["max_batch_size"])
    assert data["headroom_bytes"] == 1_040_187_392 - data["memory_bytes"]["peak_reserved"]
    table = ok("plan", "--gpu", str(path), "--model", "vit-ti", "--image", "64", "--patch", "16").stdout
    assert "Test GPU" in table


# --- errors: one line on stderr, nothing on stdout --------------------------------------------


def _bad_profiles(tmp_path):
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("display_name: X\nmemory_mib: [1, 2\n")
    incomplete = tmp_path / "incomplete.yaml"
    incomplete.write_text(yaml.safe_dump({k: v for k, v in VALID_PROFILE.items() if k != "matmul_efficiency"}))
    return malformed, incomplete


BAD = {
    # id: (args, exit code, fragments the one line must hold)
    "patch-0": (["plan", "--patch", "0"], 1, ["--patch 0"]),
    "patch-negative": (["plan", "--patch", "-4"], 1, ["--patch -4"]),
    "image-smaller-than-patch": (["plan", "--image", "8", "--patch", "16"], 1, ["8x8", "smaller than patch 16"]),
    "heads-not-dividing-width": (["plan", "--heads", "5"], 1, ["--heads 5", "--dim 768"]),
    "unknown-preset": (["plan", "--model", "vit-bb"], 1, ["'vit-bb'", "did you mean 'vit-b'"]),
    "unknown-gpu": (["plan", "--gpu", "a1000"], 1, ["'a1000'", "did you mean 'a100'", "vitcost gpus"]),
    "unknown-precision": (["plan", "--precision", "fp8"], 2, ["--precision", "fp8", "amp-bf16"]),
    "batch-0": (["plan", "--batch", "0"], 1, ["--batch 0"]),
    "strict-non-divisible": (["plan", "--strict", "--image", "230", "--patch", "16"], 1, ["230x230", "--strict"]),
    "image-not-a-size": (["plan", "--image", "abc"], 1, ["--image 'abc'"]),
    "compare-patch-not-a-number": (["compare", "--image", "384", "--patch", "8,x"], 2, ["--patch", "'x'"]),
    "unknown-option": (["plan", "--bogus"], 2, ["--bogus"]),
    "training-without-head": (["plan", "--classes", "0"], 1, ["--classes"]),
    "missing-profile-file": (["plan", "--gpu", "no/such/profile.yaml"], 1, ["no/such/profile.yaml"]),
    "unknown-allocator": (["plan", "--gpu", "a100", "--allocator", "cached"], 2, ["--allocator", "'cached'", "expandable"]),
    "unknown-allocator-compare": (["compare", "--patch", "16,32", "--allocator", "x"], 2, ["--allocator", "'x'"]),
}


def _assert_one_line_error(result, code, fragments):
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("args, code, fragments", list(BAD.values()), ids=list(BAD))
def test_bad_input_is_one_line_on_stderr(args, code, fragments):
    _assert_one_line_error(invoke(*args), code, fragments)


def test_malformed_yaml_profile(tmp_path):
    malformed, _ = _bad_profiles(tmp_path)
    _assert_one_line_error(invoke("plan", "--gpu", str(malformed)), 1, [str(malformed), "malformed YAML", "line"])


def test_incomplete_yaml_profile_names_file_and_key(tmp_path):
    _, incomplete = _bad_profiles(tmp_path)
    _assert_one_line_error(invoke("plan", "--gpu", str(incomplete)), 1, [str(incomplete), "'matmul_efficiency'"])


def test_profile_without_context_figures_names_file_and_key(tmp_path):
    for key in ("cuda_context_mib", "library_workspace_mib", "overheads_source"):
        path = tmp_path / f"no-{key}.yaml"
        path.write_text(yaml.safe_dump({k: v for k, v in VALID_PROFILE.items() if k != key}))
        _assert_one_line_error(invoke("plan", "--gpu", str(path)), 1, [str(path), f"missing key '{key}'"])


def test_expandable_allocator_changes_the_reserved_peak_not_the_tensors():
    native = json.loads(invoke("plan", "--gpu", "a100", "--batch", "64", "--json").stdout)
    expandable = json.loads(invoke("plan", "--gpu", "a100", "--batch", "64", "--allocator", "expandable", "--json").stdout)
    assert expandable["gpu"]["allocator"] == "expandable" and native["gpu"]["allocator"] == "native"
    assert expandable["memory_bytes"]["peak"] == native["memory_bytes"]["peak"]
    # whole segments against pages mapped as blocks reach them
    assert native["memory_bytes"]["peak_reserved"] > expandable["memory_bytes"]["peak_reserved"] >= native["memory_bytes"]["peak"]


def test_bad_input_in_compare_too(tmp_path):
    _assert_one_line_error(invoke("compare", "--image", "224,8", "--patch", "16"), 1, ["smaller than patch"])
    malformed, _ = _bad_profiles(tmp_path)
    _assert_one_line_error(invoke("compare", "--patch", "16,32", "--gpu", str(malformed)), 1, ["malformed YAML"])


def test_real_process_streams_and_exit_codes():
    """Outside the runner: ``python -m vitcost`` keeps JSON on stdout and the error on stderr."""
    good = subprocess.run([sys.executable, "-m", "vitcost", "plan", "--json", "--image", "224"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert good.returncode == 0 and good.stderr == ""
    assert json.loads(good.stdout)["params"]["total"] == 86_567_656
    bad = subprocess.run([sys.executable, "-m", "vitcost", "plan", "--patch", "0"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.splitlines() == ["Error: --patch 0: the patch size must be a positive number of pixels"]


def test_no_arguments_shows_help_without_an_empty_error():
    result = invoke()
    assert "plan" in result.stdout and "compare" in result.stdout
    assert result.stderr.strip() != "Error:"


# --- help --------------------------------------------------------------------------------------

COMMANDS = typer.main.get_command(app).commands
PURPOSE = {
    "plan": "memory of one configuration",
    "compare": "a row per combination of the lists given",
    "gpus": "GPU profiles",
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_text(name):
    command = COMMANDS[name]
    assert command.help and command.help.strip(), f"{name} has no docstring"
    result = ok(name, "--help")
    assert f"{name} [OPTIONS]" in result.stdout
    first = command.help.strip().splitlines()[0]
    assert words(first) in words(result.stdout)
    if name in PURPOSE:
        assert PURPOSE[name] in words(result.stdout)


def test_app_help_lists_every_command():
    out = ok("--help").stdout
    for name in ("plan", "compare", "gpus"):
        assert name in COMMANDS
        assert name in out


@pytest.mark.parametrize("name", ["plan", "compare"])
def test_every_option_has_help_text(name):
    command = COMMANDS[name]
    missing = [p.name for p in command.params if not getattr(p, "help", None)]
    assert missing == []


# --- torch stays out -------------------------------------------------------------------------


def test_cli_plan_does_not_import_torch():
    result = run_python(
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from vitcost.cli import app\n"
        "r = CliRunner().invoke(app, ['plan', '--image', '384', '--patch', '16', '--gpu', 'a100'])\n"
        "assert r.exit_code == 0, r.stderr\n"
        "r = CliRunner().invoke(app, ['compare', '--image', '224,384', '--patch', '16,32', '--json'])\n"
        "assert r.exit_code == 0, r.stderr\n"
        "r = CliRunner().invoke(app, ['gpus'])\n"
        "assert r.exit_code == 0, r.stderr\n"
        "print('torch' in sys.modules)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"
