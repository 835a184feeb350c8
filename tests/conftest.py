"""Shared helpers for the core tests: tiny specs, CPU workloads, isolation from a saved calibration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitcost.specs import ViTSpec, Workload, make_spec, make_workload

REPO = Path(__file__).resolve().parent.parent

# A ViT small enough that a real CPU step takes well under a second: N = (64/16)^2 + 1 = 17
# tokens, D = 64, two heads of 32, MLP 256, two blocks, ten classes.
TINY = dict(dim=64, depth=2, heads=2, mlp_hidden=256, patch=16, image_h=64, image_w=64, classes=10)


def tiny(**overrides) -> ViTSpec:
    """The tiny ViT with some fields changed."""
    return make_spec(**{**TINY, **overrides})


def cpu_workload(**overrides) -> Workload:
    """A CPU-rules fp32 training workload of batch 2, with some fields changed."""
    return make_workload(**{"batch": 2, "precision": "fp32", "device": "cpu", **overrides})


@pytest.fixture(autouse=True)
def _no_columns(monkeypatch):
    """Tables follow COLUMNS when it is set: a shell that exports it would change them."""
    monkeypatch.delenv("COLUMNS", raising=False)


@pytest.fixture(autouse=True, scope="session")
def _no_saved_calibration(tmp_path_factory):
    """A calibration saved on the developer's machine would change every usable-memory figure:
    point vitcost at a file that does not exist."""
    old = os.environ.get("VITCOST_CALIBRATION")
    os.environ["VITCOST_CALIBRATION"] = str(tmp_path_factory.mktemp("calibration") / "none.json")
    yield
    if old is None:
        os.environ.pop("VITCOST_CALIBRATION", None)
    else:
        os.environ["VITCOST_CALIBRATION"] = old


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter at the repository root (nothing imported yet)."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


# A complete, valid GPU profile, made up for tests (figures chosen to be easy to check).
TEST_PROFILE = {
    "display_name": "Test GPU",
    "aliases": ["tg"],
    "gpus": 1,
    "memory_mib": 1024,
    "cuda_context_mib": 24,
    "library_workspace_mib": 8,
    "overheads_source": "made up for a test",
    "memory_bandwidth_gb_per_s": 100,
    "dense_tflops": {"fp32": 1, "tf32": 2, "bf16": 4, "fp16": 4},
    "matmul_efficiency": 0.5,
    "interconnect": {"name": "PCIe 4.0 x16", "gb_per_s_per_direction": 31.5},
    "source": "made up for a test",
}
