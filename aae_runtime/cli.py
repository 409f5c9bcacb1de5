"""`aae-run`: score images, sample the prior, describe a model. A thin layer over `AAEModel`.

Exit codes (all commands):
  0  everything done: every image found was scored;
  1  ran, but some input files could not be scored: each has its own row with the reason
     (corrupt, truncated, not an image, too large, unreadable, ...); all other files were scored;
  2  could not run: bad arguments, missing or unusable model, device unavailable, no given
     path yields an image file, the results file cannot be written (the table is still shown),
     or an unexpected internal error (always one line, never a traceback; set AAE_DEBUG=1 to
     see the traceback of an internal error);
  130 interrupted by Ctrl-C (SIGINT), 143 stopped by SIGTERM: the rows scored so far are kept
     (--output streams them as they come; a .json run leaves X.json.partial).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import typer

from aae_runtime import __version__
from aae_runtime.clierrors import EXIT_CANNOT_RUN, OneLineErrorsTyper, Terminated, print_error, signal_name
from aae_runtime.console import Console, Table, counted, display_path, literal
from aae_runtime.contract.errors import AAEError
from aae_runtime.images import IMAGE_SUFFIXES, find_images, first_shared, save_grid
from aae_runtime.contract.metadata import ENCODER_FILE, METADATA_KEY
from aae_runtime.model import DEFAULT_BATCH_SIZE, AAEModel, ImageScore, file_scoring_threads
from aae_runtime.report import FORMATS as RESULT_FORMATS, ResultStream
from aae_runtime.session import DEVICES, SessionConfig

EXIT_OK, EXIT_SOME_FAILED = 0, 1
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # Ctrl-C (SIGINT), SIGTERM: 128 + the signal's number
PROGRESS_EVERY_S = 0.25  # score/classify on a terminal: the status line's refresh
MAX_GRID_ROWS = 1000  # sample --grid: rows x classes images are decoded at once  # EXIT_CANNOT_RUN = 2 comes from clierrors, shared by all commands

EXIT_CODES_HELP = (
    "Exit codes: 0 all images scored; 1 some files could not be scored (each has an error row); "
    "2 could not run (bad arguments or model, no images, results file not writable, unexpected error); "
    "130 Ctrl-C, 143 SIGTERM (rows so far kept)."
)


app = OneLineErrorsTyper(add_completion=False, no_args_is_help=True,
                        help=f"Score images and sample from an exported AAE (no torch needed). {EXIT_CODES_HELP}")
out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="Model folder written by aae-export (MODEL.json and versions/).")]
DeviceOpt = Annotated[Literal[DEVICES], typer.Option(help="Execution device. auto falls back to the CPU with a notice.")]
ThreadsOpt = Annotated[int, typer.Option(min=0, max=1024, help="CPU threads per inference call (0: one per physical core; 1 leaves cores to other work).")]
FileThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", min=0, max=1024, help="CPU threads per inference call (default: the cores the image decoders leave, "
    "all of them for a model trained on crops; 0: one per physical core; 1 leaves cores to other work).")]
LowLatencyOpt = Annotated[bool, typer.Option(
    "--low-latency", help="For a box that does nothing but score: CPU threads spin up to 1 ms between calls, "
    "halving the latency of images scored back to back (bursts), at the cost of a busy core after each call.")]


def _fail(exc: AAEError) -> typer.Exit:
    print_error(str(exc), err)  # literal: messages carry file names, and "x[/]y" must not be read as markup
    return typer.Exit(EXIT_CANNOT_RUN)


def _named(text: str) -> str:
    """A file name in a usage error's message: control characters escaped (the message is
    printed by `print_error`, which escapes markup itself)."""
    return display_path(text, controls=True)


def _check_output(output: Path | None) -> None:
    if output is not None and output.suffix.lower() not in RESULT_FORMATS:
        raise typer.BadParameter(f"{_named(str(output))}: use a file name ending in {' or '.join(RESULT_FORMATS)}",
                                 param_hint="--output")


def _check_apart(model: Path, **files: Path | None) -> None:
    """Refuse result files (option name -> path) that would overwrite each other, the maps'
    index, or a file of the model folder being read: the run's results would be lost."""
    maps = files.pop("maps", None)
    home = os.path.realpath(model)
    seen: dict[str, str] = {}
    if maps is not None:
        from aae_runtime.maps import INDEX_NAME

        real = os.path.realpath(maps)
        if real == home or real.startswith(home + os.sep):
            raise typer.BadParameter(f"{_named(str(maps))} is inside the model folder {_named(str(model))}: write the "
                                     "maps elsewhere (a calibration prunes the model's old versions)", param_hint="--maps")
        seen[os.path.realpath(maps / INDEX_NAME)] = "--maps (its index, maps.csv)"
    for option, path in files.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real == home or real.startswith(home + os.sep):
            raise typer.BadParameter(f"{_named(str(path))} is inside the model folder {_named(str(model))}: "
                                     "write the results elsewhere", param_hint=option)
        if real in seen:
            raise typer.BadParameter(f"{_named(str(path))} is also the file of {seen[real]}: give each its own file",
                                     param_hint=option)
        seen[real] = option


def _load(model: Path, device: str, threshold: float | None = None, threshold_percentile: float | None = None,
          threads: int | None = 0, low_latency: bool = False) -> AAEModel:
    """The model, on ``threads`` intra-op threads (None: those `file_scoring_threads` gives)."""
    if threads is None:
        threads = 0 if low_latency else file_scoring_threads(_is_tiled(model))
    cfg = SessionConfig.low_latency(device, threads) if low_latency else SessionConfig(device=device, threads=threads)
    m = AAEModel.load(model, session_config=cfg, threshold=threshold, threshold_percentile=threshold_percentile)
    if m.notice:
        err.print(f"[yellow]notice:[/yellow] {m.notice}")
    err.print(f"execution provider: {m.providers[0]}", highlight=False)
    return m


def _is_tiled(model: Path) -> bool:
    """Whether the model folder's metadata has a tiling block (read from the encoder's file, no
    session; a folder that cannot be read is reported by the load that follows)."""
    from aae_runtime.contract.modelfolder import current_version
    from aae_runtime.contract.onnxwire import read_graph_file

    try:
        text = read_graph_file(current_version(model) / ENCODER_FILE).custom_metadata_map.get(METADATA_KEY, "")
        return bool(json.loads(text).get("tiling"))
    except (AAEError, ValueError, AttributeError):
        return False


@app.command(short_help="Score images; higher = more abnormal.", epilog=EXIT_CODES_HELP)
def score(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    model: ModelOpt,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write all rows to a .csv, .jsonl or .json file, as they come.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Anomaly threshold as a score value; overrides the model's metadata.")] = None,
    threshold_percentile: Annotated[Optional[float], typer.Option(
        min=0.0, max=100.0, help="Anomaly threshold at this percentile of the normal scores stored at calibration.")] = None,
    maps: Annotated[Optional[Path], typer.Option(help="Write a per-pixel error heat map PNG per scored image into this folder.")] = None,
    maps_only_flagged: Annotated[bool, typer.Option(help="With --maps: only for images flagged as anomalous.")] = False,
    maps_raw: Annotated[bool, typer.Option(help="With --maps: also save each map's values as NAME.npy (float32, the photo's "
                                                "height x width for a model trained on crops), listed in maps.csv.")] = False,
    regions: Annotated[Optional[Path], typer.Option(help="Write the connected regions above the model's map threshold to "
                                                         "this .csv (path, region, x, y, width, height, area, peak; untiled models: in the model input's pixels).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096, help="Images (tiled models: tiles) per inference call.")] = DEFAULT_BATCH_SIZE,
    show: Annotated[int, typer.Option(min=0, help="Rows shown on screen (0: all).")] = 50,
    device: DeviceOpt = "auto",
    threads: FileThreadsOpt = None,
    low_latency: LowLatencyOpt = False,
) -> None:
    """Score images; higher = more abnormal. Rows give the raw score and normalized_score
    (0.5 at the threshold, clamped to [0, 1])."""
    if threshold is not None and threshold_percentile is not None:
        raise typer.BadParameter("give --threshold or --threshold-percentile, not both", param_hint="--threshold")
    if maps_only_flagged and maps is None:
        raise typer.BadParameter("--maps-only-flagged needs --maps DIR", param_hint="--maps-only-flagged")
    if maps_raw and maps is None:
        raise typer.BadParameter("--maps-raw needs --maps DIR", param_hint="--maps-raw")
    if regions is not None and regions.suffix.lower() != ".csv":
        raise typer.BadParameter(f"{_named(str(regions))}: use a file name ending in .csv", param_hint="--regions")
    if regions is not None:
        _check_parent_exists(regions, "--regions")
    _check_output(output)  # before scoring: a bad name must not cost a whole run's results
    _check_apart(model, **{"--output": output, "--regions": regions, "maps": maps})
    if maps is not None:
        real = Path(os.path.realpath(maps))
        for path in paths:
            if os.path.isdir(path) and Path(os.path.realpath(path)) in (real, *real.parents):
                raise typer.BadParameter(f"{_named(str(maps))} is inside {_named(str(path))}, which is being scored: "
                                         "the next run would score the maps; write them elsewhere", param_hint="--maps")
    if output is not None:
        _create_parent(output, "--output")
    if maps is not None:
        _create_parent(maps, "--maps")
    with _stop_signals() as signals:
        try:
            m = _load(model, device, threshold, threshold_percentile, threads, low_latency)
            region_rows: list[tuple] = []
            status = _status_line(paths)
            rows = _rows_with_maps(m, paths, batch_size, maps, maps_only_flagged, maps_raw, region_rows if regions else None,
                                   status.tiles if status else None)
            results, stream, stopped = _collect(rows, output, m.threshold, None, batch_size, signals, status)
            if regions is not None:
                with signals.held():
                    _write_regions(region_rows, regions)
        except AAEError as exc:
            raise _fail(exc)
        _end(results, output, stream, stopped, signals, lambda rows: _print_scores(rows, m, show))


class _StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM during a run: raised at once while it scores (a photo may take
    seconds), held while it records a row or finishes (raised when that is done), so the rows
    counted, shown and written always agree. SIGTERM (a service manager stopping us) ends a run
    as Ctrl-C does; its exit code is 143."""

    def __init__(self):
        self.holding, self.pending = 0, None

    def _handler(self, signum, frame):
        exc = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        if not self.holding:
            raise exc
        self.pending = self.pending or exc

    @contextlib.contextmanager
    def held(self, deliver: bool = True):
        """Signals wait until the block is done, then are raised (``deliver``) or wait for the
        next held block's end."""
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
        if deliver and not self.holding and self.pending is not None:
            exc, self.pending = self.pending, None
            raise exc


@contextlib.contextmanager
def _stop_signals():
    """A `_StopSignals` handling SIGINT and SIGTERM within; outside the main thread (an embedding
    application) its handlers are left alone and ``held`` holds nothing."""
    signals = _StopSignals()
    try:
        previous = {sig: signal.signal(sig, signals._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield signals
        return
    try:
        yield signals
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _collect(rows, output: Path | None, threshold: float, classes, batch_size: int, signals: _StopSignals,
             status: "_StatusLine | None" = None):
    """All rows of a run, streamed to ``output`` as they come (`ResultStream`). Returns the rows,
    the stream (None without ``output``) and the signal that stopped the run early, if any;
    ``status`` hears of each row."""
    stream = ResultStream(output, threshold, classes, flush_every=batch_size) if output is not None else None
    results: list[ImageScore] = []
    stopped = None
    try:
        for r in rows:
            with signals.held():  # a row is in both lists or in neither
                results.append(r)
                if stream is not None:
                    stream.write([r])
            if status is not None:
                status.images(len(results))
    except KeyboardInterrupt as exc:
        stopped = signal_name(exc)
    finally:
        with signals.held(deliver=False):  # a signal now waits for `_end`, which reports the rows first
            if status is not None:
                err.clear_status()
            if stream is not None:
                stream.close(complete=stopped is None)
    return results, stream, stopped


def _end(results: list[ImageScore], output: Path | None, stream, stopped: str | None, signals: _StopSignals,
         print_rows) -> None:
    """The table (``print_rows``, when there are rows) and `_finish`, with signals held: a Ctrl-C
    after the last image still lets the run say what it scored and where the rows are."""
    try:
        with signals.held():
            if results:  # none: _finish's one error line, no empty table
                print_rows(results)
            _finish(results, output, stream, stopped)
    except KeyboardInterrupt as exc:  # it came after the run had ended: nothing is lost
        late = signal_name(exc)
        err.print(f"[red]error:[/red] interrupted ({late}) after the run had ended", highlight=False)
        raise typer.Exit(EXIT_TERMINATED if late == "SIGTERM" else EXIT_INTERRUPTED) from None


def _status_line(paths: list[Path]) -> "_StatusLine | None":
    """`score`'s and `classify`'s status line where stderr is a terminal (the folder then listed
    once more, for the count), else None."""
    return _StatusLine(len(find_images(list(paths)))) if err.is_terminal else None


class _StatusLine:
    """The status line of a run on a terminal: for `score` and `classify` the images scored so far,
    of how many, and inside a photo whose tiles take a while, its tiles; for `calibrate`, which
    photo it is scoring. At most every PROGRESS_EVERY_S."""

    def __init__(self, total: int = 0):
        self.total, self.scored = total, 0
        self.started = time.monotonic()
        self.shown_at = self.started - PROGRESS_EVERY_S  # the first news shows at once

    def images(self, scored: int) -> None:
        self.scored = scored
        self.say(f"scored {scored} of {counted(self.total, 'image')}")

    def tiles(self, path: str, done: int, of: int) -> None:
        self.say(f"scored {self.scored} of {counted(self.total, 'image')}; ", name=display_path(Path(path).name, controls=True),
                 rest=f": {done} of {of} tiles")

    def say(self, text: str, name: str = "", rest: str = "", always: bool = False) -> None:
        """``text``, ``name`` (a file's, shortened first where the line is too wide), ``rest`` and
        the time since the start, unless the line changed less than PROGRESS_EVERY_S ago
        (``always``: whatever the time)."""
        now = time.monotonic()
        if always or now - self.shown_at >= PROGRESS_EVERY_S:
            self.shown_at = now
            s = int(now - self.started)
            err.status(text, name, f"{rest} ({s // 3600}:{s // 60 % 60:02d}:{s % 60:02d})")


@contextlib.contextmanager
def _status_cleared():
    """The status line erased however the block ends (an error, Ctrl-C), before anything else prints."""
    try:
        yield
    finally:
        err.clear_status()


def _finish(results: list[ImageScore], output: Path | None, stream, stopped: str | None) -> None:
    """The end of `score` and `classify`: say where the rows went, and the exit code they earn:
    130/143 when Ctrl-C/SIGTERM stopped the run (the rows so far are kept); 2 when the results
    file could not be written, or no given path yields an image file (all missing, or empty
    folders); 1 when some image files could not be scored."""
    if stream is not None and stream.error is None:
        where = stream.close(complete=stopped is None)
        if results:  # else the one error line below says why there is none
            err.print(f"wrote {counted(len(results), 'row')} to {literal(str(where))}", highlight=False)
    if stopped is not None:
        err.print(f"[red]error:[/red] interrupted ({stopped}) after {counted(len(results), 'image')}"
                  + (f"; their rows are in {literal(str(stream.written))}" if stream is not None and stream.error is None else ""),
                  highlight=False)
        raise typer.Exit(EXIT_TERMINATED if stopped == "SIGTERM" else EXIT_INTERRUPTED)
    if stream is not None and stream.error is not None:
        err.print(f"[red]error:[/red] {literal(stream.error)}: the table above has the rows; free space or "
                  "choose another --output", highlight=False)
        raise typer.Exit(EXIT_CANNOT_RUN)
    if not results:
        err.print("[red]error:[/red] no image file among the given paths (their folders hold no file ending in "
                  f"{', '.join(sorted(IMAGE_SUFFIXES))}): check the paths", highlight=False)
        raise typer.Exit(EXIT_CANNOT_RUN)
    if not any(r.ok or os.path.isfile(r.path) for r in results):
        first = results[0]
        err.print(f"[red]error:[/red] no image file among the given paths ({literal(first.path)}: "
                  f"{literal(first.error or '')}{', ...' if len(results) > 1 else ''}): check the paths", highlight=False)
        raise typer.Exit(EXIT_CANNOT_RUN)
    if any(not r.ok for r in results):
        raise typer.Exit(EXIT_SOME_FAILED)


def _create_parent(path: Path, option: str) -> None:
    """--output and --maps create the folders they need, and say so (every other output needs
    its folder to exist: a mistyped path must not become a new folder tree silently)."""
    folder = path.parent if option != "--maps" else path
    if folder.is_dir():
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise typer.BadParameter(f"cannot create folder {_named(str(folder))} ({exc.strerror or exc})", param_hint=option)
    err.print(f"created folder {literal(str(folder))} for {option}", highlight=False)


def _check_parent_exists(path: Path, option: str) -> None:
    if not path.parent.is_dir():
        raise typer.BadParameter(f"folder {_named(str(path.parent))} does not exist: create it, or write "
                                 "elsewhere", param_hint=option)


def _rows_with_maps(m: AAEModel, paths: list[Path], batch_size: int, maps: Path | None, only_flagged: bool,
                    raw: bool = False, regions: list | None = None, on_tiles=None):
    """The rows of `score`, one by one; maps are written (and, into ``regions``, one (path,
    Region) per region found) as rows come, so no batch's arrays outlive it. A map that cannot be
    written is that image's error, not the run's."""
    if maps is None and regions is None:
        yield from m.iter_score_paths(paths, batch_size=batch_size, on_tiles=on_tiles)
        return
    from aae_runtime.maps import MapWriter
    from aae_runtime.regions import find_regions

    lo, hi = m.metadata.raw.get("input", {}).get("value_range", [0.0, 1.0])
    scale = float(m.metadata.score.get("pixel_error_scale", 0.0)) or 1.0
    writer = MapWriter(maps, paths, scale, (float(lo), float(hi)), raw=raw) if maps is not None else None
    try:
        for r in m.iter_score_paths(paths, batch_size=batch_size, maps=True, on_tiles=on_tiles):
            if regions is not None and r.ok:
                regions.extend((r.path, region) for region in find_regions(r.pixel_error, m.map_threshold))
            if writer is not None and r.ok and (r.anomaly or not only_flagged):
                try:
                    writer.write(r.path, r.image, r.pixel_error)
                except OSError as exc:  # this image's problem (a name, a full disk): its row says so
                    r = replace(r, error=f"scored, but its map could not be written ({exc.strerror or exc})")
            yield replace(r, pixel_error=None, image=None)
    finally:
        if writer is not None:  # the index of the maps written, even when the run was stopped
            try:
                writer.close()
                err.print(f"wrote {counted(len(writer.rows), 'anomaly map')} to {literal(str(maps))} (index: maps.csv)", highlight=False)
            except OSError as exc:
                err.print(f"[red]error:[/red] --maps {literal(str(maps))}: cannot write maps.csv ({exc.strerror or exc})",
                          highlight=False)


def _write_regions(found: list[tuple], path: Path) -> None:
    """One CSV row per region: which image, its number in that image (largest peak first), box, area, peak."""
    import csv
    import io

    from aae_runtime.contract.fileio import atomic_write_text

    buf = io.StringIO()
    rows = csv.writer(buf, lineterminator="\n")
    rows.writerow(["path", "region", "x", "y", "width", "height", "area", "peak"])
    number: dict[str, int] = {}
    for image, r in found:
        number[image] = number.get(image, 0) + 1
        rows.writerow([display_path(image), number[image], r.x, r.y, r.width, r.height, r.area, f"{r.peak:.6g}"])
    try:
        atomic_write_text(path, buf.getvalue())
    except OSError as exc:
        raise AAEError(f"--regions {path}: cannot write ({exc.strerror or exc})") from None
    err.print(f"wrote {counted(len(found), 'region')} above the map threshold to {literal(str(path))}", highlight=False)


def _print_scores(results: list[ImageScore], m: AAEModel, show: int) -> None:
    # the columns are named as in the CSV and JSON rows (aae_runtime.report.FIELDS)
    table = Table(title=f"{m.score_name} score, threshold {m.threshold:.6g} ({m.threshold_source})")
    table.add_column("path", overflow="fold")
    table.add_column("score", justify="right", no_wrap=True)
    table.add_column("normalized_score", justify="right", no_wrap=True)
    table.add_column("anomaly", justify="center", no_wrap=True)
    table.add_column("error", overflow="fold")
    shown = results if show == 0 else results[:show]
    for r in shown:
        flag = "" if r.anomaly is None else ("[red]yes[/red]" if r.anomaly else "no")
        table.add_row(literal(r.path), "" if r.score is None else f"{r.score:.6f}",
                      "" if r.normalized_score is None else f"{r.normalized_score:.3f}", flag, literal(r.error or ""))
    out.print_table(table)
    if len(shown) < len(results):
        out.print(f"... {counted(len(results) - len(shown), 'more row')} (use --output FILE for all, or --show 0)")
    scored = [r for r in results if r.score is not None]  # a row may have its score and an error (its map not written)
    flagged, unmapped = sum(bool(r.anomaly) for r in scored), sum(not r.ok for r in scored)
    out.print(f"scored {counted(len(scored), 'image')}: {flagged} anomalous, {len(results) - len(scored)} failed"
              + (f"; {counted(unmapped, 'scored image')} without {'its map' if unmapped == 1 else 'their maps'}"
                 if unmapped else ""), highlight=False)


@app.command(short_help="Score every image that lands in a folder, once.")
def watch(
    inbox: Annotated[Path, typer.Argument(help="Folder the camera writes into (watched recursively).")],
    model: ModelOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Results file (.jsonl or .csv): one row per image, "
                                         "appended and flushed to disk per batch.")],
    done: Annotated[Optional[Path], typer.Option(help="Move each scored image here (its sub-folders kept).")] = None,
    failed: Annotated[Optional[Path], typer.Option(help="Move images that could not be scored here (default: --done).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096, help="Most images per inference call (a burst forms batches).")] = DEFAULT_BATCH_SIZE,
    settle: Annotated[float, typer.Option(min=0.0, max=3600.0, help="Seconds a file's size and time must stay unchanged "
                                          "before it is read (a slow writer, a copy in progress).")] = 0.5,
    poll: Annotated[bool, typer.Option("--poll", help="List the folder every 0.5 s instead of waiting for file events "
                                       "(network file systems without events).")] = False,
    device: DeviceOpt = "auto",
    threads: FileThreadsOpt = None,
) -> None:
    """Score every image that lands in INBOX, once (across restarts and SIGKILL), appending rows
    to --output and moving each image to --done or --failed. Stops on Ctrl-C or SIGTERM after
    the batch it is scoring (exit 0)."""
    from aae_runtime.watch import WATCH_FORMATS, Watcher

    if not inbox.is_dir():
        raise typer.BadParameter(f"folder {_named(str(inbox))} does not exist", param_hint="INBOX")
    if output.suffix.lower() not in WATCH_FORMATS:
        raise typer.BadParameter(f"{_named(str(output))}: use a file name ending in {' or '.join(WATCH_FORMATS)}",
                                 param_hint="--output")
    _check_apart(model, **{"--output": output})
    _create_parent(output, "--output")
    try:
        m = _load(model, device, threads=threads)
        watcher = Watcher(m, inbox, output, done=done, failed=failed, batch_size=batch_size, settle_s=settle, poll=poll,
                          log=lambda line: err.print(f"[yellow]note:[/yellow] {literal(line)}", highlight=False))
        watcher.claim()  # one watcher a folder: refused before it says it is watching
    except AAEError as exc:
        raise _fail(exc)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: watcher.stop())
    err.print(f"watching {literal(str(inbox))}; rows to {literal(str(output))}", highlight=False)
    try:
        stats = watcher.run()
    except AAEError as exc:
        raise _fail(exc)
    err.print(f"stopped: {counted(stats.scored, 'image')} scored, {stats.failed} failed, in {stats.batches} batches", highlight=False)


@app.command(short_help="Serve the model over HTTP (POST /score).")
def serve(
    model: ModelOpt,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs a token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on.")] = 8080,
    max_batch: Annotated[int, typer.Option(min=1, max=4096, help="Most images in one inference call.")] = 64,
    max_wait_ms: Annotated[float, typer.Option(min=0.0, max=1000.0, help="How long the first image of a batch waits for others.")] = 2.0,
    max_queue: Annotated[int, typer.Option(min=1, max=1_000_000, help="Images waiting at most; beyond: 503 and Retry-After.")] = 1024,
    max_body_mb: Annotated[float, typer.Option(min=0.001, max=4096.0, help="Largest request body.")] = 32.0,
    max_megapixels: Annotated[float, typer.Option(min=0.001, max=200.0, help="Largest image, in millions of pixels (a small "
                                                  "compressed upload can decode to a huge photo).")] = 16.8,
    max_request_megapixels: Annotated[float, typer.Option(min=0.001, max=10_000.0, help=(
        "Most pixels of all the photos of one request, for a model that tiles them (its work grows with the pixels: "
        "a few small uploads can claim minutes of it); beyond: 413."))] = 33.6,
    read_timeout: Annotated[float, typer.Option(min=0.1, max=3600.0, help=(
        "Seconds to receive a whole body (else 408), and a request's headers (else the connection is closed)."))] = 10.0,
    max_connections: Annotated[int, typer.Option(min=1, max=1_000_000, help=(
        "Open connections and requests in flight at most; beyond: 503 (clients that hold sockets open)."))] = 1024,
    token_file: Annotated[Optional[Path], typer.Option(help=f"File whose first line is the bearer token (else $AAE_TOKEN).")] = None,
    noop_endpoint: Annotated[bool, typer.Option("--noop-endpoint", help="Also POST /noop: reads the body, answers fixed JSON "
                                                "(the HTTP floor, for benchmarks).")] = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 0,
) -> None:
    """Serve the model over HTTP: POST /score, GET /model, /healthz, /readyz, /metrics (needs the
    [serve] extra). Concurrent requests share inference calls; a new model version in the folder
    (aae-run calibrate) is picked up without dropping a request. SIGTERM drains, then exits."""
    try:
        from aae_runtime import serve as service
    except ImportError as exc:
        raise _fail(AAEError(f"aae-run serve needs the [serve] extra ({exc.name} is missing): add the [serve] extra: pip install '.[cpu,serve]' from the source folder"))
    try:
        cfg = service.ServeConfig(host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                                  max_body_bytes=int(max_body_mb * 2**20), read_timeout_s=read_timeout,
                                  max_connections=max_connections,
                                  max_pixels=int(max_megapixels * 1e6), max_request_pixels=int(max_request_megapixels * 1e6),
                                  token=service.read_token(token_file), noop_endpoint=noop_endpoint)
        service.serve(model, cfg, SessionConfig(device=device, threads=threads),
                      log=lambda line: err.print(literal(line), highlight=False))
    except AAEError as exc:
        raise _fail(exc)


def _one_path_per_option(ctx: typer.Context, option: str) -> None:
    """Refuse ``NORMAL --anomalies A B`` (or ``--anomalies defects/*``): the option takes one path,
    so B would silently join the normal images; ``--anomalies A NORMAL``, options first, is fine.
    Read from the command line as typed (sys.argv), which Click does not keep."""
    argv = sys.argv[1:]
    if os.path.basename(sys.argv[0]) != ctx.find_root().info_name or ctx.info_name not in argv:
        return  # not this command's own command line (called from Python)
    tokens = argv[argv.index(ctx.info_name) + 1:]
    flags = {o for p in ctx.command.params if getattr(p, "is_flag", False) or getattr(p, "count", False)
             for o in (*p.opts, *p.secondary_opts)}
    positional_before, i = False, 0
    while i < len(tokens) and tokens[i] != "--":
        token = tokens[i]
        if token.startswith("-") and len(token) > 1:
            takes_value = "=" not in token and token not in flags
            if token == option and positional_before and i + 2 < len(tokens) and not tokens[i + 2].startswith("-"):
                raise typer.BadParameter(
                    f"{_named(tokens[i + 2])} follows {option} {_named(tokens[i + 1])} and would be taken as a normal "
                    f"path: {option} takes one path each time ({option} A {option} B; a shell pattern expands to "
                    f"several), normal paths go before the options", param_hint=option)
            i += 2 if takes_value else 1
        else:
            positional_before, i = True, i + 1


@app.command(short_help="Refit the score statistics and threshold on normal images.")
def calibrate(
    ctx: typer.Context,
    normal: Annotated[list[Path], typer.Argument(help="Normal (defect-free) image files and/or folders from the line.")],
    model: ModelOpt,
    anomalies: Annotated[Optional[list[Path]], typer.Option(
        help="Labelled anomalous images (file or folder; repeatable): the threshold becomes F1-optimal.")] = None,
    percentile: Annotated[float, typer.Option(min=0.001, max=100.0, help="Without --anomalies: threshold = this percentile of the normal scores.")] = 99.0,
    score: Annotated[Optional[str], typer.Option(help="Switch to another score (default: keep the model's).")] = None,
    threads: ThreadsOpt = 0,
) -> None:
    """Refit the score statistics and threshold on new normal images; rewrites the model's metadata (no torch)."""
    from aae_runtime.recalibrate import load_folder, recalibrate_dir
    from aae_runtime.contract.scores import SCORES

    if score is not None and score not in SCORES:
        raise typer.BadParameter(f"{score!r} is not one of {', '.join(SCORES)}", param_hint="--score")
    _one_path_per_option(ctx, "--anomalies")
    _writable_model(model)
    shared = first_shared(find_images(list(normal)), find_images(list(anomalies or [])))
    if shared is not None:
        raise typer.BadParameter(f"{_named(str(shared))} is given as normal and as anomalous: an F1 threshold "
                                 "needs two different sets of images", param_hint="--anomalies")
    failed, failed_anomalies = [], []
    switching: list[str] = []  # the version this calibration names, once it is about to switch to it
    try:
        with _stop_signals(), _status_cleared():
            m = _load(model, "cpu", threads=threads)
            good, failed = load_folder(m, normal)  # a tiled model's photos: decoded one at a time as they are scored
            bad_ones, failed_anomalies = load_folder(m, anomalies) if anomalies else (None, [])
            if m.tiling is not None and err.is_terminal:  # whole photos take a while each: say which one
                status = _StatusLine()
                for kind, photos in (("normal", good), ("anomalous", bad_ones)):
                    if photos is not None:
                        photos.on_photo = lambda i, n, f, kind=kind: status.say(
                            f"scoring {kind} photo {i + 1} of {n}: ", name=display_path(f.name, controls=True), always=True)
            meta = recalibrate_dir(model, good, bad_ones, score=score, percentile=percentile, source=CALIBRATE_SOURCE,
                                   threads=threads, waiting=lambda line: (err.clear_status(), err.print(literal(line))),
                                   switching=switching.append)
    except AAEError as exc:
        _print_skipped(failed + failed_anomalies)  # also when too few were left: which ones failed, and why
        raise _fail(exc)
    except KeyboardInterrupt as exc:  # say whether the model changed: the switch is one rename, the tidying after it not
        now = _version_name(model)  # another writer's switch meanwhile is not this calibration's
        state = (f"after the switch: {_named(str(model))} holds the new calibration ({now})" if switching and now == switching[0]
                 else f"this calibration changed nothing in {_named(str(model))}")
        err.print(f"[red]error:[/red] interrupted ({signal_name(exc)}): {state}", highlight=False)
        raise typer.Exit(EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED) from None
    _print_skipped(failed + failed_anomalies)
    t = meta["threshold"]
    n = t["stats"]["count"]
    how = (f"F1-optimal (F1 {t['f1']:.3f}) on {n} normal and {t['anomaly_count']} anomalous images; it flags "
           f"{100 - t['percentile']:.3g} % of the normal ones" if t["method"] == "f1" else f"{t['percentile']:g}th percentile of {n} normal images")
    out.print(f"recalibrated {literal(str(model))}: score {meta['score']['name']}, threshold {t['value']:.6g} = {how}", highlight=False)
    if failed or failed_anomalies:
        raise typer.Exit(EXIT_SOME_FAILED)


def _writable_model(model: Path) -> None:
    """Refuse, before any work, a --model that a writer must not update: a version of another
    model folder (it looks like a folder of the layout before versions)."""
    from aae_runtime.contract.modelfolder import enclosing_model

    outer = enclosing_model(model)
    if outer is not None:
        raise typer.BadParameter(f"{_named(str(model))} lies inside the versions of the model folder {_named(str(outer))}, "
                                 f"which only its writers change: give --model {_named(str(outer))}", param_hint="--model")


def _version_name(model: Path) -> str | None:
    """The version a model folder's pointer names (None: none, or unreadable)."""
    from aae_runtime.contract.modelfolder import current_version

    try:
        return current_version(model).name
    except AAEError:
        return None


def _print_skipped(failed: list[tuple[str, str]]) -> None:
    for path, reason in failed:
        err.print(f"[yellow]skipped[/yellow] {literal(path)}: {literal(reason)}", highlight=False)


@app.command(short_help="Decode draws from the model's prior into images.")
def sample(
    model: ModelOpt,
    n: Annotated[int, typer.Option("-n", "--num", min=1, max=100_000, help="Number of samples.")] = 64,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="A .png grid, or a .npy file with the raw (N, C, H, W) array.")] = Path("samples.png"),
    seed: Annotated[Optional[int], typer.Option(min=0, max=2**63 - 1, help="Seed for the prior draws (default: random).")] = None,
    label: Annotated[Optional[str], typer.Option(help="Conditional models: draw images of this class (a class value, e.g. 7).")] = None,
    grid: Annotated[bool, typer.Option("--grid", help="Conditional models: -n style codes as rows, one column per class.")] = False,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 0,
) -> None:
    """Decode draws from the model's prior into images (a conditional model: of a class, or a grid)."""
    if out_path.suffix.lower() not in (".png", ".npy"):
        raise typer.BadParameter(f"{out_path}: use a .png or .npy file name", param_hint="--out")
    if grid and label is not None:
        raise typer.BadParameter("give --label or --grid, not both", param_hint="--grid")
    if grid and n > MAX_GRID_ROWS:
        raise typer.BadParameter(f"{n} rows: a grid has at most {MAX_GRID_ROWS} rows (style codes)", param_hint="-n")
    _check_parent_exists(out_path, "--out")
    try:
        m = _load(model, device, threads=threads)
        if label is not None and m.classes and label not in m.classes:
            raise typer.BadParameter(f"{label!r} is not a class of this model; choose one of {', '.join(m.classes)}",
                                     param_hint="--label")
        images = m.sample_grid(n, seed=seed) if grid else m.sample(n, seed=seed, label=label)
    except AAEError as exc:
        raise _fail(exc)
    try:  # both atomic: a full disk or a kill leaves the previous file, never half of a new one
        if out_path.suffix.lower() == ".npy":
            from aae_runtime.contract.fileio import atomic_write

            atomic_write(out_path, lambda f: np.save(f, images))
        else:
            save_grid(images, out_path, ncols=len(m.classes) if grid else None)
    except OSError as exc:
        raise _fail(AAEError(f"--out {out_path}: cannot write ({exc.strerror or exc}); the previous file, if any, is unchanged"))
    what = counted(len(images), "sample") + (f" of class {label}" if label is not None else "") + (" (rows: style codes, columns: classes)" if grid else "")
    err.print(f"wrote {what} from the {m.metadata.prior['name']} prior to {literal(str(out_path))}", highlight=False)


@app.command(short_help="Image and pixel AUROC of a model on your own parts.", epilog=EXIT_CODES_HELP)
def evaluate(
    ctx: typer.Context,
    normal: Annotated[list[Path], typer.Argument(help="Normal (good) photos: files and/or folders.")],
    model: ModelOpt,
    anomalies: Annotated[list[Path], typer.Option(help="Defective photos (file or folder; repeatable). One sub-folder per "
                                                       "defect kind gives per-kind detection rates.")],
    masks: Annotated[Optional[Path], typer.Option(help="Folder of defect masks (white on the defect), named as the defective "
                                                       "photos: adds the pixel AUROC of the maps.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write the figures to this .json file.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Anomaly threshold as a score value; overrides the model's metadata.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096, help="Images (tiled models: tiles) per inference call.")] = DEFAULT_BATCH_SIZE,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 0,
) -> None:
    """Measure a model on your own parts: image AUROC, pixel AUROC (with --masks), false alarms
    and detections at the model's threshold."""
    import json as _json

    from aae_runtime.evaluate import evaluate as run_evaluation

    _one_path_per_option(ctx, "--anomalies")
    if masks is not None:
        for photos in (*normal, *anomalies):
            a, b = masks.resolve(), photos.resolve()
            if a == b or a in b.parents or b in a.parents:
                raise typer.BadParameter(f"{_named(str(masks))} overlaps the photos' {_named(str(photos))}: the masks "
                                         "would be scored as photos; keep them in a folder of their own", param_hint="--masks")
    if output is not None and output.suffix.lower() != ".json":
        raise typer.BadParameter(f"{_named(str(output))}: use a file name ending in .json", param_hint="--output")
    if output is not None:
        _create_parent(output, "--output")
    try:
        m = _load(model, device, threshold, threads=threads)
        result = run_evaluation(m, normal, anomalies, masks, batch_size)
        if output is not None:
            from aae_runtime.contract.fileio import atomic_write_text

            atomic_write_text(output, _json.dumps(result.to_dict(), indent=2))
    except AAEError as exc:
        raise _fail(exc)
    except OSError as exc:
        raise _fail(AAEError(f"--output {output}: cannot write ({exc.strerror or exc})"))
    for path, reason in result.failed:
        err.print(f"[yellow]skipped[/yellow] {literal(path)}: {literal(reason)}", highlight=False)
    for note in result.notes:
        err.print(f"[yellow]note:[/yellow] {literal(note)}", highlight=False)
    table = Table(title=f"{m.score_name} score, threshold {m.threshold:.6g} ({m.threshold_source})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("image AUROC", f"{result.image_auroc:.4f}")
    if result.pixel_auroc is not None:
        table.add_row("pixel AUROC" + ("" if result.pixel_auroc_exact else " (pixel subsample)"),
                      f"{result.pixel_auroc:.4f} ({result.masked} masks)")
    table.add_row("false alarms at threshold", f"{result.false_alarms} of {result.normal} ({result.false_alarm_rate:.1%})")
    table.add_row("detections at threshold", f"{result.detections} of {result.anomalous} ({result.detection_rate:.1%})")
    for kind, k in sorted(result.per_kind.items()):
        if len(result.per_kind) > 1:
            table.add_row(f"  detected: {literal(kind)}", f"{k['detected']} of {k['images']} ({k['detected'] / k['images']:.1%})")
    out.print_table(table)
    if output is not None:
        err.print(f"wrote {literal(str(output))}", highlight=False)
    if result.failed:
        raise typer.Exit(EXIT_SOME_FAILED)


@app.command(short_help="Classify images (a model with a class head).", epilog=EXIT_CODES_HELP)
def classify(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    model: ModelOpt,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write all rows to a .csv, .jsonl or .json file, as they come.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096, help="Images per inference call.")] = DEFAULT_BATCH_SIZE,
    show: Annotated[int, typer.Option(min=0, help="Rows shown on screen (0: all).")] = 50,
    device: DeviceOpt = "auto",
    threads: FileThreadsOpt = None,
) -> None:
    """Classify images with a model that has a class head (--family semi), and score them.
    Rows: path, label, confidence, p_<class> per class, score, anomaly, error."""
    _check_output(output)
    _check_apart(model, **{"--output": output})
    if output is not None:
        _create_parent(output, "--output")
    with _stop_signals() as signals:
        try:
            m = _load(model, device, threads=threads)
            if not m.metadata.classifies:
                raise AAEError(f"{model} has no class head, so it cannot classify: train with --family semi "
                               "(aae-run score gives its anomaly scores)")
            status = _status_line(paths)
            rows = m.iter_score_paths(paths, batch_size=batch_size, classify=True)
            results, stream, stopped = _collect(rows, output, m.threshold, m.classes, batch_size, signals, status)
        except AAEError as exc:
            raise _fail(exc)
        _end(results, output, stream, stopped, signals, lambda rows: _print_classes(rows, m, show))


def _print_classes(results: list[ImageScore], m: AAEModel, show: int) -> None:
    table = Table(title=f"classes {', '.join(map(literal, m.classes))}; {m.score_name} score, threshold {m.threshold:.6g}")
    for name, justify in (("path", "left"), ("label", "center"), ("confidence", "right"), ("score", "right"),
                          ("anomaly", "center"), ("error", "left")):
        table.add_column(name, justify=justify, overflow="fold" if name in ("path", "error") else None,
                         no_wrap=name not in ("path", "error"))
    shown = results if show == 0 else results[:show]
    for r in shown:
        p = r.probabilities
        best = int(p.argmax()) if p is not None else None
        table.add_row(literal(r.path), "" if p is None else literal(m.classes[best]), "" if p is None else f"{p[best]:.3f}",
                      "" if r.score is None else f"{r.score:.6f}",
                      "" if r.anomaly is None else ("[red]yes[/red]" if r.anomaly else "no"), literal(r.error or ""))
    out.print_table(table)
    if len(shown) < len(results):
        out.print(f"... {counted(len(results) - len(shown), 'more row')} (use --output FILE for all, or --show 0)")
    failed = sum(not r.ok for r in results)
    out.print(f"classified {counted(len(results) - failed, 'image')}, {failed} failed", highlight=False)


@app.command(short_help="Describe the model: inputs, prior, score, threshold.")
def info(
    model: ModelOpt,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole metadata as JSON (score statistics and quantiles included).")] = False,
) -> None:
    """Describe the model (what it takes, its prior, score and threshold) and the execution providers."""
    from aae_runtime.session import usable_providers

    try:
        m = _load(model, device)
        usable = usable_providers()
    except AAEError as exc:
        raise _fail(exc)
    if as_json:
        out.print_json(json.dumps(m.metadata.raw))
    else:
        for name, value in describe(m.metadata.raw):
            out.print(f"{name + ':':<11}{literal(value)}", highlight=False)
        out.print(f"{'':<11}(all metadata: aae-run info --model {literal(str(model))} --json)", highlight=False)
    to = err if as_json else out  # --json: stdout is the JSON alone, for a program to read
    to.print(f"providers usable here: {', '.join(usable)}", highlight=False)
    to.print(f"providers running:   {', '.join(m.providers)}", highlight=False)


CALIBRATE_SOURCE = "normal images given to aae-run calibrate"  # the threshold's "source": after its count in `info`
_OLD_CALIBRATE_SOURCE = "aae-run calibrate: "


def describe(meta: dict) -> list[tuple[str, str]]:
    """A model's metadata as a few labelled lines (what `aae-run info` prints)."""
    pre, prior, t = meta.get("preprocessing", {}), meta.get("prior", {}), meta.get("threshold", {})
    shape = meta.get("input", {}).get("shape", [])
    params = ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}"
                       for k, v in prior.items() if k not in ("name", "dim") and not isinstance(v, (list, dict)))
    lines = [
        ("family", f"{meta.get('family', 'aae')} (schema {meta.get('schema_version')}, export {meta.get('export_id', '?')[:12]})"),
        ("graphs", ", ".join(g.get("file", name) for name, g in meta.get("graphs", {}).items())),
        ("input", f"{' x '.join(map(str, shape[1:]))} ({pre.get('color_mode')}, " + (
            "tiles of each photo at its own resolution)" if meta.get("tiling") else
            f"images resized to {'x'.join(map(str, pre.get('size', [])))} {pre.get('resample')})")
            + ("; photos turned upright by their EXIF tag" if pre.get("orientation") == "exif" else "")),
        ("latent", f"{meta.get('latent_dim')}-D, prior {prior.get('name')}" + (f" ({params})" if params else "")),
    ]
    if meta.get("tiling"):
        tiling = meta["tiling"]
        lines.append(("tiling", f"{'x'.join(map(str, tiling.get('tile', [])))} tiles, stride {'x'.join(map(str, tiling.get('stride', [])))}, "
                                f"map smoothed by sigma {tiling.get('smooth_sigma')} px; image score = the map's maximum"))
    if meta.get("classes"):
        lines.append(("classes", ", ".join(map(str, meta["classes"]))))
    how = f"{t.get('percentile'):g}th percentile" if t.get("method") == "percentile" else t.get("method", "?")
    source = str(t.get("source", "images"))
    if source.startswith(_OLD_CALIBRATE_SOURCE):  # written by 0.2.0's calibrate, the count inside: "aae-run calibrate: 15 normal images"
        of = f"{source.removeprefix(_OLD_CALIBRATE_SOURCE)} given to aae-run calibrate"
    else:
        of = f"{t.get('stats', {}).get('count', '?')} {source}"
    lines.append(("score", f"{meta.get('score', {}).get('name')}; threshold {t.get('value', float('nan')):.6g} ({how} of {of})"))
    prov = meta.get("provenance", {})
    lines.append(("trained", f"epoch {prov.get('checkpoint_epoch', '?')}, exported {prov.get('exported_at', '?')}, "
                             f"checkpoint sha256 {str(prov.get('checkpoint_sha256', '?'))[:16]}..."))
    return lines


@app.command(short_help="Time scoring and sampling on this machine.")
def bench(
    model: ModelOpt,
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Folder for latency.json, latency.md and latency.png.")] = Path("bench-results"),
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,64,256",
    device: DeviceOpt = "auto",
    rounds: Annotated[Optional[int], typer.Option(min=1, max=1000, help="Round-robin rounds over all cases (default 15).")] = None,
    slice_s: Annotated[Optional[float], typer.Option("--slice", min=0.0, max=60.0, help="Seconds per case per round (default 0.07).")] = None,
    cold_start_runs: Annotated[int, typer.Option(min=0, max=100, help="Fresh `aae-run score` processes to time (0: skip).")] = 7,
    folder_images: Annotated[int, typer.Option(min=0, max=100_000, help="PNG files in the folder-scoring test (0: skip).")] = 512,
    sweep: Annotated[bool, typer.Option(help="Also time every combination of threads, spinning and optimisation level.")] = False,
) -> None:
    """Time scoring and sampling (median, p90, p99, throughput) per batch size and execution setup."""
    try:
        sizes = [int(t) for t in batch_sizes.split(",") if t.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1 or max(sizes) > 65536:
        raise typer.BadParameter(f"{batch_sizes!r}: give positive integers separated by commas, e.g. 1,8,64", param_hint="--batch-sizes")
    _check_parent_exists(out_dir, "--out-dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise typer.BadParameter(f"{_named(str(out_dir))} is a file, not a folder: name a folder for the report",
                                 param_hint="--out-dir")
    from aae_runtime import bench as b  # only this command pays for the benchmark code

    timing = b.Timing()  # defaults live there, with the reason for them
    rounds = timing.rounds if rounds is None else rounds
    slice_s = timing.slice_s if slice_s is None else slice_s
    timing = b.Timing(rounds=rounds, slice_s=slice_s, warmup_s=min(timing.warmup_s, slice_s), min_calls=2 if slice_s else 1)
    try:
        report = b.run_bench(model, sizes, device=device, timing=timing, cold_start_runs=cold_start_runs,
                             folder_images=folder_images, sweep=sweep, progress=lambda s: err.print(s, highlight=False))
    except AAEError as exc:
        raise _fail(exc)
    out.print(b.markdown(report), highlight=False, markup=False)  # first: a report that cannot be saved is still shown
    try:
        paths = b.write_report(report, out_dir)
    except OSError as exc:
        raise _fail(AAEError(f"--out-dir {out_dir}: cannot write the report ({exc.strerror or exc})"))
    err.print(f"wrote {', '.join(literal(str(p)) for p in paths.values())}", highlight=False)


@app.callback(invoke_without_command=True)
def _main(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    # Pillow warns (two stderr lines each) about damaged tags it skips; each file's row already
    # says whether it was scored, so the command's output stays rows and one-line errors. Set
    # here, for the command's process, not when the module is imported.
    warnings.filterwarnings("ignore", module=r"PIL\.")  # UserWarning on tags, DecompressionBombWarning (refused anyway)
    if version:
        out.print(f"aae-run {__version__}")
        raise typer.Exit()
    from aae_runtime.install import check_onnxruntime

    try:
        check_onnxruntime()  # a missing or doubled ONNX Runtime: one line now, not a traceback later
    except AAEError as exc:
        raise _fail(exc)
