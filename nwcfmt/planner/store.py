"""The planner's measurements kept in a file (``--measurements FILE``), so that a model is measured once.

The measuring pass (:func:`nwcfmt.planner.measure.measure_model`: every candidate of every planned tensor, the
Hessians, the Fisher) is most of a plan's time; solving for another target from its results takes a second. The
file holds the measurements and the key they were taken under: the source's weight files (path, name, size and
modification time, as resumable encodes fingerprint them), the candidate settings, the excluded globs, whether the
sensitivity was measured, and the calibration options. A file whose key differs from the run's is refused with the
keys that differ, never silently reused; a missing file is measured and written (temp file, then rename).

The file is JSON data, read after a bound on its size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nwcfmt.calibration.pipeline import CalibOptions
from nwcfmt.convert import atomic_output, source_files
from nwcfmt.errors import InputError
from nwcfmt.planner.candidates import Option
from nwcfmt.planner.measure import Measured, Report, measure_model

FORMAT = "nwc-plan-measurements"
VERSION = 1
MAX_BYTES = 1 << 30  # a measurements file is a few KB per tensor


def measurement_key(
    src: Path, choices: list[Option], calib: CalibOptions, exclude: list[str] | tuple[str, ...], sensitivity: bool
) -> dict[str, Any]:
    """What the measurements of ``src`` depend on (plain JSON types)."""
    key = {
        "src": str(Path(src).absolute()),
        "files": source_files(Path(src)),
        "choices": [[o.codec, o.config] for o in choices],
        "exclude": sorted(exclude),
        "sensitivity": sensitivity,
        "calib": calib.fingerprint(),
    }
    return json.loads(json.dumps(key))


def read_measurements(path: Path, key: dict[str, Any]) -> Measured:
    """The measurements in ``path``, taken under ``key``; InputError for any other file."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise InputError(f"{path}: {size} bytes is too large for a measurements file (at most {MAX_BYTES})")
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a measurements file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"{path}: not a measurements file (no {FORMAT!r} format field)")
    if doc.get("version") != VERSION:
        raise InputError(f"{path}: measurements file version {doc.get('version')!r}; this nwcfmt reads {VERSION}")
    theirs = doc.get("key") if isinstance(doc.get("key"), dict) else {}
    differ = sorted(k for k in key if theirs.get(k) != key[k])
    if differ:
        raise InputError(
            f"{path}: measured with another {', '.join(differ)}; remove it (or name another file) to measure again"
        )
    try:
        return Measured.from_dict(doc["measured"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InputError(f"{path}: malformed measurements ({type(exc).__name__}: {exc})") from None


def write_measurements(path: Path, key: dict[str, Any], measured: Measured) -> None:
    """Write ``measured`` and its key to ``path`` (a temp file renamed into place)."""
    doc = {"format": FORMAT, "version": VERSION, "key": key, "measured": measured.to_dict()}
    try:
        with atomic_output(Path(path), overwrite=True, is_dir=False) as tmp:
            tmp.write_text(json.dumps(doc))
    except OSError as exc:
        raise InputError(f"{path}: cannot write the measurements ({exc})") from None


def measure_once(
    path: Path | None,
    src: Path,
    choices: list[Option],
    calib: CalibOptions,
    exclude: list[str] | tuple[str, ...] = (),
    sensitivity: bool = True,
    report: Report | None = None,
) -> Measured:
    """The measurements of ``src``: read from ``path`` when it holds them, else measured (and written to ``path``
    when one is given)."""
    key = measurement_key(src, choices, calib, exclude, sensitivity)
    if path is not None and Path(path).exists():
        measured = read_measurements(path, key)
        if report is not None:
            report(f"measurements from {path} (measured in {measured.seconds:.0f} s)")
        return measured
    if path is not None and not Path(path).absolute().parent.is_dir():
        raise InputError(f"{path}: its folder does not exist (the measurements would be lost)")
    measured = measure_model(src, choices, calib, list(exclude), sensitivity, report)
    if path is not None:
        write_measurements(path, key, measured)
    return measured
