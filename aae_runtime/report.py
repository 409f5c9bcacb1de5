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
CLASSIFY_FIELDS = ("path", "label", "confidence")  # then p_<class> per class, then the score fields
FORMATS = (".csv", ".json")


def classified_fields(classes: tuple[str, ...]) -> list[str]:
    """The columns of `aae-run classify`: path, label, confidence, p_<class>..., score, anomaly, error."""
    return [*CLASSIFY_FIELDS, *(f"p_{c}" for c in classes), "score", "normalized_score", "threshold", "anomaly", "error"]


def classified_dicts(results: list[ImageScore], threshold: float, classes: tuple[str, ...]) -> list[dict]:
    rows = []
    for row, r in zip(rows_as_dicts(results, threshold), results):
        p = r.probabilities
        best = int(p.argmax()) if p is not None else None
        rows.append({"path": row["path"], "label": classes[best] if p is not None else None,
                     "confidence": float(p[best]) if p is not None else None,
                     **{f"p_{c}": (float(p[i]) if p is not None else None) for i, c in enumerate(classes)},
                     **{k: row[k] for k in FIELDS[1:]}})
    return rows


def rows_as_dicts(results: list[ImageScore], threshold: float) -> list[dict]:
    return [
        {"path": display_path(r.path), "score": r.score, "normalized_score": r.normalized, "threshold": threshold,
         "anomaly": r.anomaly, "error": r.error}
        for r in results
    ]


def write_results(results: list[ImageScore], threshold: float, path: str | Path,
                  classes: tuple[str, ...] | None = None) -> Path:
    """Write one row per image to ``path`` (.csv or .json); the file appears whole or not at all.
    With ``classes``, the rows of `aae-run classify` (see `classified_fields`)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"--output {path}: unknown format {suffix or '(none)'}; use a .csv or .json file name")
    rows = rows_as_dicts(results, threshold) if classes is None else classified_dicts(results, threshold, classes)
    if suffix == ".json":
        text = json.dumps(rows, indent=1) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(FIELDS) if classes is None else classified_fields(classes),
                                lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        text = buf.getvalue()
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
