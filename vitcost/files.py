"""Reading the files vitcost is given: bounded, regular files only, strict YAML and JSON.

Every file a user names (GPU profiles, budget files, baselines, measured rows, the saved
calibration) is read through here, so that no input can hang the process, fill its memory
or end in a traceback: a FIFO or a device is refused before it is read, a file is read up to
``MAX_FILE_BYTES``, a key given twice in one mapping is an error (not "the last one wins"),
JSON's ``NaN``/``Infinity`` are not numbers, and numbers too long for Python, nesting too
deep and undecodable bytes all become one-line errors of the caller's kind.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Union

import yaml

from vitcost.errors import VitcostError

MAX_FILE_BYTES = 4 << 20  # no profile, budget, baseline or calibration file comes near this


def read_text(path: Union[str, Path], error: type[VitcostError], where: str = "") -> str:
    """The file's text, or ``error`` with one line that starts with ``where`` (default:
    the path and a colon).

    Opened without blocking (a FIFO would wait for a writer forever) and refused unless it is
    a regular file; read to at most ``MAX_FILE_BYTES``.
    """
    where = where or f"{path}: "
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{where}file not found") from None
    except OSError as err:
        raise error(f"{where}cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a directory itself
        os.close(fd)
        raise error(f"{where}not a regular file")
    with os.fdopen(fd, "rb") as fh:
        try:
            data = fh.read(MAX_FILE_BYTES + 1)
        except OSError as err:
            raise error(f"{where}cannot be read ({err.strerror})") from None
    if len(data) > MAX_FILE_BYTES:
        raise error(f"{where}larger than {MAX_FILE_BYTES} bytes: not a vitcost file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{where}not UTF-8 text (byte {err.start})") from None


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """PyYAML's safe loader (libyaml's parser where PyYAML has it: a plan reads every shipped
    profile, and the pure-Python parser took most of that time), but a key given twice in one
    mapping is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: PyYAML says so itself below
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def load_yaml(text: str, where: str, error: type[VitcostError]) -> Any:
    """YAML (safe, unique keys); ``where`` names the file in the one-line error."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "cannot be parsed"
        if "nesting depth" in problem:  # libyaml's word for it
            raise error(f"{where}: malformed YAML: nested too deeply") from None
        raise error(f"{where}: malformed YAML{at}: {problem}") from None
    except RecursionError:
        raise error(f"{where}: malformed YAML: nested too deeply") from None
    except ValueError as err:  # PyYAML's int() of a number past Python's digit limit
        raise error(f"{where}: malformed YAML: {_number_problem(err)}") from None


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def load_json(text: str, where: str, error: type[VitcostError]) -> Any:
    """JSON without duplicate keys or NaN/Infinity; ``where`` names the file in the error."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_no_constant)
    except RecursionError:
        raise error(f"{where}: malformed JSON: nested too deeply") from None
    except ValueError as err:
        line = getattr(err, "lineno", None)
        at = f" at line {line}" if line else ""
        raise error(f"{where}: malformed JSON{at}: {getattr(err, 'msg', None) or _number_problem(err)}") from None


def _number_problem(err: ValueError) -> str:
    text = str(err)
    if "digits" in text and "limit" in text:
        return "a number with more digits than any figure can have"
    return text.split("\n")[0]
