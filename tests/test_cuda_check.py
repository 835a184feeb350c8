"""benchmarks/cuda_check.py: the dry run lists the whole grid with vitcost's own predictions;
without CUDA a real run refuses in one line; with CUDA one small configuration runs for real."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest

import vitcost

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "cuda_check.py"
GPU = "h100"  # a shipped profile; the script's default (h200) may not be there yet

# The grid the brief fixes, with its batch per model.
BATCH = {"vit-s": 32, "vit-b": 32, "vit-l": 16}
GRID = list(product(BATCH, (224, 384), ("eager", "sdpa"), ("train", "infer"), ("amp-bf16", "amp-fp16")))


def label(model: str, image: int, attention: str, mode: str, precision: str) -> str:
    return f"{model} {image}px/16 {attention} {mode} {precision}"


def run_script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def table_rows(markdown: str) -> dict[str, list[str]]:
    """Configuration label -> the row's cells, for every table row of the report."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| vit-"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert cells[0] not in rows, f"{cells[0]} listed twice"
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_check")
    proc = run_script("--dry-run", "--out", str(out / "x.md"), "--json", str(out / "x.json"), "--gpu", GPU)
    assert proc.returncode == 0, proc.stderr
    return (out / "x.md").read_text(), json.loads((out / "x.json").read_text())


def test_dry_run_lists_every_configuration(dry_run):
    markdown, data = dry_run
    assert "DRY RUN" in markdown
    rows = table_rows(markdown)
    expected = {label(*c) for c in GRID}
    assert set(rows) == expected and len(GRID) == 48
    for (model, *_), cells in zip(GRID, (rows[label(*c)] for c in GRID)):
        assert cells[1] == str(BATCH[model])
        # measured columns and errors: "-" in a dry run; the status says so
        assert [cells[i] for i in (3, 4, 6, 7, 8, 9, 10, 12)] == ["-"] * 8
        assert cells[-1] == "dry run"
    assert [r["label"] for r in data["rows"]][:48] == [label(*c) for c in GRID]
    # then three rows of each Hugging Face model (their CUDA rules, derived, wait for a GPU)
    hf = [r["label"] for r in data["rows"]][48:]
    assert len(hf) == 12 and {h.split()[0] for h in hf} == {"hf-vit-b", "hf-dinov2-b-reg4", "hf-videomae-s", "hf-swin-t"}
    assert data["meta"]["dry_run"] is True
    assert all(r["measured"] is None and r["status"] == "dry run" for r in data["rows"])


@pytest.mark.parametrize("config", [("vit-b", 384, "sdpa", "train", "amp-fp16"),
                                    ("vit-l", 224, "eager", "infer", "amp-bf16")])
def test_dry_run_predictions_are_vitcosts(dry_run, config):
    markdown, data = dry_run
    model, image, attention, mode, precision = config
    d = vitcost.plan(model, image=image, patch=16, batch=BATCH[model], mode=mode, precision=precision,
                     attention=attention, optimizer="adamw", gpu=GPU, device="cuda").to_dict()
    peak = d["memory_bytes"]["peak"]
    reserved = d["memory_bytes"]["peak_reserved"]
    step = d["time"]["step_seconds"]
    cells = table_rows(markdown)[label(*config)]
    assert cells[2] == f"{peak:,}"
    assert cells[5] == f"{reserved:,}"
    assert cells[11] == f"{step * 1e3:.3f}"
    (row,) = [r for r in data["rows"] if r["label"] == label(*config)]
    assert (row["predicted_peak_bytes"], row["predicted_peak_reserved_bytes"]) == (peak, reserved)
    assert row["predicted_step_seconds"] == step


def test_without_cuda_a_real_run_refuses_in_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_script("--out", str(tmp_path / "x.md"), "--gpu", GPU)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "CUDA" in lines[0]
    assert not (tmp_path / "x.md").exists()


def test_one_small_configuration_on_cuda(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    proc = run_script("--out", str(tmp_path / "x.md"), "--json", str(tmp_path / "x.json"), "--gpu", GPU,
                      "--models", "vit-s", "--images", "224", "--attentions", "sdpa", "--modes", "train",
                      "--precisions", "amp-bf16", "--batch", "4", "--limit-seconds", "120", timeout=300)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads((tmp_path / "x.json").read_text())["rows"]
    assert row["status"] == "ok", row["message"]
    m = row["measured"]
    assert m["steady_max_allocated_bytes"] > 0 and m["fresh_max_reserved_bytes"] > 0
    assert m["steady_max_reserved_raw_bytes"] >= m["steady_max_allocated_raw_bytes"]
    assert m["step_seconds_median"] > 0
    assert 0.5 < row["predicted_peak_bytes"] / m["steady_max_allocated_bytes"] < 2  # a loose sanity bound
    cells = table_rows((tmp_path / "x.md").read_text())[label("vit-s", 224, "sdpa", "train", "amp-bf16")]
    assert cells[3] == f"{m['steady_max_allocated_bytes']:,}" and cells[-1] == "ok"
