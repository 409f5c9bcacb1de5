"""Writing scoring results: CSV or JSON by the output file's extension, written atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from aae_runtime.contract.errors import InputError
from aae_runtime.contract.fileio import atomic_write_text
from aae_runtime.images import display_path
from aae_runtime.model import ImageScore

FIELDS = ("path", "score", "normalized_score", "threshold", "anomaly", "error")
FORMATS = (".csv", ".json")


def rows_as_dicts(results: list[ImageScore], threshold: float) -> list[dict]:
    return [
        {"path": display_path(r.path), "score": r.score, "normalized_score": r.normalized, "threshold": threshold,
         "anomaly": r.anomaly, "error": r.error}
        for r in results
    ]


def write_results(results: list[ImageScore], threshold: float, path: str | Path) -> Path:
    """Write one row per image to ``path`` (.csv or .json); the file appears whole or not at all."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"--output {path}: unknown format {suffix or '(none)'}; use a .csv or .json file name")
    rows = rows_as_dicts(results, threshold)
    if suffix == ".json":
        text = json.dumps(rows, indent=1) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        text = buf.getvalue()
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
