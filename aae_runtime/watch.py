"""`aae-run watch`: score every image that lands in a folder, once, losing none.

A camera drops files into INBOX (recursively); each is scored once, its row appended to the
results file (``.csv`` or ``.jsonl``, the fields of `aae-run score`), and the file moved to
``--done`` or ``--failed`` (or left where it is).

**Exactly once, across SIGKILL.** Every batch ends in one commit: the rows are appended to the
results file and the batch's files to a ledger (``FILE.seen``: path, size, mtime, inode of each
file handled), both flushed to disk, and then a state file (``FILE.state.json``) is replaced
atomically with the two files' sizes. Only after that are the files moved. On start, both files
are cut back to the sizes the state names (rows of a batch that never committed are dropped, and
that batch is scored again), files the ledger names that are still in INBOX are moved on (a kill
between commit and move), and files already waiting are processed. A file is known by its path,
size, modification time and inode, so a camera that reuses a name gets its new image scored; the
path is the resolved one, so a restart that names INBOX another way (relative, absolute, through
a link) knows the files handled before. Without ``--done``, or when a file cannot be moved, the
file stays in INBOX and in the ledger, scored once.

**Not early.** A file is read once its size and modification time have stayed the same for
``settle`` seconds (a camera writing slowly, a copy in progress); names a camera writes before
renaming (hidden, ``*.tmp``, ``*.part``) are left alone. A file that cannot be read gets a second
look before its error row: a writer that paused longer than ``settle`` leaves a truncated image
that is whole a moment later. Its row is written when the same file (size, time, inode) fails
again after ``recheck`` seconds (4 x settle, at least 2 s); a file that changed meanwhile is new.

Events come from the `watchdog` package (inotify on Linux) when it is installed; without it, or
on file systems without events, the folder is polled. Batches form from what is waiting, so a
burst is scored at batch speed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from aae_runtime.contract.errors import InputError
from aae_runtime.contract.fileio import atomic_write
from aae_runtime.images import IMAGE_SUFFIXES
from aae_runtime.report import FIELDS, rows_as_dicts

WATCH_FORMATS = (".csv", ".jsonl")
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")
DEFAULT_SETTLE_S = 0.5
RECHECK_SETTLES, MIN_RECHECK_S = 4, 2.0  # an unreadable file is read again this much later (settles, at least s)
POLL_S = 0.5  # how often the folder is listed without events (and the longest wait with them)
MIN_WAIT_S = 0.05  # the shortest wait between two listings


@dataclass(frozen=True)
class Seen:
    """A file as the ledger knows it."""

    path: str
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path, st: os.stat_result) -> "Seen":
        return cls(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass
class WatchStats:
    scored: int = 0
    failed: int = 0
    batches: int = 0
    recovered: int = 0  # files of a committed batch moved on at start (killed before moving them)
    dropped_rows: int = 0  # rows of an uncommitted batch cut from the results at start
    latencies_s: list = field(default_factory=list)  # file ready -> row committed


class Ledger:
    """The results file, the ledger of files handled and the state that commits both."""

    def __init__(self, output: Path):
        self.output = output
        self.suffix = output.suffix.lower()
        if self.suffix not in WATCH_FORMATS:
            raise InputError(f"--output {output}: use a file name ending in {' or '.join(WATCH_FORMATS)} (rows are appended)")
        self.seen_path = output.with_name(output.name + ".seen")
        self.state_path = output.with_name(output.name + ".state.json")
        self.seen: dict[Seen, bool | None] = {}  # file handled -> whether it failed (None: a line from before the ledger kept that)
        self.dropped_rows = 0

    def open(self) -> None:
        """Cut both files back to the last commit, load the ledger, write the header of a new file."""
        state = {"results_bytes": 0, "seen_bytes": 0}
        if self.state_path.exists():
            try:
                state = json.loads(self.state_path.read_text())
                sizes = state["results_bytes"], state["seen_bytes"]
            except (ValueError, KeyError, TypeError, OSError) as exc:
                raise self._damaged(self.state_path, str(exc)) from None
            if not all(type(v) is int and v >= 0 for v in sizes):
                raise self._damaged(self.state_path, "its sizes must be whole numbers of bytes")
        elif self.output.exists() and self.output.stat().st_size > 0:
            raise InputError(f"--output {self.output} exists but was not written by aae-run watch (no {self.state_path.name}): "
                             "choose a new file, or remove it")
        for path, size in ((self.output, state["results_bytes"]), (self.seen_path, state["seen_bytes"])):
            try:
                with open(path, "ab") as f:
                    if f.tell() > size:
                        if path == self.output:
                            self.dropped_rows = _count_lines(path, size)
                        f.truncate(size)
            except OSError as exc:
                raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
        with open(self.seen_path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    d = json.loads(line)
                    path = str(d["path"]) if "failed" in d else _resolved(str(d["path"]))  # older lines: as spelled
                    self.seen[Seen(path, int(d["size"]), int(d["mtime_ns"]), int(d["inode"]))] = d.get("failed")
                except (ValueError, KeyError, TypeError, OverflowError) as exc:
                    raise self._damaged(self.seen_path, f"line {number}: {exc}") from None
        if state["results_bytes"] == 0 and self.suffix == ".csv":
            self._append(self.output, _csv_text([], header=True))
            self._commit()

    def _damaged(self, path: Path, why: str) -> InputError:
        return InputError(f"{path} is damaged ({why}): move the results file and its .seen/.state.json aside to start "
                          "a new one")

    def commit(self, rows: list[dict], handled: list[Seen], failed: list[bool]) -> None:
        """Append ``rows`` and ``handled`` (whether each failed) durably, then switch the state to include them."""
        text = _csv_text(rows) if self.suffix == ".csv" else "".join(json.dumps(r) + "\n" for r in rows)
        self._append(self.output, text)
        self._append(self.seen_path, "".join(json.dumps({**s.__dict__, "failed": f}) + "\n" for s, f in zip(handled, failed)))
        self._commit()
        self.seen.update(zip(handled, failed))

    def forget(self, gone: list[Seen]) -> None:
        """Drop ledger entries of files that left INBOX (moved): the ledger stays small."""
        for s in gone:
            self.seen.pop(s, None)

    def _append(self, path: Path, text: str) -> None:
        with open(path, "a", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def _commit(self) -> None:
        state = {"results_bytes": self.output.stat().st_size, "seen_bytes": self.seen_path.stat().st_size}
        data = (json.dumps(state) + "\n").encode()
        atomic_write(self.state_path, lambda f: f.write(data), fsync=True)


def _version(st: os.stat_result) -> tuple[int, int, int]:
    """What tells one file under a name from another: size, modification time, inode."""
    return st.st_size, st.st_mtime_ns, st.st_ino


def _resolved(path: str) -> str:
    """A file's path with its folder resolved (how the ledger names files; the file itself may be gone)."""
    p = Path(os.path.abspath(path))
    return str(p.parent.resolve() / p.name)


def _csv_text(rows: list[dict], header: bool = False) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(FIELDS), lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def _count_lines(path: Path, after: int) -> int:
    with open(path, "rb") as f:
        f.seek(after)
        return f.read().count(b"\n")


WATCH_LOCK = ".aae-watch.lock"  # in INBOX: held by the one watcher of it (a dot file: never a candidate)


def _candidate(path: Path) -> bool:
    name = path.name
    return (not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
            and not name.lower().endswith(IGNORED_SUFFIXES))


class Watcher:
    """Scores what lands in ``inbox`` with ``model`` (an AAEModel); see the module docstring."""

    def __init__(self, model, inbox: Path, output: Path, done: Path | None = None, failed: Path | None = None,
                 batch_size: int = 64, settle_s: float = DEFAULT_SETTLE_S, poll: bool = False,
                 log: Callable[[str], None] = lambda s: None):
        self.model, self.inbox, self.done, self.failed = model, inbox, done, failed
        self.root = inbox.resolve()  # the ledger's names: the same however INBOX is spelled
        for name, folder in (("--done", done), ("--failed", failed)):
            if folder is not None and folder.exists() and not folder.is_dir():
                raise InputError(f"{name} {folder} is a file, not a folder: name a folder to move the images into")
            if folder is not None and folder.resolve() == self.root:
                raise InputError(f"{name} {folder} is the inbox itself: name another folder (e.g. a sub-folder 'done')")
        self.batch_size, self.settle_s, self.log = batch_size, settle_s, log
        self.noted: set[Path] = set()  # entries that are not regular files, reported once
        self.ledger = Ledger(output)
        self.stats = WatchStats()
        self.changed = threading.Event()
        self.stopping = threading.Event()
        self.pending: dict[Path, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, since when unchanged)
        # path -> ((size, mtime_ns, inode) of the file that could not be read, when): its second look
        self.unreadable: dict[Path, tuple[tuple[int, int, int], float]] = {}
        self.recheck_s = max(RECHECK_SETTLES * settle_s, MIN_RECHECK_S)
        self.poll = poll
        self.observer = None
        self._claim: int | None = None  # the descriptor holding the inbox's lock while watching
        self._claimed = False

    def _start_events(self):
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            self.log("watchdog is not installed (the [watch] extra: pip install '.[cpu,watch]' from the source folder): polling the folder every "
                     f"{POLL_S:g} s")
            return None
        changed = self.changed

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event):
                changed.set()

        observer = Observer()
        try:
            observer.schedule(Wake(), str(self.inbox), recursive=True)
            observer.start()
        except OSError as exc:  # no inotify watches left, a file system without events
            self.log(f"no file events for {self.inbox} ({exc.strerror or exc}): polling every {POLL_S:g} s")
            return None
        return observer

    def claim(self) -> None:
        """Take the inbox: one watcher a folder (an exclusive flock on INBOX/.aae-watch.lock, let go
        when the watcher ends or its process dies); two would score the same files twice. Raises
        InputError when another watcher holds it; a folder that cannot hold the lock file (read-only)
        is watched without it, with a note."""
        if self._claimed:
            return
        try:
            self._take_inbox()
        except BaseException:
            self.release()
            raise
        self._claimed = True  # once: its checks and notes are not repeated by run()

    def _take_inbox(self) -> None:
        for name, folder in (("--done", self.done), ("--failed", self.failed)):  # checked once, not failed per file
            if folder is not None:
                existing = next(p for p in (folder, *folder.parents) if p.exists())  # made on the first move
                try:
                    tempfile.TemporaryFile(dir=existing).close()
                except OSError as exc:
                    raise InputError(f"{name} {folder} cannot be written ({exc.strerror or exc}): name a folder this "
                                     "user can write, or leave the images in place (without it)") from None
        try:
            import fcntl
        except ImportError:  # Windows: no flock
            return
        try:
            fd = os.open(self.inbox / WATCH_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            self.log(f"cannot lock {self.inbox} ({exc.strerror or exc}): a second watcher of it would not be refused")
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"another aae-run watch is watching {self.inbox}: stop it first, or watch another folder "
                             "(two would score the same files twice)") from None
        except OSError:  # a file system without flock: as on Windows
            os.close(fd)
            return
        self._claim = fd

    def release(self) -> None:
        if self._claim is not None:
            os.close(self._claim)
            self._claim = None
        self._claimed = False

    def run(self, until: Callable[[], bool] | None = None) -> WatchStats:
        """Watch until ``stop()`` (or ``until()`` is true); returns the counts."""
        self.claim()
        try:
            self.ledger.open()
            self.stats.dropped_rows = self.ledger.dropped_rows
            self._recover()
            self.observer = None if self.poll else self._start_events()
            while not self.stopping.is_set() and not (until and until()):
                batch = self._ready()
                if batch:
                    self._score(batch)
                    continue
                # files waiting to settle are looked at again soon, never in a busy loop (--settle 0)
                self.changed.wait(max(MIN_WAIT_S, min(POLL_S, self.settle_s)) if self.pending else POLL_S)
                self.changed.clear()
        finally:
            if self.observer is not None:
                self.observer.stop()
                self.observer.join(timeout=5)
            self.release()
        return self.stats

    def stop(self) -> None:
        self.stopping.set()
        self.changed.set()

    # -- the steps ---------------------------------------------------------------------------------
    def _files(self) -> list[tuple[Path, os.stat_result]]:
        out = []

        def unreadable(exc: OSError) -> None:  # a sub-folder os.walk cannot list
            self._note_once(Path(exc.filename or self.inbox), f"{exc.filename} cannot be listed ({exc.strerror or exc}): "
                                                                "its images are not scored")

        for root, dirs, files in os.walk(self.inbox, onerror=unreadable):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            here = Path(root)
            if self._is_destination(here):
                dirs[:] = []
                continue
            for d in dirs:  # os.walk does not enter links (a loop would never end): say so once
                if (here / d).is_symlink():
                    self._note_once(here / d, f"{here / d} is a link to a folder: not watched (watch its target itself)")
            for name in sorted(files):
                path = here / name
                if not _candidate(path):
                    continue
                try:
                    st = path.stat()
                except OSError:  # gone between the listing and now, or a link to nothing
                    if path.is_symlink():
                        self._note_once(path, f"{path} is a dangling link: not scored")
                    continue
                if os.path.isfile(path):
                    out.append((path, st))
                else:
                    self._note_once(path, f"{path} is not a regular file (a FIFO, a device): not scored")
        return out

    def _note_once(self, path: Path, line: str) -> None:
        if path not in self.noted:
            self.noted.add(path)
            self.log(line)

    def _seen(self, path: Path, st: os.stat_result) -> Seen:
        """A file under INBOX as the ledger names it (by its resolved path)."""
        return Seen.of(self.root / path.relative_to(self.inbox), st)

    def _is_destination(self, folder: Path) -> bool:
        return any(d is not None and folder.resolve() == d.resolve() for d in (self.done, self.failed))

    def _recover(self) -> None:
        """Files a committed batch handled but did not move (killed in between): move them now."""
        if self.done is None and self.failed is None:
            return
        present = {self._seen(p, st): p for p, st in self._files()}
        handled = [s for s in present if s in self.ledger.seen]
        failed_paths = self._failed_paths({str(present[s]) for s in handled if self.ledger.seen[s] is None})
        moved = [s for s in handled if self._move(present[s], bool(self.ledger.seen[s]) or str(present[s]) in failed_paths)]
        self.ledger.forget(moved)
        self.stats.recovered = len(moved)
        if moved:
            self.log(f"moved on {len(moved)} files a batch had scored before the watcher stopped")

    def _failed_paths(self, paths: set[str]) -> set[str]:
        """Which of ``paths`` have an error in the results (ledger lines written before the ledger
        kept this itself; read from the results file, only at start)."""
        if not paths:
            return set()
        failed = set()
        with open(self.ledger.output, encoding="utf-8", newline="") as f:
            rows = csv.DictReader(f) if self.ledger.suffix == ".csv" else (json.loads(line) for line in f)
            for row in rows:
                if row.get("path") in paths and row.get("error"):
                    failed.add(row["path"])
        return failed

    def _ready(self) -> list[tuple[Path, os.stat_result]]:
        """Up to batch_size files unchanged for settle_s and not handled yet."""
        now = time.monotonic()
        ready, seen_now = [], set()
        for path, st in self._files():
            seen_now.add(path)
            if self._seen(path, st) in self.ledger.seen:
                continue
            key = (st.st_size, st.st_mtime_ns)
            before = self.pending.get(path)
            if before is None or before[:2] != key:
                self.pending[path] = (*key, now)
                continue
            if now - before[2] >= self.settle_s and len(ready) < self.batch_size and not self._rechecking(path, st, now):
                ready.append((path, st))
        for gone in set(self.pending) - seen_now:
            del self.pending[gone]
            self.unreadable.pop(gone, None)
        return ready

    def _rechecking(self, path: Path, st: os.stat_result, now: float) -> bool:
        """Whether ``path``, unreadable when last read and unchanged since, waits for its second look."""
        failed = self.unreadable.get(path)
        return failed is not None and failed[0] == _version(st) and now - failed[1] < self.recheck_s

    def _second_look(self, path: Path, st: os.stat_result) -> bool:
        """Whether ``path``, which could not be read, is read again before its error row is written:
        yes, unless this same file could not be read before either (see the module docstring)."""
        if self.unreadable.get(path, (None,))[0] == _version(st):
            del self.unreadable[path]
            return False
        self.unreadable[path] = (_version(st), time.monotonic())
        return True

    def _score(self, batch: list[tuple[Path, os.stat_result]]) -> None:
        started = {p: self.pending.get(p, (0, 0, time.monotonic()))[2] for p, _ in batch}
        rows = list(self.model.iter_score_paths([p for p, _ in batch], batch_size=self.batch_size))
        handled, kept = [], []
        for (path, st), row in zip(batch, rows):
            try:
                now = path.stat()
            except OSError:
                now = None
            if now is not None and _version(now) != _version(st):
                continue  # replaced while it was scored: the new file gets its own turn (a deleted one keeps its row)
            if not row.ok and now is not None and self._second_look(path, st):
                continue
            self.unreadable.pop(path, None)
            handled.append((path, self._seen(path, st)))
            kept.append(row)
        try:
            self.ledger.commit(rows_as_dicts(kept, self.model.threshold), [s for _, s in handled], [not r.ok for r in kept])
        except OSError as exc:  # a full disk: nothing moved, nothing committed; a restart scores the batch again
            raise InputError(f"cannot write the results to {self.ledger.output} ({exc.strerror or exc}): the images stay "
                             "in the inbox; free space and start the watcher again") from None
        done_at = time.monotonic()
        moved = []
        for (path, seen), row in zip(handled, kept):
            self.pending.pop(path, None)
            self.stats.latencies_s.append(done_at - started.get(path, done_at))
            if self._move(path, not row.ok):
                moved.append(seen)
        self.ledger.forget(moved)  # a file that stays in INBOX stays in the ledger: it is not scored again
        self.stats.batches += 1
        self.stats.scored += sum(r.ok for r in kept)
        self.stats.failed += sum(not r.ok for r in kept)

    def _move(self, path: Path, failed: bool) -> bool:
        """Move a handled file to --done or --failed; whether it has left INBOX."""
        target_dir = self.failed if failed and self.failed is not None else self.done
        if not path.exists():  # deleted after it was read: its row says what became of it
            return True
        if target_dir is None:
            return False
        rel = path.relative_to(self.inbox)
        target = target_dir / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():  # a name used before: keep both
                target = target.with_name(f"{target.stem}.{time.time_ns()}{target.suffix}")
            shutil.move(str(path), str(target))
        except OSError as exc:
            self.log(f"could not move {path} to {target_dir} ({exc.strerror or exc}); its row is written, it stays")
            return False
        return True
