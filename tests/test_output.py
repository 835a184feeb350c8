"""What the command line writes: tables at 80 columns and COLUMNS, control characters from
users' files, exit codes of output paths and of a calibration the RAM guard held back,
--version and -h, help defaults, one-line usage errors, install hints."""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import typer.main
import yaml
from typer.testing import CliRunner

import vitcost
from vitcost.cli import app
from vitcost.render import fmt_bytes

from conftest import REPO, TEST_PROFILE, run_python

COMMANDS = sorted(typer.main.get_command(app).commands)
ESC = "\x1b"
# every control character the terminal must not get but the line breaks rich writes: C0 (ESC
# among them), DEL, C1
CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def invoke(*args: str, columns: str | None = None):
    return CliRunner(env={"COLUMNS": columns}).invoke(app, [str(a) for a in args])


def ok(*args: str, columns: str | None = None):
    result = invoke(*args, columns=columns)
    assert result.exit_code == 0, result.stderr + result.stdout
    return result


def one_line_error(result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def cells(text: str) -> set[str]:
    """Every cell line of the tables in ``text``: each line of a table body split at its bars."""
    return {c.strip() for line in text.splitlines() if "│" in line for c in line.split("│")} - {""}


def words(text: str) -> str:
    return " ".join(text.split())


def help_words(text: str) -> str:
    """Help text with its panels' box drawing gone and every wrap made one space."""
    return words(re.sub("[│╭╮╰╯─]", " ", text))


def assert_fits(out: str, width: int) -> None:
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= width, max(lines, key=len)
    assert "…" not in out  # nothing cut with an ellipsis


# --- 6. tables at 80 columns; COLUMNS honoured -----------------------------------------------


def test_plan_at_80_columns_keeps_every_figure_whole():
    args = ["plan", "--image", "384", "--patch", "16", "--gpu", "a100"]
    out = ok(*args, columns="80").stdout
    assert_fits(out, 80)
    data = json.loads(ok(*args, "--json").stdout)
    got = cells(out)
    t, a, m = data["tokens"], data["attention_maps"], data["memory_bytes"]
    expected = [f"{t['grid_h']} x {t['grid_w']}", f"{t['patches']:,}", f"{t['total']:,}",
                f"{a['elements_per_head']:,} elements", f"{a['elements_per_layer']:,} elements"]
    expected += [f"{v:,}" for v in data["params"].values()]
    usable = data['gpu']['usable_memory_bytes']
    at = data["memory_bytes_at_peak"]
    for key, size in (("weights", "weights"), ("gradients", "gradients"), ("optimizer_states", "optimizer_states"),
                      ("inputs", "inputs"), ("saved", "activations"), ("autocast_copies", "autocast_weight_copies")):
        expected += [f"{m[size]:,}", f"{at[key]:,}", fmt_bytes(at[key]), f"{100 * at[key] / usable:.1f}%"]
    for key in ("peak", "peak_reserved"):
        expected += [f"{m[key]:,}", fmt_bytes(m[key]), f"{100 * m[key] / usable:.1f}%"]
    missing = [e for e in expected if e not in got]
    assert missing == []
    assert f"largest batch that fits: {data['max_batch_size']:,}" in out


def test_compare_at_80_columns_keeps_every_figure_and_ratio_whole():
    args = ["compare", "--patch", "8,14,16,32", "--image", "224,384", "--gpu", "a100"]
    out = ok(*args, columns="80").stdout
    assert_fits(out, 80)
    reports = json.loads(ok(*args, "--json").stdout)
    assert len(reports) == 8
    got = cells(out)
    base = reports[0]

    def figures(r: dict) -> list[tuple[float, str]]:
        return [(r["tokens"]["total"], f"{r['tokens']['total']:,}"),
                (r["attention_maps"]["elements_per_head"], f"{r['attention_maps']['elements_per_head']:,}"),
                (r["macs"]["forward_per_image"], f"{r['macs']['forward_per_image'] / 1e9:.2f}"),
                (r["memory_bytes"]["activations"], fmt_bytes(r["memory_bytes"]["activations"])),
                (r["memory_bytes"]["peak"], fmt_bytes(r["memory_bytes"]["peak"]))]

    expected = []
    for r in reports:
        expected += [str(r["inputs"]["image_h"]), str(r["inputs"]["patch"]),
                     f"{r['max_batch_size']:,}" + ("" if r["fits"] else " x")]
        t = r["time"]  # the second table: time per step and samples/s, ratios to the first row
        expected += [f"{t['step_seconds'] * 1e3:,.1f}", f"{t['samples_per_s']:,.0f}", f"{t['mfu']:.0%}"]
        if r is not base:
            expected += [f"{t['step_seconds'] / base['time']['step_seconds']:.3g}x",
                         f"{t['samples_per_s'] / base['time']['samples_per_s']:.3g}x"]
        for (value, text), (ref, _) in zip(figures(r), figures(base)):
            expected.append(text)
            if r is not base:
                expected.append(f"{value / ref:.3g}x")
    missing = [e for e in expected if e not in got]
    assert missing == []


def test_gpus_at_80_columns_keeps_every_name_and_figure_whole():
    out = ok("gpus", columns="80").stdout
    assert_fits(out, 80)
    profiles = json.loads(ok("gpus", "--json").stdout)
    got = cells(out)
    # two A100 profiles once showed as "a100-…": every name is a cell of its own
    for p in profiles:
        for text in (p["name"], fmt_bytes(int(p["memory_mib"] * 2**20)), fmt_bytes(p["usable_memory_bytes"]),
                     f"{p['memory_bandwidth_gb_per_s']:g}", f"{p['dense_tflops']['bf16']:g}",
                     f"{p['dense_tflops']['fp32']:g}", f"{p['interconnect']['gb_per_s_per_direction']:g}"):
            assert text in got, (p["name"], text)
    # display names wrap at spaces, never inside a word
    table_words = " ".join(got).split()
    for p in profiles:
        for word in p["display_name"].split():
            assert word in table_words, (p["name"], word)
    # the aliases follow the table: each one whole, on its profile's line
    alias_words = [w.strip(",:") for w in out.split("aliases", 1)[1].split()]
    for p in profiles:
        assert p["name"] in alias_words
        for alias in p["aliases"]:
            assert alias in alias_words, alias


def test_piped_output_is_120_wide_unless_columns_says_otherwise():
    args = ["plan", "--image", "384", "--patch", "16", "--gpu", "a100"]
    widths = {}
    for columns in (None, "100", "80"):
        out = ok(*args, columns=columns).stdout
        widths[columns] = max(len(line) for line in out.splitlines())
    # the header line alone is longer than 120 characters: it is wrapped at whatever width there is
    assert 110 < widths[None] <= 120 and 90 < widths["100"] <= 100 and 70 < widths["80"] <= 80


def test_calibrate_table_at_80_columns():
    pytest.importorskip("torch")
    flags = ["--dim", "64", "--depth", "2", "--heads", "2", "--mlp-hidden", "256", "--classes", "10",
             "--image", "64", "--patch", "16", "--precision", "fp32", "--device", "cpu", "--batch", "2"]
    res = invoke("calibrate", *flags, columns="80")
    assert res.exit_code == 0, res.stderr
    assert_fits(res.stdout, 80)
    peak = vitcost.plan(None, batch=2, precision="fp32", device="cpu", image=64, patch=16, dim=64, depth=2,
                        heads=2, mlp_hidden=256, classes=10).memory.peak
    # a byte figure and its size each whole, on lines of their own
    assert {f"{peak:,}", f"({fmt_bytes(peak)})", "forward MACs per", "image"} <= cells(res.stdout)
    # where there is room, on one line
    wide = invoke("calibrate", *flags).stdout
    assert f"{peak:,} ({fmt_bytes(peak)})" in cells(wide)


def test_check_table_at_80_columns():
    out = invoke("check", REPO / "examples" / "budgets.yaml", columns="80").stdout
    assert_fits(out, 80)
    assert {"train-b16-384", "finetune-l16-384", "serve-clip-l14"} <= cells(out)


# --- 7. control characters from users' files ---------------------------------------------------


def _profile(tmp_path: Path, display_name: str) -> Path:
    path = tmp_path / "mygpu.yaml"
    path.write_text(yaml.safe_dump({**TEST_PROFILE, "display_name": display_name}))
    return path


def test_profile_display_name_control_characters_are_escaped(tmp_path):
    bad = "bad\x1b[31mred\x07\x7f\x85"
    path = _profile(tmp_path, bad)
    out = ok("plan", "--model", "vit-ti", "--image", "64", "--gpu", path).stdout
    assert not CONTROL.search(out), repr(out)
    assert "FITS on bad\\x1b[31mred\\x07\\x7f\\x85:" in out
    # JSON keeps the name as it is (json escapes it itself)
    data = json.loads(ok("plan", "--model", "vit-ti", "--image", "64", "--gpu", path, "--json").stdout)
    assert data["gpu"]["display_name"] == bad


def test_profile_file_name_control_characters_are_escaped(tmp_path):
    """The profile's name is its file's: plan's and compare's headers name it."""
    path = tmp_path / "my\x1b[31mgpu.yaml"
    path.write_text(yaml.safe_dump(TEST_PROFILE))
    for command in (["plan"], ["compare", "--patch", "16,32"]):
        out = ok(*command, "--model", "vit-ti", "--image", "64", "--gpu", path).stdout
        assert not CONTROL.search(out), repr(out)
        assert "-> my\\x1b[31mgpu" in words(out)


def test_profile_display_name_is_not_rich_markup(tmp_path):
    path = _profile(tmp_path, "[bold red]Loud[/] GPU")
    out = ok("plan", "--model", "vit-ti", "--image", "64", "--gpu", path).stdout
    assert "[bold red]Loud[/] GPU" in out


def test_gpu_argument_with_control_characters_stays_one_line():
    line = one_line_error(invoke("plan", "--gpu", "a1\x1b[2J\n00"), 1)
    assert ESC not in line


def _budget_file(tmp_path: Path, name: str, limits: dict) -> Path:
    path = tmp_path / "budgets.yaml"
    entry = {"name": name, "model": "vit-b", "image": 224, "patch": 16, "batch": 8, "gpu": "a100-80gb",
             "limits": limits}
    path.write_text(yaml.safe_dump({"budgets": [entry, {**entry, "name": "plain"}]}))
    return path


@pytest.mark.parametrize("limits, code", [({"peak_memory_gib": 0.5}, 1), ({"peak_memory_gib": 40}, 0)],
                         ids=["failing", "passing"])
def test_budget_entry_name_with_control_characters(tmp_path, limits, code):
    from vitcost.render import escape_control

    name = "bad\x1b[31m\x00\x08\x0b\x7f\x85[red]x\nname"
    path = _budget_file(tmp_path, name, limits)
    report = tmp_path / "report.xml"
    result = invoke("check", path, "--junit", report)
    assert result.exit_code == code, result.stderr
    shown = escape_control(name)
    assert shown == "bad\\x1b[31m\\x00\\x08\\x0b\\x7f\\x85[red]x\\x0aname"
    # the terminal gets no control character, and the name as written (not as rich markup)
    assert not CONTROL.search(result.stdout), repr(result.stdout)
    assert shown in cells(result.stdout)
    # the JUnit report parses, and names the entry as the terminal shows it
    suite = ET.fromstring(report.read_text(encoding="utf-8"))
    names = [c.get("name") for c in suite.findall("testcase")]
    assert names == [shown, "plain"]
    if code:
        failure = suite.find("testcase/failure")
        assert failure is not None and not CONTROL.search(failure.get("message"))


def test_budget_entry_name_in_json_is_unchanged(tmp_path):
    name = "bad\x1bname"
    path = _budget_file(tmp_path, name, {"peak_memory_gib": 40})
    data = json.loads(ok("check", path, "--json").stdout)
    assert data["entries"][0]["name"] == name


# --- 1. an unwritable output path is a usage error ---------------------------------------------


def test_junit_to_an_unwritable_path_exits_2(tmp_path):
    report = tmp_path / "no" / "such" / "dir" / "report.xml"
    one_line_error(invoke("check", REPO / "examples" / "budgets.yaml", "--junit", report), 2,
                   "--junit", str(report), "cannot be written")
    # a broken budget does not change it: the report could not be written either way
    path = _budget_file(tmp_path, "over", {"peak_memory_gib": 0.5})
    one_line_error(invoke("check", path, "--junit", report), 2, "--junit")


def test_export_out_to_an_unwritable_path_exits_2(tmp_path):
    out = tmp_path / "missing" / "baseline.json"
    res = invoke("export", REPO / "examples" / "budgets.yaml", "--out", out)
    assert res.exit_code == 2 and res.stderr.splitlines() == [
        f"Error: --out {out}: cannot be written (No such file or directory)"]


# --- 2. calibrate: a step the RAM guard held back is not a pass -------------------------------


TINY_FLAGS = ["--dim", "64", "--depth", "2", "--heads", "2", "--mlp-hidden", "256", "--classes", "10",
              "--image", "64", "--patch", "16", "--precision", "fp32", "--device", "cpu"]


def test_calibrate_not_measured_exits_1(monkeypatch):
    pytest.importorskip("torch")
    import vitcost.calibrate

    monkeypatch.setattr(vitcost.calibrate, "_available_ram", lambda: 1024)  # 1 KiB free: nothing runs
    res = invoke("calibrate", *TINY_FLAGS, "--batch", "2")
    assert res.exit_code == 1, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: 1 of 1 configuration(s) not measured: ")
    assert "--meta traces it" in lines[0]
    assert "not run" in res.stdout  # the table still says what happened
    # a sweep where one step ran and one was held back fails too
    monkeypatch.setattr(vitcost.calibrate, "_available_ram", lambda: 64 * 2**20)
    res = invoke("calibrate", *TINY_FLAGS, "--batch", "1,100000", "--json")
    assert res.exit_code == 1, res.stderr
    assert [r["status"] for r in json.loads(res.stdout)["rows"]] == ["ok", "not run"]
    assert "1 of 2 configuration(s) not measured" in res.stderr


def test_calibrate_measured_still_exits_0():
    pytest.importorskip("torch")
    res = invoke("calibrate", *TINY_FLAGS, "--batch", "2")
    assert res.exit_code == 0, res.stderr
    assert res.stderr == ""


# --- 3. --version and -h ------------------------------------------------------------------------


def test_version():
    res = ok("--version")
    assert res.stdout == f"vitcost {vitcost.__version__}\n"
    assert res.stdout == f"vitcost {pyproject()['version']}\n" == "vitcost 0.1.0\n"


def test_version_from_python_dash_m():
    import subprocess

    res = subprocess.run([sys.executable, "-m", "vitcost", "--version"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and res.stdout == "vitcost 0.1.0\n" and res.stderr == ""


def test_dash_h_is_help_for_the_app():
    assert ok("-h").stdout == ok("--help").stdout
    assert "Usage:" in ok("-h").stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_dash_h_is_help_for_every_command(name):
    short = ok(name, "-h").stdout
    assert f"{name} [OPTIONS]" in short
    assert short == ok(name, "--help").stdout


# --- 4. help shows the defaults -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["plan", "compare", "calibrate"])
def test_help_shows_model_image_patch_defaults(name):
    text = help_words(ok(name, "--help").stdout)
    assert "[default: (224, or the model name's)]" in text
    assert "[default: (16, or the model name's)]" in text
    assert "[default: (vit-b)]" in text


def test_calibrate_steps_help_keeps_its_default():
    text = help_words(ok("calibrate", "--help").stdout)
    assert "Warm-up steps before the measured one. [default: (1 on the CPU, 2 on CUDA)]" in text


# --- 5. usage errors without pydantic's prefix ------------------------------------------------


@pytest.mark.parametrize("args, line", [
    (["plan", "--allocator", "foo"],
     "Error: Invalid value for '--allocator': 'foo' is not one of 'native', 'expandable'."),
    (["plan", "--mode", "x"], "Error: Invalid value for '--mode': 'x' is not one of 'train', 'infer'."),
    (["compare", "--checkpointing", "some"],
     "Error: Invalid value for '--checkpointing': 'some' is not one of 'none', 'full'."),
])
def test_enum_errors_have_no_value_error_prefix(args, line):
    assert one_line_error(invoke(*args), 2) == line


# --- 8, 9. install hints and the test extra ----------------------------------------------------


def test_install_hints_name_what_pip_can_install():
    for path in [*(REPO / "vitcost").glob("*.py"), REPO / "docs" / "ci.md"]:
        text = path.read_text()
        assert "vitcost[torch]" not in text, path
        assert not re.search(r"pip install vitcost\b", text), path
        assert '"vitcost"]' not in text, path  # pre-commit's additional_dependencies
    res = run_python("import sys; sys.modules['torch'] = None\nfrom vitcost.cli import app\n"
                     "app(['calibrate', '--device', 'cpu'], prog_name='vitcost')")
    assert res.returncode == 1
    assert res.stderr.splitlines() == ["Error: measuring needs PyTorch: pip install torch==2.13.0"]
    # the torch extra is that very pin
    assert pyproject()["optional-dependencies"]["torch"] == ["torch==2.13.0"]


def test_ci_docs_install_from_a_checkout_or_a_wheel():
    text = (REPO / "docs" / "ci.md").read_text()
    assert "pip install ." in text and ".whl" in text
    assert "pip wheel" in text


def test_jsonschema_is_in_the_test_extra():
    assert any(re.match(r"jsonschema\b", req) for req in pyproject()["optional-dependencies"]["test"])


# --- output that reads right ------------------------------------------------------------------


def test_header_names_only_the_defaults_left_in_effect():
    """The header's defaults line names the settings a report was left at, not plan's fixed
    list: a user who chose batch 32 and fp32 is not told batch 8 and amp-bf16."""
    chosen = ok("plan", "--model", "vit-s", "--batch", "32", "--precision", "fp32", "--mode", "infer").stdout
    line = next(line for line in chosen.splitlines() if "device rules" in line)
    assert "batch" not in line and "precision" not in line and "model" not in line and "mode" not in line
    assert "attention sdpa" in line and "optimizer" not in line  # (no optimizer without training)
    default = words(ok("plan").stdout)
    assert ("left at their defaults: model vit-b, batch 8, mode train, precision amp-bf16, attention sdpa, "
            "optimizer adamw; device rules: cuda") in default


def test_attention_map_bytes_are_what_the_replay_keeps():
    """Per layer, the bytes of the maps the replay allocates: eager attention under CUDA
    autocast keeps fp32 probabilities beside their bf16 copy (6 bytes an element), plain fp32
    4; SDPA keeps none and the table says so; under no_grad the most maps alive at once."""
    eager = vitcost.plan("vit-b", attention="eager")
    b, h, n = 8, 12, 197
    assert eager.attention_maps["bytes_per_layer"] == b * h * n * n * 6
    assert eager.attention_maps["bytes_all_layers"] == 12 * b * h * n * n * 6
    assert eager.memory.saved_by_component["blocks/attn/core"] >= eager.attention_maps["bytes_all_layers"]
    assert vitcost.plan("vit-b", attention="eager", precision="fp32").attention_maps["bytes_per_layer"] == \
        b * h * n * n * 4
    assert vitcost.plan("vit-b").attention_maps["bytes_per_layer"] == 0
    assert "none: the fused kernel (sdpa) keeps no maps" in words(ok("plan", "--model", "vit-b").stdout)
    # no_grad, CUDA autocast: the bf16 scores, their fp32 copy and the fp32 softmax at once
    infer = vitcost.plan("vit-b", attention="eager", mode="infer")
    assert infer.attention_maps["bytes_per_layer"] == b * h * n * n * (2 + 4 + 4)
    assert "alive at once per layer" in ok("plan", "--attention", "eager", "--mode", "infer").stdout


def test_checkpointing_recompute_is_documented_as_computed():
    """A checkpointed block reruns its forward up to GELU's output: fc1 costs 4 forwards in a
    step, fc2 3; the JSON schema says so."""
    r = vitcost.plan("vit-b", checkpointing="full")
    fwd, train = r.macs_forward, r.macs_training
    assert train["blocks/mlp/fc1"] == 4 * fwd["blocks/mlp/fc1"] and train["blocks/mlp/fc2"] == 3 * fwd["blocks/mlp/fc2"]
    schema = (Path(__file__).resolve().parent.parent / "docs" / "json-schema.md").read_text()
    row = next(line for line in schema.splitlines() if line.startswith("| `macs.training_by_component"))
    assert "but `blocks/mlp/fc2`" in row


@pytest.mark.parametrize("options", [dict(), dict(attention="eager", mode="infer"), dict(gpus=2, gpu="8xa100"),
                                     dict(gpus=4, strategy="fsdp", gpu="8xa100", batch=32),
                                     dict(model="swin-t", precision="fp32")])
def test_memory_table_at_the_peak_adds_up_to_the_peak(options):
    """The memory table's 'at the peak' column is what is live at the peak: it adds up to the
    peak (DDP's buckets included); its rows are the JSON's ``memory_bytes_at_peak``."""
    model = options.pop("model", "vit-b")
    r = vitcost.plan(model, **options)
    at = r.to_dict()["memory_bytes_at_peak"]
    assert sum(at.values()) == r.peak_bytes
    args = ["plan", "--model", model, *[x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]]
    got = cells(ok(*args).stdout)
    assert all(f"{v:,}" in got for v in at.values() if v)


def test_compare_across_models_batches_precisions_and_gpus():
    """``compare --model vit-s,vit-b --batch 8,32 --gpu rtx4090,a100``: a row per combination
    (models outermost, batches innermost), each the plan of that combination; the output says
    what varies and keeps every name and figure whole at 80 columns."""
    args = ["compare", "--model", "vit-s,swin-t", "--batch", "8,32", "--gpu", "rtx4090,a100",
            "--precision", "amp-bf16"]
    reports = json.loads(ok(*args, "--json").stdout)
    combos = [(r["inputs"]["model"], r["inputs"]["gpu"], r["inputs"]["batch"]) for r in reports]
    assert combos == [(m, g, b) for m in ("vit-s", "swin-t") for g in ("rtx4090", "a100") for b in (8, 32)]
    assert reports[5] == vitcost.plan("swin-t", gpu="rtx4090", batch=32).to_dict()
    out = ok(*args, columns="80").stdout
    assert_fits(out, 80)
    assert "8 rows, varying model, gpu, batch, patch" in words(out)  # (Swin's patch is 4)
    got = cells(out)
    assert {"vit-s", "swin-t", "rtx4090 8", "a100 32"} <= got
    assert all(f"{r['max_batch_size']:,}" in got for r in reports)
    bad = CliRunner().invoke(app, ["compare", "--precision", "fp32,fp64"])
    assert bad.exit_code == 2 and "'fp64' is not one of" in bad.output and "Traceback" not in bad.output


def test_models_table():
    """``vitcost models``: a row per preset and known name, each figure the plan's own (Swin-T's
    28,288,354 parameters and 4.49 GMACs); fp16 weights are 2 bytes a parameter; a filter; the
    table whole at 80 columns and every name whole at 120."""
    rows = json.loads(ok("models", "--json").stdout)
    from vitcost.presets import known_names

    assert [r["name"] for r in rows] == known_names()
    swin = next(r for r in rows if r["name"] == "swin-t")
    assert (swin["params"], round(swin["gmacs_forward_per_image"], 2), swin["stages"]) == (28_288_354, 4.49, [2, 2, 6, 2])
    for r in rows[::7]:
        assert r["fp16_weight_bytes"] == 2 * r["params"]
        assert r["train_peak_bytes_batch1"] == vitcost.plan(r["name"], batch=1).peak_bytes
        assert r["infer_peak_bytes_batch1"] == vitcost.plan(r["name"], batch=1, mode="infer").peak_bytes
    assert [r["name"] for r in json.loads(ok("models", "dinov2", "--json").stdout)] == \
        [n for n in known_names() if "dinov2" in n]
    assert_fits(ok("models", columns="80").stdout, 80)
    wide = cells(ok("models", columns="120").stdout)
    assert all(r["name"] in wide for r in rows)
    bad = CliRunner().invoke(app, ["models", "resnet"])
    assert bad.exit_code == 1 and "no known model name contains 'resnet'" in bad.output


def test_patch_metrics():
    """ViT-B/16 at 224: a token covers 256 pixels (768 values), a 14 x 14 effective resolution,
    350,044 forward MACs a pixel, 4.1% of them the attention products; at patch 8 a token
    covers a quarter of the pixels and the attention's share grows (N^2 against N)."""
    m16 = vitcost.plan("vit-b").patch_metrics
    assert (m16["pixels_per_token"], m16["values_per_token"], m16["effective_resolution"]) == (256, 768, [14, 14])
    assert round(m16["macs_per_pixel"]) == round(17_563_828_224 / (224 * 224))
    assert round(m16["attention_share_of_macs"], 4) == round((2 * 12 * 197 * 197 * 768) / 17_563_828_224, 4)
    m8 = vitcost.plan("vit-b", patch=8).patch_metrics
    assert m8["pixels_per_token"] == 64 and m8["attention_share_of_macs"] > 2.5 * m16["attention_share_of_macs"]
    out = words(ok("plan").stdout)
    assert "pixels per token (P^2; x C values) │ 256 (768 values)" in out
    assert "attention products' share of MACs │ 4.1%" in out


def test_tiers():
    """``vitcost tiers``: on an RTX 4090 at batch 8, ViT-B/16's largest image is one whose step
    fits while the next tried does not (the caching allocator's fit, as plan decides it); the
    smallest patch at 224 likewise; the table marks the ends of the lists tried."""
    from vitcost.api import TIER_IMAGES, TIER_PATCHES

    rows = json.loads(ok("tiers", "--gpu", "rtx4090", "--model", "vit-b,vit-l", "--json").stdout)
    assert [(r["gpu"], r["model"]) for r in rows] == [("rtx4090", "vit-b"), ("rtx4090", "vit-l")]
    for r in rows:
        img = r["largest_image"]
        assert vitcost.plan(r["model"], image=img, gpu="rtx4090", batch=8).gpu.fits
        nxt = TIER_IMAGES[TIER_IMAGES.index(img) + 1]
        assert not vitcost.plan(r["model"], image=nxt, gpu="rtx4090", batch=8).gpu.fits
        p = r["smallest_patch"]
        assert vitcost.plan(r["model"], patch=p, gpu="rtx4090", batch=8).gpu.fits
        if p != TIER_PATCHES[-1]:
            assert not vitcost.plan(r["model"], patch=TIER_PATCHES[TIER_PATCHES.index(p) + 1], gpu="rtx4090",
                                    batch=8).gpu.fits
        assert r["max_batch"] == vitcost.plan(r["model"], gpu="rtx4090", batch=8).gpu.max_batch_size
    out = ok("tiers", "--gpu", "a100", "--model", "vit-s", columns="80").stdout
    assert_fits(out, 80)
    assert "2048+" in out and "<=4" in out  # ViT-S fits every image and patch tried on an A100


@pytest.mark.parametrize("model,options", [
    ("vit-b", {}), ("vit-b", dict(checkpointing="full", attention="eager")), ("vit-b", dict(patch_stride=8)),
    ("deit_small_distilled_patch16_224", dict(distillation=True)), ("vit_small_patch14_dinov2", dict(impl="hf")),
    ("vit-b", dict(mode="infer", device="cpu", precision="bf16")), ("vit-b", dict(optimizer="sgd-momentum", device="cpu")),
    ("vit-b", dict(pos_embed="relative-bias", attention="eager")), ("swin-t", {}), ("vit-b", dict(gpus=4, strategy="fsdp")),
])
def test_explain_derives_every_figure(model, options):
    """Every derived step that names a report figure equals it: the derivation's arithmetic,
    done from the formulas, lands on plan's numbers (and the plain ViT's parameters, MACs and
    weights, gradients, states and inputs each have such a step)."""
    from vitcost.explain import explain, figure

    report = vitcost.plan(model, **options)
    data = report.to_dict()
    steps = [st for _, section in explain(report) for st in section]
    checked = {st.equals for st in steps if st.equals}
    assert [(st.what, st.value, figure(data, st.equals)) for st in steps
            if st.equals and figure(data, st.equals) != st.value] == []
    if report.spec.swin is None:
        assert {"params.total", "macs.forward_per_image", "tokens.total", "memory_bytes.peak",
                "memory_bytes.inputs"} <= checked
    if not (report.workload.fsdp or report.workload.shards_optimizer):
        assert {"memory_bytes.weights"} <= checked
    flags = [x for k, v in options.items()
             for x in ((f"--{k.replace('_', '-')}",) if v is True else (f"--{k.replace('_', '-')}", str(v)))]
    out = ok("explain", "--model", model, *flags, columns="80").stdout
    assert_fits(out, 80)
    assert f"{report.params_total:,}" in words(out) and f"{report.peak_bytes:,}" in words(out)


def test_advise_front():
    """``vitcost advise --task mobile --gpu rtx4090``: each row is the fastest precision and
    checkpointing whose step fits, its report the plan's own; no row is beaten by another on
    detail, model size and step time at once; every fitting choice left out is beaten by a
    row (the front worked out here by brute force over the same space)."""
    from vitcost.advise import CHECKPOINTING, PRECISIONS, TASKS, capacity

    data = json.loads(ok("advise", "--task", "mobile", "--gpu", "rtx4090", "--json").stdout)
    rows = [d["advise"] for d in data]
    task = TASKS["mobile"]
    best = {}
    for m in task.models:
        for img in task.images:
            for p in task.patches:
                fits = [r for r in (vitcost.plan(m, image=img, patch=p, gpu="rtx4090", precision=prec,
                                                 checkpointing=ck) for prec in PRECISIONS for ck in CHECKPOINTING)
                        if r.gpu.fits]
                if fits:
                    r = min(fits, key=lambda r: r.time.step_seconds)
                    best[(m, img, p)] = (r.tokens["patches"], capacity(r), -r.time.step_seconds)
    front = {k for k, a in best.items()
             if not any(all(x >= y for x, y in zip(b, a)) and b != a for b in best.values())}
    assert {(r["model"], r["image"], r["patch"]) for r in rows} == front
    for d, r in zip(data, rows):
        report = vitcost.plan(r["model"], image=r["image"], patch=r["patch"], gpu="rtx4090", precision=r["precision"],
                              checkpointing=r["checkpointing"])
        assert {k: v for k, v in d.items() if k != "advise"} == report.to_dict()
    out = ok("advise", "--task", "mobile", "--gpu", "rtx4090", columns="80").stdout
    assert_fits(out, 80)
    # the tutorials' ViT-Ti/32 at 224 fits; off the front, the output names a row that beats it
    assert not any(r["task_default"] for r in rows)
    m = re.search(r"it fits, but (\S+) at (\d+)/(\d+) has as much detail", words(out))
    assert m and (m[1], int(m[2]), int(m[3])) in front
    mine, theirs = best[("vit-ti", 224, 32)], best[(m[1], int(m[2]), int(m[3]))]
    assert all(x >= y for x, y in zip(theirs, mine))
    assert re.search(r"searched 32 configurations in [0-9.]+ s", words(out))


def test_advise_constraints_and_errors():
    rows = [d["advise"] for d in json.loads(ok("advise", "--gpu", "a100", "--min-tokens", "1000", "--max-patch", "16",
                                                   "--models", "vit-s,vit-b", "--json").stdout)]
    assert rows and all(r["tokens"] >= 1000 and r["patch"] <= 16 for r in rows)
    for args, needle in ((["--task", "cooking"], "--task 'cooking': expected one of"),
                         ([], "advise needs --task, or constraints"),
                         (["--task", "face", "--batch", "8", "--min-batch", "8"], "not both")):
        result = CliRunner().invoke(app, ["advise", "--gpu", "a100", *args])
        assert result.exit_code == 1 and needle in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("model,options", [("vit-b", dict(attention="eager", batch=16)), ("swin-t", dict(batch=4)),
                                           ("vit-s", dict(gpus=2, strategy="fsdp", batch=8)),
                                           ("vit-b", dict(mode="infer", device="cpu"))])
def test_plan_plot_draws_the_replays_step(tmp_path, model, options):
    """``plan --plot``: the step's memory over time, every block replayed; its highest point is
    the report's peak, and the file is the format its suffix names."""
    pytest.importorskip("matplotlib")
    from vitcost.plot import plot_step, timeline

    report = vitcost.plan(model, **options)
    samples = timeline(report.spec, report.workload)
    assert max(sum(cats) for cats, _ in samples) == report.memory.peak
    assert plot_step(report, str(tmp_path / "step.png")) == report.memory.peak
    assert (tmp_path / "step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    flags = [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    out = ok("plan", "--model", model, *flags, "--plot", str(tmp_path / "step.svg")).stdout
    assert "plot:" in out and "<svg" in (tmp_path / "step.svg").read_text()


def test_compare_plot(tmp_path):
    """``compare --plot``: a line per model over the image sizes, the GPU's usable memory drawn."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "cmp.svg"
    ok("compare", "--model", "vit-s,vit-b", "--image", "224,384", "--gpu", "rtx4090", "--plot", str(path))
    svg = path.read_text()
    assert "rtx4090 usable" in svg and "vit-s" in svg and "vit-b" in svg and "ms per step" in svg
    from vitcost.api import compare
    from vitcost.plot import plot_compare

    drawn = plot_compare(compare(["vit-s", "vit-b"], patch=[8, 16, 32]), str(tmp_path / "p.png"))
    assert drawn == {"x": "patch", "lines": {"vit-s": [8, 16, 32], "vit-b": [8, 16, 32]}}


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    result = CliRunner().invoke(app, ["plan", "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--plot needs matplotlib: pip install 'vitcost[plot]'" in result.output
    assert not (tmp_path / "x.png").exists()
    bad = CliRunner().invoke(app, ["compare", "--plot", str(tmp_path / "x.gif")])
    assert bad.exit_code == 2 and "name a .png, .svg or .pdf file" in bad.output


def test_every_task_searches_its_own_starting_point():
    """Each task's starting point (the tutorials' choice) lies in the space it searches, and is
    a configuration vitcost can plan."""
    from vitcost.advise import TASKS

    for name, task in TASKS.items():
        model, image, patch = task.default
        assert model in task.models and image in task.images, name
        spec = vitcost.plan(model, image=image, patch=None if model.startswith("swin") else patch).spec
        assert spec.patch == patch and (model.startswith("swin") or patch in task.patches), name
