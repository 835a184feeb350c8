"""Bad input, class by class: every one a single line on stderr with a non-zero exit, never a
traceback, a hang or a silently changed answer. One regression test per class; the fuzz test
(tests/test_fuzz.py) keeps the classes closed."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from vitcost.cli import app

runner = CliRunner()


def one_line_error(*args: str, code: int = 1) -> str:
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.stderr, lines
    return lines[0]


# --- non-finite, absurd and over-long numbers ---------------------------------------------------

@pytest.mark.parametrize("value", ["inf", "1e300", "nan", "-1", "65"])
def test_mlp_ratio_must_be_finite_and_sane(value):
    assert "--mlp-ratio" in one_line_error("plan", "--mlp-ratio", value)


@pytest.mark.parametrize("flag, value, bound", [
    ("--depth", "10000000", "1024"), ("--dim", "99999999", "65536"), ("--batch", "99999999999", "16777216"),
    ("--classes", "100000000000", "10000000"), ("--registers", "100000", "4096"), ("--channels", "5000", "1024"),
    ("--image", "70000", "65536"), ("--mlp-hidden", "2000000", "1048576"),
])
def test_absurd_sizes_are_errors_not_hangs(flag, value, bound):
    t0 = time.perf_counter()
    line = one_line_error("plan", flag, value)
    assert flag in line and value in line and bound in line
    assert time.perf_counter() - t0 < 5  # depth 1e7 used to run ~30 s into MemoryError


def test_a_5000_digit_image_is_one_line():
    line = one_line_error("plan", "--image", "9" * 5000)
    assert "--image" in line and "(5000 characters)" in line and len(line) < 200


def test_unicode_digits_are_not_sizes():
    assert "--image" in one_line_error("plan", "--image", "３８４")


# --- silently accepted ---------------------------------------------------------------------------

def test_an_empty_gpu_is_an_error_not_no_gpu():
    assert "--gpu ''" in one_line_error("plan", "--gpu", "")


@pytest.mark.parametrize("name, flag", [("vit_base_patch16_38", "image 38"), ("vit_small_patch15_224", "patch 15")])
def test_a_timm_name_at_an_unpublished_size_is_flagged(name, flag):
    line = one_line_error("plan", "--model", name)
    assert flag in line and "did you mean" in line and f"--{flag.split()[0]} {flag.split()[1]}" in line


def test_a_published_size_still_resolves():
    result = runner.invoke(app, ["plan", "--model", "vit_base_patch16_384", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["inputs"]["image_h"] == 384


# --- saved calibrations --------------------------------------------------------------------------

@pytest.mark.parametrize("entry, fragment", [
    ({"total_bytes": 100, "cuda_context_bytes": 1000}, "not less than total_bytes"),
    ({"total_bytes": 10**400, "cuda_context_bytes": 1}, "between 1 and 2**50"),
    ({"total_bytes": 10**400 + 1, "cuda_context_bytes": 1}, "more digits than any figure can have"),
    ({"total_bytes": "NaN", "cuda_context_bytes": 1}, "NaN is not a number"),
    ({"total_bytes": 2**60, "cuda_context_bytes": 1}, "between 1 and 2**50"),
    ({"cuda_context_bytes": 1}, "is missing 'total_bytes'"),
])
def test_a_calibration_no_gpu_can_have_is_one_line(tmp_path, monkeypatch, entry, fragment):
    path = tmp_path / "calibration.json"
    text = json.dumps({"version": 1, "profiles": {"a100-80gb": entry}})
    text = text.replace('"NaN"', "NaN").replace(str(10**400 + 1), "9" * 5000)
    path.write_text(text)
    monkeypatch.setenv("VITCOST_CALIBRATION", str(path))
    line = one_line_error("plan", "--gpu", "a100")
    assert str(path) in line and fragment in line


# --- budget, baseline and measured files --------------------------------------------------------

ENTRY = "budgets:\n  - name: a\n    model: vit-ti\n    image: 64\n"


@pytest.mark.parametrize("text, fragment", [
    (ENTRY + "    limits: {peak_memory_gib: .inf}\n", "limits.peak_memory_gib"),
    (ENTRY + "    limits: {peak_memory_gib: 1e308}\n", "limits.peak_memory_gib"),
    (ENTRY + "    limits: {peak_memory_bytes: " + "9" * 400 + "}\n", "limits.peak_memory_bytes"),
    (ENTRY + "    limits: {min_max_batch_size: " + "9" * 5000 + "}\n", "more digits than any figure can have"),
    ("budgets: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    (ENTRY + "    batch: " + "9" * 400 + "\n", "batch"),
])
def test_budget_files_with_absurd_numbers_are_one_line(tmp_path, text, fragment):
    path = tmp_path / "b.yaml"
    path.write_text(text)
    line = one_line_error("check", str(path), code=2)
    assert str(path) in line and fragment in line


def test_a_key_twice_in_a_json_budget_file_is_an_error(tmp_path):
    path = tmp_path / "b.json"
    path.write_text('{"version": 1, "version": 1, "budgets": []}')
    assert "duplicate key 'version'" in one_line_error("check", str(path), code=2)


def test_a_baseline_entry_twice_is_an_error(tmp_path):
    budget = tmp_path / "b.yaml"
    budget.write_text(ENTRY)
    baseline = tmp_path / "base.json"
    assert runner.invoke(app, ["export", str(budget), "--out", str(baseline)]).exit_code == 0
    data = json.loads(baseline.read_text())
    data["entries"] *= 2
    baseline.write_text(json.dumps(data))
    assert "baseline entry 'a' is given twice" in one_line_error("check", str(budget), "--baseline", str(baseline), code=2)


def test_a_budget_file_that_is_a_fifo_is_refused_unread(tmp_path):
    import os

    fifo = tmp_path / "b.yaml"
    os.mkfifo(fifo)
    assert "not a regular file" in one_line_error("check", str(fifo), code=2)


# --- compare's lists ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["compare", "--image", "", "--patch", "16"], "--image"),       # used to fall back to 224
    (["compare", "--image", "224,", "--patch", "16"], "--image"),
    (["compare", "--patch", "１６"], "'１６' is not a whole number"),  # plan refuses it too
    (["compare", "--patch", "9" * 5000], "(5000 characters)"),
])
def test_compare_lists_take_sizes_only(args, fragment):
    assert fragment in one_line_error(*args, code=2)


def test_a_directory_named_as_a_file_is_one_line(tmp_path):
    """os.fdopen refuses a directory with IsADirectoryError: it is checked before."""
    from typer.testing import CliRunner

    from vitcost.cli import app

    for args in (["check", str(tmp_path)], ["plan", "--gpu", str(tmp_path)], ["plan", "--hf-config", str(tmp_path)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code in (1, 2) and result.exception is None or isinstance(result.exception, SystemExit)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "not a regular file" in lines[0], (args, result.stderr)
