"""The tutorials' claims (benchmarks/seed_claims.py, docs/seed-claims.md): every check is run
and held to the verdict recorded in the table, so a change in vitcost's figures that flips a
verdict fails here; and the committed table is the one the checks write."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import seed_claims  # noqa: E402


@pytest.mark.parametrize("claim", seed_claims.CLAIMS, ids=[c.claim[:50] for c in seed_claims.CLAIMS])
def test_verdict_holds(claim):
    verdict, figure = claim.check()
    assert verdict == claim.expected, figure
    assert figure and "\n" not in figure


def test_committed_table_is_what_the_checks_write(tmp_path):
    out = tmp_path / "seed-claims.md"
    seed_claims.write(out, seed_claims.run())
    assert out.read_text() == (ROOT / "docs" / "seed-claims.md").read_text()


def test_every_listed_numeric_claim_is_checked():
    """Each numeric claim of the reference list is one of the rows (by a phrase of it)."""
    phrases = ["16.8M", "1.05M", "65K", "258", "16x attention", "4x more attention", "1/P^4", "331,776",
               "16M-element", "W_proj", "3 D^2", "8 D^2", "2 D parameters", "4.3 GMACs", "ResNet-50", "B/32",
               "B/8", "gradient storage", "2-3x the parameters", "2-3x slower", "linearly", "super-linearly",
               "1.8B", "FP16", "225", "D(P^2 C + 1)", "577", "24 GB", "40-80 GB", "above 80 GB", "decision matrix"]
    claims = " ".join(c.claim for c in seed_claims.CLAIMS)
    assert [p for p in phrases if p not in claims] == []
