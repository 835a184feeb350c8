"""Saved GPU calibrations: what only a real GPU can tell, kept per hardware profile.

``vitcost calibrate --save`` records, for the profile it ran against, the CUDA context's
size, the caching allocator's reserved/allocated ratio at the peak and the device's total
memory. ``plan`` and ``compare`` then take the usable memory (total less the measured
context) from here instead of the profile's estimate. The file is JSON, at ``$VITCOST_CALIBRATION`` if set, else
``~/.config/vitcost/calibration.json``.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from vitcost.errors import ProfileError
from vitcost.files import load_json, read_text

FILE_VERSION = 1


def calibration_path() -> Path:
    return _path_for(os.environ.get("VITCOST_CALIBRATION"))


@lru_cache(maxsize=8)
def _path_for(env: Optional[str]) -> Path:
    if env:
        return Path(env).expanduser()
    return Path.home() / ".config" / "vitcost" / "calibration.json"


def load_calibrations(path: Optional[Path] = None) -> dict[str, dict[str, Any]]:
    path = path or calibration_path()
    if not path.exists():
        return {}
    data = load_json(read_text(path, ProfileError, f"calibration file {path}: "), f"calibration file {path}",
                     ProfileError)
    if not isinstance(data, dict) or not isinstance(data.get("profiles", {}), dict):
        raise ProfileError(f"calibration file {path}: expected an object with 'profiles'")
    return data.get("profiles", {})


_MAX_BYTES = 1 << 50  # 1 PiB: no GPU's memory comes near


def usable_from(entry: dict[str, Any]) -> int:
    """total - context: what the caching allocator's segments may take, as measured. (The
    measured reserved/allocated ratio is kept in the file for reference: the allocator's
    overhead is modelled, configuration by configuration, by ``vitcost.allocator``.)
    Raises ValueError for figures no GPU can have."""
    total, context = entry["total_bytes"], entry["cuda_context_bytes"]
    for key, value in (("total_bytes", total), ("cuda_context_bytes", context)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < _MAX_BYTES:
            raise ValueError(f"{key} must be a whole number of bytes between 1 and 2**50")
    if context >= total:
        raise ValueError(f"cuda_context_bytes {context} is not less than total_bytes {total}")
    return total - context


def calibrated_usable_bytes(profile: str, path: Optional[Path] = None) -> Optional[tuple[int, str]]:
    """``(usable bytes, "calibrated: <file>")`` for a profile, or None when none is saved."""
    path = path or calibration_path()
    entry = _entry(profile, path)
    if not entry:
        return None
    try:
        return usable_from(entry), f"calibrated: {path}"
    except (KeyError, TypeError, ValueError) as exc:
        what = f"is missing {exc}" if isinstance(exc, KeyError) else f"is not a calibration: {exc}"
        raise ProfileError(f"calibration file {path}: entry {profile!r} {what}") from None


def calibrated_time_ratio(profile: str, path: Optional[Path] = None) -> Optional[tuple[float, str]]:
    """``(measured / predicted step time, "calibrated: <file>")`` for a profile whose saved
    calibration timed its steps, or None."""
    path = path or calibration_path()
    entry = _entry(profile, path)
    if not entry or "step_time_ratio" not in entry:
        return None
    ratio = entry["step_time_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.01 <= ratio <= 100:
        raise ProfileError(f"calibration file {path}: entry {profile!r}: step_time_ratio must be a number "
                           "between 0.01 and 100")
    return float(ratio), f"calibrated: {path}"


def _entry(profile: str, path: Path) -> Optional[dict[str, Any]]:
    """The profile's saved calibration in the file at ``path`` (None: no file, or no entry)."""
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    return _load_cached(str(path), stamp).get(profile)


@lru_cache(maxsize=8)
def _load_cached(path: str, stamp: int) -> dict[str, dict[str, Any]]:
    """The file's calibrations, read again only when it changes (``stamp`` is its mtime)."""
    return load_calibrations(Path(path))


def save_calibration(profile: str, entry: dict[str, Any], path: Optional[Path] = None) -> Path:
    path = path or calibration_path()
    profiles = load_calibrations(path) if path.is_file() else {}
    profiles[profile] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": FILE_VERSION, "profiles": profiles}, indent=2, sort_keys=True) + "\n")
    return path
