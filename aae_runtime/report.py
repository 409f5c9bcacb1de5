"""Writing scoring results as they come: CSV, JSON lines or JSON by the output file's extension."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from aae_runtime.contract.errors import InputError
from aae_runtime.console import display_path
from aae_runtime.model import ImageScore

FIELDS = ("path", "score", "normalized_score", "threshold", "anomaly", "error")
CLASSIFY_FIELDS = ("path", "label", "confidence")  # then p_<class> per class, then the score fields
FORMATS = (".csv", ".jsonl", ".json")
PARTIAL_SUFFIX = ".partial"  # X.json.partial: the rows of a .json run until it ends


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
        {"path": display_path(r.path), "score": r.score, "normalized_score": r.normalized_score, "threshold": threshold,
         "anomaly": r.anomaly, "error": r.error}
        for r in results
    ]


class ResultStream:
    """Rows written as they come, so that an interrupted run keeps what it scored.

    ``.csv`` and ``.jsonl``: the file is (re)created with its header and rows are appended,
    flushed every ``flush_every`` rows and at the end. ``.json``: the rows stream into
    ``X.json.partial`` as one JSON array; a complete run replaces ``X.json`` with it atomically,
    an interrupted one leaves the partial file (still a valid array) and ``X.json`` untouched.
    A write that fails (full disk, read-only) stops the writing but not the run: ``error`` then
    says why, and the caller reports it.
    """

    def __init__(self, path: str | Path, threshold: float, classes: tuple[str, ...] | None = None, flush_every: int = 64):
        self.path = Path(path)
        self.suffix = self.path.suffix.lower()
        if self.suffix not in FORMATS:
            raise InputError(f"--output {path}: unknown format {self.suffix or '(none)'}; use a file name ending in "
                             f"{' or '.join(FORMATS)}")
        self.threshold, self.classes, self.flush_every = threshold, classes, flush_every
        self.target = self.path.with_name(self.path.name + PARTIAL_SUFFIX) if self.suffix == ".json" else self.path
        self.rows = self.unflushed = 0
        self.error: str | None = None
        self.written = self.target
        try:
            self.file = open(self.target, "w", encoding="utf-8", newline="")
            if self.suffix == ".csv":
                self.csv = csv.DictWriter(self.file, fieldnames=self.fields, lineterminator="\n")
                self.csv.writeheader()
            elif self.suffix == ".json":
                self.file.write("[")
        except OSError as exc:
            raise InputError(f"cannot write {self.target}: {exc.strerror or exc}") from None

    @property
    def fields(self) -> list[str]:
        return list(FIELDS) if self.classes is None else classified_fields(self.classes)

    def write(self, results: list[ImageScore]) -> None:
        if self.error is not None or not results:
            return
        dicts = rows_as_dicts(results, self.threshold) if self.classes is None else classified_dicts(results, self.threshold, self.classes)
        try:
            for row in dicts:
                if self.suffix == ".csv":
                    self.csv.writerow({k: ("" if v is None else v) for k, v in row.items()})
                else:
                    sep = ("," if self.rows else "") + "\n" if self.suffix == ".json" else ""
                    self.file.write(sep + json.dumps(row) + ("\n" if self.suffix == ".jsonl" else ""))
                self.rows += 1
                self.unflushed += 1
            if self.unflushed >= self.flush_every:
                self.file.flush()
                self.unflushed = 0
        except OSError as exc:
            self._failed(exc)

    def close(self, complete: bool = True) -> Path:
        """Finish the file; returns where the rows are (``X.json.partial`` for an interrupted .json).
        Closing again returns the same."""
        if self.file.closed:
            return self.written
        self.written = self.target
        try:
            if self.suffix == ".json" and self.error is None:
                self.file.write("\n]\n")
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            if self.suffix == ".json" and complete and self.error is None:
                os.replace(self.target, self.path)
                self.written = self.path
        except OSError as exc:
            self._failed(exc)
        return self.written

    def _failed(self, exc: OSError) -> None:
        self.error = f"cannot write {self.target}: {exc.strerror or exc} (after {self.rows} rows)"
        try:
            self.file.close()
        except OSError:
            pass


def write_results(results: list[ImageScore], threshold: float, path: str | Path,
                  classes: tuple[str, ...] | None = None) -> Path:
    """Write one row per image to ``path`` (.csv, .jsonl or .json, see `ResultStream`).
    With ``classes``, the rows of `aae-run classify` (see `classified_fields`)."""
    stream = ResultStream(path, threshold, classes)
    stream.write(results)
    written = stream.close()
    if stream.error:
        raise InputError(stream.error)
    return written
