"""CI budgets: the file format, `vitcost export` and `vitcost check` (limits, baseline,
measured peaks, JUnit, exit codes), the docs' examples, and no torch on the way."""

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import vitcost
from vitcost.budgets import (
    GIB,
    BudgetFile,
    check,
    export,
    json_schema,
    junit_xml,
    load_budget_file,
    load_measured,
    parse_fraction,
)
from vitcost.cli import app
from vitcost.errors import BudgetFileError
from vitcost.profiles import load_profile

ROOT = Path(__file__).resolve().parent.parent

# The issue's entry: vit-b/16 at 384, batch 32, a training step on an A100 80GB.
B16 = {
    "name": "train-b16-384",
    "model": "vit-b",
    "image": 384,
    "patch": 16,
    "batch": 32,
    "mode": "train",
    "precision": "amp-bf16",
    "attention": "sdpa",
    "optimizer": "adamw",
    "gpu": "a100-80gb",
}
B16_PLAN = {k: v for k, v in B16.items() if k != "name"}


@pytest.fixture(autouse=True)
def _no_saved_calibration(tmp_path, monkeypatch):
    """Usable memory from the profile, whatever the developer's machine has saved."""
    monkeypatch.setenv("VITCOST_CALIBRATION", str(tmp_path / "no-calibration.json"))


def write(tmp_path: Path, data, name: str = "budgets.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def budgets(*entries) -> dict:
    return {"budgets": list(entries)}


def entry(limits=None, **changes) -> dict:
    return {**B16, **changes, **({"limits": limits} if limits is not None else {})}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def plan_dict(**changes) -> dict:
    return vitcost.plan(**{**B16_PLAN, **changes}).to_dict()


# --- passing and failing budgets -----------------------------------------------------------------


def test_the_issue_entry_passes_its_limits():
    result = check(ROOT / "examples" / "budgets.yaml")
    assert result.passed, [v.message for v in result.violations]
    assert [e.name for e in result.entries] == ["train-b16-384", "finetune-l16-384", "serve-clip-l14"]
    first = result.entries[0].evaluated
    assert first.report == plan_dict()  # the report is plan --json's, figure for figure
    assert first.limits.model_dump(exclude_none=True) == {
        "peak_memory_gib": 40, "must_fit": True, "max_gmacs_per_image": 60, "min_max_batch_size": 48}


def test_the_figures_quoted_in_the_example_are_current():
    text = (ROOT / "examples" / "budgets.yaml").read_text()
    for e in check(ROOT / "examples" / "budgets.yaml").entries:
        r = e.evaluated.report
        peak, usable = r["memory_bytes"]["peak"], r["gpu"]["usable_memory_bytes"]
        line = (f"#   {e.name}: peak {peak / GIB:.2f} GiB ({100 * peak / usable:.1f}% of usable), "
                f"headroom {r['headroom_bytes'] / GIB:.2f} GiB, {r['macs']['forward_per_image'] / 1e9:.2f} GMACs/image, "
                f"largest batch {r['max_batch_size']}")
        assert line in text, line


def test_example_file_exits_0_with_a_table():
    res = cli("check", ROOT / "examples" / "budgets.yaml")
    assert res.exit_code == 0, res.stderr
    assert res.stderr == ""
    assert "train-b16-384" in res.stdout and "pass" in res.stdout
    assert "passed: 3 entries within their limits" in res.stdout
    assert "Violations" not in res.stdout


def test_each_limit_broken_with_the_figures_of_plan(tmp_path):
    ref = plan_dict()
    peak = ref["memory_bytes"]["peak"]
    held = ref["memory_bytes"]["peak_reserved"]  # headroom is left at the allocator's peak
    usable = ref["gpu"]["usable_memory_bytes"]
    macs = ref["macs"]["forward_per_image"]
    largest = ref["max_batch_size"]
    assert ref["fits"]
    path = write(tmp_path, budgets(
        entry({"peak_memory_bytes": 5 * GIB, "max_gmacs_per_image": 50, "min_max_batch_size": 1000}, name="bytes"),
        entry({"peak_memory_gib": 5, "min_headroom_gib": 100}, name="gib"),
        entry({"peak_memory_percent": 5, "min_headroom_bytes": usable}, name="percent"),
    ))
    result = check(path)
    assert not result.passed
    got = {(v.entry, v.figure): (v.actual, v.limit, v.excess, v.unit) for v in result.violations}
    assert got == {
        ("bytes", "peak_memory_bytes"): (peak, 5 * GIB, peak - 5 * GIB, "bytes"),
        ("bytes", "max_gmacs_per_image"): (macs / 1e9, 50, macs / 1e9 - 50, "GMACs"),
        ("bytes", "min_max_batch_size"): (largest, 1000, 1000 - largest, "images"),
        ("gib", "peak_memory_gib"): (peak / GIB, 5, peak / GIB - 5, "GiB"),
        ("gib", "min_headroom_gib"): ((usable - held) / GIB, 100, 100 - (usable - held) / GIB, "GiB"),
        ("percent", "peak_memory_percent"): (100 * peak / usable, 5, 100 * peak / usable - 5, "%"),
        ("percent", "min_headroom_bytes"): (usable - held, usable, held, "bytes"),
    }
    assert [e.passed for e in result.entries] == [False, False, False]


def test_must_fit_fails_when_the_batch_does_not_fit(tmp_path):
    ref = plan_dict(batch=2048)
    held, usable = ref["memory_bytes"]["peak_reserved"], ref["gpu"]["usable_memory_bytes"]
    assert not ref["fits"] and held > usable
    [v] = check(write(tmp_path, budgets(entry({"must_fit": True}, batch=2048)))).violations
    assert (v.figure, v.actual, v.limit, v.excess, v.unit) == ("must_fit", held, usable, held - usable, "bytes")
    assert "does not fit" in v.message


def test_limits_exactly_at_the_figure_pass(tmp_path):
    ref = plan_dict()
    peak, usable = ref["memory_bytes"]["peak"], ref["gpu"]["usable_memory_bytes"]
    limits = {"peak_memory_bytes": peak, "min_headroom_bytes": usable - ref["memory_bytes"]["peak_reserved"],
              "min_max_batch_size": ref["max_batch_size"], "must_fit": True}
    assert check(write(tmp_path, budgets(entry(limits)))).passed


def test_failing_budget_exits_1_with_the_violations_table(tmp_path):
    path = write(tmp_path, budgets(entry({"peak_memory_gib": 5}), entry({"peak_memory_gib": 40}, name="ok")))
    res = cli("check", path)
    assert res.exit_code == 1
    assert res.stderr == ""
    assert "Violations" in res.stdout and "peak_memory_gib" in res.stdout
    assert "FAILED: 1 violation(s) in 1 of 2 entries" in res.stdout
    peak = plan_dict()["memory_bytes"]["peak"] / GIB
    assert f"train-b16-384: peak {peak:.2f} GiB exceeds the limit 5 GiB by {peak - 5:.2f} GiB" in res.stdout


def test_json_output(tmp_path):
    path = write(tmp_path, budgets(entry({"peak_memory_gib": 5}), entry({"peak_memory_gib": 40}, name="ok")))
    res = cli("check", path, "--json")
    assert res.exit_code == 1 and res.stderr == ""
    data = json.loads(res.stdout)
    assert data["schema_version"] == 1 and data["passed"] is False
    assert [(e["name"], e["passed"]) for e in data["entries"]] == [("train-b16-384", False), ("ok", True)]
    assert data["entries"][1]["report"] == plan_dict()
    [v] = data["violations"]
    assert v["entry"] == "train-b16-384" and v["figure"] == "peak_memory_gib" and v["unit"] == "GiB"
    assert v["actual"] == plan_dict()["memory_bytes"]["peak"] / GIB and v["limit"] == 5


def test_gpu_free_limits_need_no_gpu(tmp_path):
    path = write(tmp_path, budgets({"name": "cpu-only", "model": "vit-s", "batch": 4,
                                    "limits": {"peak_memory_gib": 1, "max_gmacs_per_image": 5, "must_fit": False}}))
    result = check(path)
    assert result.passed
    assert result.entries[0].evaluated.report["gpu"] is None


# --- JUnit -----------------------------------------------------------------------------------------


def test_junit_file_parsed_back(tmp_path):
    path = write(tmp_path, budgets(
        entry({"peak_memory_gib": 5, "max_gmacs_per_image": 50}, name="two-violations"),
        entry({"peak_memory_gib": 40}, name="passes"),
        entry({"min_max_batch_size": 1000}, name="one-violation"),
    ))
    report = tmp_path / "out" / "report.xml"
    report.parent.mkdir()
    res = cli("check", path, "--junit", report)
    assert res.exit_code == 1
    suite = ET.parse(report).getroot()
    assert suite.tag == "testsuite" and suite.get("name") == "vitcost"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "2", "0")
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        ("vitcost.budgets", "two-violations"), ("vitcost.budgets", "passes"), ("vitcost.budgets", "one-violation")]
    messages = {v.entry: [] for v in check(path).violations}
    for v in check(path).violations:
        messages[v.entry].append(v.message)
    two = cases[0].find("failure")
    assert two.get("message") == "; ".join(messages["two-violations"]) and len(messages["two-violations"]) == 2
    assert "peak_memory_gib" in two.text and "max_gmacs_per_image" in two.text
    assert cases[1].find("failure") is None
    assert cases[2].find("failure").get("message") == messages["one-violation"][0]


def test_junit_written_when_passing_too(tmp_path):
    report = tmp_path / "report.xml"
    assert cli("check", ROOT / "examples" / "budgets.yaml", "--junit", report).exit_code == 0
    suite = ET.parse(report).getroot()
    assert suite.get("failures") == "0" and len(suite.findall("testcase")) == 3
    assert not suite.findall("testcase/failure")


def test_junit_escapes_names_and_messages(tmp_path):
    path = write(tmp_path, budgets(entry({"peak_memory_gib": 1}, name='a<b & "c"')))
    suite = ET.fromstring(junit_xml(check(path)))
    assert suite.find("testcase").get("name") == 'a<b & "c"'


# --- export and the baseline ----------------------------------------------------------------------


def test_export_writes_plan_json_per_entry(tmp_path):
    out = tmp_path / "baseline.json"
    res = cli("export", ROOT / "examples" / "budgets.yaml", "--out", out)
    assert res.exit_code == 0 and res.stdout == ""
    assert res.stderr.strip() == f"wrote 3 entries to {out}"
    data = json.loads(out.read_text())
    assert data["schema_version"] == 1 and data["vitcost_version"] == vitcost.__version__
    first = data["entries"][0]
    assert first["name"] == "train-b16-384"
    assert first["report"] == plan_dict()
    assert first["limits"] == {"peak_memory_gib": 40, "must_fit": True, "max_gmacs_per_image": 60,
                               "min_max_batch_size": 48}
    # without --out, the same JSON on stdout
    res = cli("export", ROOT / "examples" / "budgets.yaml")
    assert res.exit_code == 0 and json.loads(res.stdout) == data


def _baseline(tmp_path, *entries) -> Path:
    out = tmp_path / "baseline.json"
    out.write_text(json.dumps(export(write(tmp_path, budgets(*entries), "old.yaml"))))
    return out


def test_regression_against_the_baseline_fails_past_the_threshold(tmp_path):
    baseline = _baseline(tmp_path, entry())
    old, new = plan_dict(), plan_dict(batch=40)
    act_old, act_new = old["memory_bytes"]["activations"], new["memory_bytes"]["activations"]
    assert act_new > act_old * 1.05  # 40 / 32: activations grow 25%
    path = write(tmp_path, budgets(entry(batch=40)))
    res = cli("check", path, "--baseline", baseline, "--max-regression", "5%")
    assert res.exit_code == 1, res.stderr
    assert "memory_bytes.activations" in res.stdout
    violations = {v.figure: v for v in check(path, baseline=baseline, max_regression=0.05).violations}
    v = violations["memory_bytes.activations (vs baseline)"]
    assert (v.actual, v.limit, v.excess, v.unit) == (act_new, act_old * 1.05, act_new - act_old * 1.05, "bytes")
    assert f"({act_old} -> {act_new} bytes)" in v.message and "more than the allowed 5%" in v.message
    assert "memory_bytes.peak (vs baseline)" in violations
    assert "macs.forward_per_image (vs baseline)" not in violations  # per image: the batch does not move it


def test_regression_below_the_threshold_passes(tmp_path):
    baseline = _baseline(tmp_path, entry())
    old, new = plan_dict()["memory_bytes"], plan_dict(batch=33)["memory_bytes"]
    assert old["activations"] < new["activations"] <= old["activations"] * 1.05  # 33 / 32: about 3%
    path = write(tmp_path, budgets(entry(batch=33)))
    assert cli("check", path, "--baseline", baseline, "--max-regression", "5%").exit_code == 0
    assert cli("check", path, "--baseline", baseline, "--max-regression", "0.05").exit_code == 0
    # the default allows no growth at all
    res = cli("check", path, "--baseline", baseline)
    assert res.exit_code == 1 and "memory_bytes.activations" in res.stdout


def test_regression_in_macs_from_a_larger_image(tmp_path):
    baseline = _baseline(tmp_path, entry())
    result = check(write(tmp_path, budgets(entry(image=448))), baseline=baseline, max_regression=0.05)
    figures = {v.figure for v in result.violations}
    assert "macs.forward_per_image (vs baseline)" in figures
    assert "memory_bytes.activations (vs baseline)" in figures


def test_an_entry_missing_from_the_baseline_is_a_note(tmp_path):
    baseline = _baseline(tmp_path, entry())
    path = write(tmp_path, budgets(entry(), entry(name="new-entry")))
    res = cli("check", path, "--baseline", baseline, "--json")
    assert res.exit_code == 0
    notes = json.loads(res.stdout)["notes"]
    assert any("'new-entry' is not in the baseline" in n for n in notes)


def test_check_json_is_accepted_as_a_baseline(tmp_path):
    path = write(tmp_path, budgets(entry()))
    res = cli("check", path, "--json")
    baseline = tmp_path / "check.json"
    baseline.write_text(res.stdout)
    assert cli("check", path, "--baseline", baseline).exit_code == 0


@pytest.mark.parametrize("text, value", [("5%", 0.05), ("0.05", 0.05), ("0", 0.0), ("12.5%", 0.125), (" 1 ", 1.0)])
def test_parse_fraction(text, value):
    assert parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["5", "-1%", "five", "nan", ""])
def test_parse_fraction_refuses(text):
    with pytest.raises(ValueError):
        parse_fraction(text)


@pytest.mark.parametrize("args, fragment", [
    (["--max-regression", "5"], "write 5% for 5 percent"),
    (["--max-regression", "lots"], "expected a percentage"),
])
def test_bad_max_regression_exits_2(tmp_path, args, fragment):
    baseline = _baseline(tmp_path, entry())
    res = cli("check", write(tmp_path, budgets(entry())), "--baseline", baseline, *args)
    assert res.exit_code == 2 and res.stdout == ""
    assert fragment in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_max_regression_needs_a_baseline(tmp_path):
    res = cli("check", write(tmp_path, budgets(entry())), "--max-regression", "5%")
    assert res.exit_code == 2 and "needs --baseline" in res.stderr


@pytest.mark.parametrize("content, fragment", [
    ("{", "malformed JSON"),
    ('{"rows": []}', "expected an object with an 'entries' list"),
    ('{"entries": [{"name": "x"}]}', "baseline entry #1: expected an object with 'name' and 'report'"),
    ('{"entries": [{"name": "x", "report": {"memory_bytes": {}}}]}', "baseline entry 'x': report.memory_bytes.peak: missing"),
])
def test_malformed_baseline_exits_2(tmp_path, content, fragment):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(content)
    res = cli("check", write(tmp_path, budgets(entry())), "--baseline", baseline)
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.startswith(f"Error: {baseline}: ") and fragment in res.stderr


# --- malformed budget files: exit 2, one line naming file, entry and field -------------------------

MALFORMED = [
    ("bad-yaml", "budgets:\n  - name: a\n    image: [384\n", "malformed YAML at line 4"),
    ("duplicate-key", "budgets:\n  - name: a\n    batch: 8\n    batch: 16\n", "malformed YAML at line 4: duplicate key 'batch'"),
    ("unknown-top-key", "budget:\n  - name: a\n", "budget: unknown key; did you mean 'budgets'?"),
    ("unknown-entry-key", {"budgets": [{"name": "a", "imgae": 384}]}, "entry 'a': imgae: unknown key; did you mean 'image'?"),
    ("unknown-limits-key", {"budgets": [{"name": "a", "limits": {"peak_gib": 3}}]},
     "entry 'a': limits.peak_gib: unknown key; did you mean 'peak_memory_gib'?"),
    ("unknown-gpu", {"budgets": [{"name": "x", "gpu": "a1000"}]}, "entry 'x': gpu: unknown GPU profile 'a1000'; did you mean"),
    ("missing-gpu-file", {"budgets": [{"name": "x", "gpu": "profiles/none.yaml"}]}, "entry 'x': gpu: profile file not found"),
    ("negative-limit", {"budgets": [{"name": "train-b16-384", "limits": {"peak_memory_gib": -1}}]},
     "entry 'train-b16-384': limits.peak_memory_gib: Input should be greater than or equal to 0"),
    ("negative-batch-limit", {"budgets": [{"name": "a", "gpu": "a100", "limits": {"min_max_batch_size": -3}}]},
     "entry 'a': limits.min_max_batch_size: Input should be greater than or equal to 0"),
    ("percent-zero", {"budgets": [{"name": "a", "gpu": "a100", "limits": {"peak_memory_percent": 0}}]},
     "entry 'a': limits.peak_memory_percent: Input should be greater than 0"),
    ("percent-over-100", {"budgets": [{"name": "a", "gpu": "a100", "limits": {"peak_memory_percent": 150}}]},
     "entry 'a': limits.peak_memory_percent: Input should be less than or equal to 100"),
    ("duplicate-names", {"budgets": [{"name": "a"}, {"name": "a"}]}, "duplicate entry name 'a' (entries 1 and 2)"),
    ("gpu-limit-without-gpu", {"budgets": [{"name": "a", "limits": {"must_fit": True}}]},
     "entry 'a': limits.must_fit needs a GPU"),
    ("headroom-without-gpu", {"budgets": [{"name": "a", "limits": {"min_headroom_gib": 1}}]},
     "entry 'a': limits.min_headroom_gib needs a GPU"),
    ("bytes-and-gib", {"budgets": [{"name": "a", "limits": {"peak_memory_gib": 1, "peak_memory_bytes": 1}}]},
     "entry 'a': limits: give peak_memory_bytes or peak_memory_gib, not both"),
    ("unknown-model", {"budgets": [{"name": "a", "model": "vit-q"}]}, "entry 'a': model: unknown model 'vit-q'"),
    ("impossible-config", {"budgets": [{"name": "a", "heads": 5}]}, "entry 'a': --heads 5 does not divide --dim 768"),
    ("bad-enum", {"budgets": [{"name": "a", "precision": "fp8"}]}, "entry 'a': precision: Input should be"),
    ("string-batch", {"budgets": [{"name": "a", "batch": "32"}]}, "entry 'a': batch: Input should be a valid integer"),
    ("bad-image", {"budgets": [{"name": "a", "image": "384x0"}]}, "entry 'a': image: expected a size like 384"),
    ("string-bool", {"budgets": [{"name": "a", "gpu": "a100", "limits": {"must_fit": "yes"}}]},
     "entry 'a': limits.must_fit: Input should be a valid boolean"),
    ("no-name", {"budgets": [{"model": "vit-b"}]}, "entry #1: name: missing key"),
    ("empty-list", {"budgets": []}, "budgets: List should have at least 1 item"),
    ("not-a-mapping", "- a\n", "expected a mapping with a 'budgets' list, got a list"),
    ("empty-file", "", "expected a mapping with a 'budgets' list, got an empty file"),
]


@pytest.mark.parametrize("case, content, fragment", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_exits_2_with_one_line(tmp_path, case, content, fragment):
    path = write(tmp_path, content)
    for command in ("check", "export"):
        res = cli(command, path)
        assert res.exit_code == 2, (command, res.stdout, res.stderr)
        assert res.stdout == ""
        assert res.stderr.startswith(f"Error: {path}: "), res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert fragment in res.stderr, res.stderr
    with pytest.raises(BudgetFileError):
        check(path)


def test_malformed_json_budget_file(tmp_path):
    path = write(tmp_path, '{"budgets": [\n', "budgets.json")
    res = cli("check", path)
    assert res.exit_code == 2 and res.stderr.startswith(f"Error: {path}: malformed JSON at line 2")


def test_json_budget_file_is_accepted(tmp_path):
    path = write(tmp_path, json.dumps(budgets(entry({"peak_memory_gib": 40}))), "budgets.json")
    assert cli("check", path).exit_code == 0


def test_missing_file_exits_2(tmp_path):
    res = cli("check", tmp_path / "nope.yaml")
    assert res.exit_code == 2 and res.stderr.strip() == f"Error: {tmp_path / 'nope.yaml'}: file not found"


def test_gpu_path_is_relative_to_the_budget_file(tmp_path, monkeypatch):
    (tmp_path / "cfg" / "profiles").mkdir(parents=True)
    shutil.copy(load_profile("a100-80gb").path, tmp_path / "cfg" / "profiles" / "mine.yaml")
    path = write(tmp_path / "cfg", budgets(entry({"must_fit": True}, gpu="profiles/mine.yaml")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = check(path)
    assert result.passed
    report = result.entries[0].evaluated.report
    assert report["gpu"]["name"] == "mine"
    assert report["memory_bytes"] == plan_dict()["memory_bytes"]


def test_the_version_key(tmp_path):
    assert load_budget_file(write(tmp_path, {"version": 1, **budgets({"name": "a"})})).version == 1
    res = cli("check", write(tmp_path, {"version": 2, **budgets({"name": "a"})}))
    assert res.exit_code == 2 and "version: Input should be 1" in res.stderr


# --- measured peaks ------------------------------------------------------------------------------


def _measured(tmp_path, rows, wrap=True) -> Path:
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"rows": rows, "device": "NVIDIA A100"} if wrap else rows))
    return path


def test_measured_peak_over_the_limit_fails(tmp_path):
    path = write(tmp_path, budgets(entry({"peak_memory_gib": 10, "min_headroom_gib": 70}),
                                   entry({"peak_memory_gib": 10}, name="by-inputs", batch=16)))
    usable = plan_dict()["gpu"]["usable_memory_bytes"]
    measured = _measured(tmp_path, [
        {"name": "train-b16-384", "measured": {"peak_bytes": 12 * GIB}},
        # matched by inputs: calibrate's rows carry the inputs it ran
        {"inputs": {"model": "VIT_B", "image_h": 384, "image_w": 384, "patch": 16, "batch": 16,
                    "precision": "amp-bf16", "mode": "train"}, "measured": {"peak_bytes": 3 * GIB}},
        {"model": "vit-l", "image": "384", "patch": 16, "batch": 99, "measured": {"peak_bytes": 1}},
    ])
    result = check(path, measured=measured)
    got = {(v.entry, v.figure): (v.actual, v.limit) for v in result.violations}
    assert got == {
        ("train-b16-384", "measured peak_memory_gib"): (12, 10),
        ("train-b16-384", "measured min_headroom_gib"): ((usable - 12 * GIB) / GIB, 70),
    }
    assert [e.measured_peak_bytes for e in result.entries] == [12 * GIB, 3 * GIB]
    assert "measured row 3 matches no entry: ignored" in result.notes
    res = cli("check", path, "--measured", measured)
    assert res.exit_code == 1
    assert "measured peak_memory_gib" in res.stdout and "measured" in res.stdout


def test_measured_peak_within_limits_passes(tmp_path):
    path = write(tmp_path, budgets(entry({"peak_memory_gib": 10, "must_fit": True})))
    measured = _measured(tmp_path, [
        {"model": "vit-b", "image": 384, "patch": 16, "batch": 32, "precision": "amp-bf16", "mode": "train",
         "measured": {"peak_bytes": 8 * GIB}},
        {"model": "vit-b", "image": 384, "patch": 16, "batch": 32, "measured": {"peak_bytes": 9 * GIB}},
    ], wrap=False)
    res = cli("check", path, "--measured", measured, "--json")
    assert res.exit_code == 0, res.stdout
    data = json.loads(res.stdout)
    assert data["entries"][0]["measured_peak_bytes"] == 9 * GIB  # the largest of the matching rows
    assert any("2 measured rows" in n for n in data["notes"])


def test_an_entry_without_a_measurement_is_a_note(tmp_path):
    path = write(tmp_path, budgets(entry({"peak_memory_gib": 10})))
    result = check(path, measured=_measured(tmp_path, []))
    assert result.passed and "entry 'train-b16-384': no measured peak" in result.notes


def _calibrate_row(status="ok", peak=None, **changes) -> dict:
    """A row shaped like ``vitcost calibrate --out``'s: the report's inputs, a status, and
    the measured figures (null when the step did not run)."""
    return {"inputs": plan_dict(**changes)["inputs"], "method": "measured", "device": "cuda", "status": status,
            "predicted": {"peak_bytes": 1}, "measured": None if peak is None else {"peak_bytes": peak},
            "figures": [], "warnings": []}


def test_calibrate_rows_are_matched_by_their_inputs(tmp_path):
    path = write(tmp_path, budgets(entry({"peak_memory_gib": 10}), entry({"peak_memory_gib": 10}, name="b16", batch=16)))
    measured = _measured(tmp_path, [
        _calibrate_row(peak=11 * GIB),
        _calibrate_row(peak=1 * GIB, batch=16, device="cpu"),  # CPU rules: not the entry's configuration
        _calibrate_row(peak=2 * GIB, batch=16, attention="eager"),
    ])
    result = check(path, measured=measured)
    assert [(v.entry, v.figure, v.actual) for v in result.violations] == [
        ("train-b16-384", "measured peak_memory_gib", 11)]
    assert [e.measured_peak_bytes for e in result.entries] == [11 * GIB, None]
    assert "measured row 2 matches no entry: ignored" in result.notes
    assert "measured row 3 matches no entry: ignored" in result.notes


def test_a_measured_out_of_memory_breaks_must_fit(tmp_path):
    path = write(tmp_path, budgets(entry({"must_fit": True}), entry({"peak_memory_gib": 40}, name="no-must-fit", batch=48)))
    measured = _measured(tmp_path, [_calibrate_row(status="out of memory"),
                                    {**_calibrate_row(status="out of memory"), "name": "no-must-fit"},
                                    _calibrate_row(status="not run", batch=64)])
    res = cli("check", path, "--measured", measured, "--json")
    assert res.exit_code == 1, res.stdout
    data = json.loads(res.stdout)
    [v] = data["violations"]
    assert (v["entry"], v["figure"], v["actual"], v["excess"]) == ("train-b16-384", "measured must_fit", None, None)
    assert v["limit"] == plan_dict()["gpu"]["usable_memory_bytes"] and "ran out of memory (row 1)" in v["message"]
    assert "entry 'no-must-fit': out of memory in measured row 2 (set must_fit: true to fail on it)" in data["notes"]
    assert "measured row 3 matches no entry: ignored" in data["notes"]
    res = cli("check", path, "--measured", measured)
    assert res.exit_code == 1 and "measured must_fit" in res.stdout


@pytest.mark.parametrize("content, fragment", [
    ("not json", "malformed JSON"),
    ('[{"name": "a", "status": "ok", "measured": null}]', "row 1: measured.peak_bytes"),
    ('[{"name": "a", "status": 3, "measured": null}]', "row 1: status: expected a string"),
    ('{"results": []}', "expected a list of rows or an object with a 'rows' list"),
    ('[1]', "row 1: expected an object"),
    ('[{"name": "a"}]', "row 1: measured.peak_bytes: expected a whole number"),
    ('[{"name": "a", "measured": {"peak_bytes": -5}}]', "row 1: measured.peak_bytes"),
    ('[{"name": "a", "measured": {"peak_bytes": 1.5e9}}]', "row 1: measured.peak_bytes"),
    ('[{"batch": 8, "measured": {"peak_bytes": 5}}]', "row 1: needs a 'name' or the inputs"),
    ('[{"model": "vit-b", "image": "big", "measured": {"peak_bytes": 5}}]', "row 1: image: expected a size"),
])
def test_malformed_measured_file_exits_2(tmp_path, content, fragment):
    measured = tmp_path / "calibration.json"
    measured.write_text(content)
    res = cli("check", write(tmp_path, budgets(entry())), "--measured", measured)
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.startswith(f"Error: {measured}: ") and fragment in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


# --- the schema, the docs, help, no torch ---------------------------------------------------------


def test_committed_json_schema_matches_the_model():
    committed = json.loads((ROOT / "docs" / "budgets.schema.json").read_text())
    assert committed == json_schema(), "regenerate: python -m vitcost.budgets > docs/budgets.schema.json"
    assert committed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    entry_props = committed["$defs"]["BudgetEntry"]["properties"]
    assert committed["$defs"]["BudgetEntry"]["additionalProperties"] is False
    assert committed["$defs"]["Limits"]["additionalProperties"] is False
    assert set(entry_props) == set(BudgetFile.model_fields["budgets"].annotation.__args__[0].model_fields)


def test_every_key_is_documented():
    doc = (ROOT / "docs" / "ci.md").read_text()
    from vitcost.budgets import BudgetEntry, Limits

    for key in [*BudgetEntry.model_fields, *Limits.model_fields, *BudgetFile.model_fields]:
        assert f"`{key}`" in doc, key


def _blocks(lang: str) -> list[str]:
    doc = (ROOT / "docs" / "ci.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", doc, re.S)


def test_the_documented_budget_file_passes(tmp_path):
    first = _blocks("yaml")[0]
    path = write(tmp_path, first)
    assert check(path).passed
    # and it is the example's first entry
    example = yaml.safe_load((ROOT / "examples" / "budgets.yaml").read_text())["budgets"][0]
    assert yaml.safe_load(first)["budgets"][0] == example


def test_the_documented_measured_file_is_accepted(tmp_path):
    measured_doc = next(b for b in _blocks("json") if '"rows"' in b)
    measured = tmp_path / "calibration.json"
    measured.write_text(measured_doc)
    rows = load_measured(measured)
    assert [r.name for r in rows] == ["train-b16-384", None]
    result = check(ROOT / "examples" / "budgets.yaml", measured=measured)
    assert result.entries[0].measured_peak_bytes == 7712000000


def test_the_documented_ci_configs_parse():
    workflow, precommit = (yaml.safe_load(b) for b in _blocks("yaml")[1:3])
    steps = workflow["jobs"]["budgets"]["steps"]
    run = " ".join(s.get("run", "") for s in steps)
    assert "python -m vitcost check budgets.yaml" in run and "--junit" in run and "torch" not in run
    hook = precommit["repos"][0]["hooks"][0]
    assert precommit["repos"][0]["repo"] == "local" and hook["entry"] == "vitcost check budgets.yaml"


@pytest.mark.parametrize("command", ["export", "check"])
def test_help(command):
    res = cli(command, "--help")
    assert res.exit_code == 0 and "BUDGETS" in res.stdout


def test_check_does_not_import_torch():
    code = (
        "import sys\n"
        "from vitcost.cli import app\n"
        "try:\n"
        "    app(['check', 'examples/budgets.yaml', '--json'], prog_name='vitcost')\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print('torch' in sys.modules, code, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip().splitlines()[-1] == "False 0", proc.stderr
    assert json.loads(proc.stdout)["passed"] is True


def test_budgets_module_is_pure():
    code = "import sys, vitcost.budgets; print(sorted(m for m in ('torch', 'typer', 'rich') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_the_schema_agrees_with_the_model(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema())
    jsonschema.Draft202012Validator.check_schema(json_schema())
    assert not list(validator.iter_errors(yaml.safe_load((ROOT / "examples" / "budgets.yaml").read_text())))
    structural = ("unknown-top-key", "unknown-entry-key", "unknown-limits-key", "negative-limit", "percent-zero",
                  "percent-over-100", "gpu-limit-without-gpu", "headroom-without-gpu", "bytes-and-gib", "bad-enum",
                  "string-batch", "string-bool", "no-name", "empty-list")
    for case, content, _ in MALFORMED:
        if case in structural:  # the rest need a parser, the profiles or the presets to tell
            data = yaml.safe_load(content) if isinstance(content, str) else content
            assert list(validator.iter_errors(data)), case


def test_a_real_calibrate_out_file_gates(tmp_path):
    """The contract with ``vitcost calibrate --out``: its JSON, as written, feeds --measured."""
    pytest.importorskip("torch")
    calibrate = pytest.importorskip("vitcost.calibrate")
    config = {"model": "vit-ti", "image": 64, "patch": 16, "batch": 2, "precision": "fp32"}
    run = calibrate.calibrate(**config, device="cpu")
    measured = tmp_path / "calibration.json"
    measured.write_text(json.dumps(run.to_dict()))
    peak = run.to_dict()["rows"][0]["measured"]["peak_bytes"]
    path = write(tmp_path, budgets({"name": "tiny", **config, "device": "cpu",
                                    "limits": {"peak_memory_bytes": peak - 1}}))
    result = check(path, measured=measured)
    assert result.entries[0].measured_peak_bytes == peak
    assert ("measured peak_memory_bytes", peak, peak - 1) in [(v.figure, v.actual, v.limit) for v in result.violations]
