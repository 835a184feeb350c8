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
