"""`aae-run watch` on a real temporary folder with real file events (and the polling fallback):
every image scored once, slow writers not read early, SIGKILL at any moment loses nothing and
scores nothing twice, a full disk stops it without losing an image."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_png


def start(inbox: Path, model: Path, output: Path, *extra: str, ready: bool = False, cwd: Path | None = None) -> subprocess.Popen:
    """The watcher as a process (run in ``cwd``); with ``ready``, once it says it is watching
    (its signal handlers are in place)."""
    run = subprocess.Popen(["aae-run", "watch", str(inbox), "--model", str(model), "--output", str(output),
                            "--device", "cpu", "--settle", "0.2", *extra],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    if ready:
        for line in run.stderr:
            if line.startswith("watching"):
                break
    return run


def rows_of(output: Path) -> list[dict]:
    if not output.exists():
        return []
    if output.suffix == ".csv":
        return list(csv.DictReader(output.open()))
    return [json.loads(line) for line in output.read_text().splitlines()]


def wait_until(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def stop(run: subprocess.Popen) -> str:
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    return err


@pytest.fixture()
def digits(mnist_test):
    return mnist_test[0]


@pytest.mark.parametrize("mode", ["events", "poll"])
def test_files_there_at_start_and_arriving_later_are_scored_once_and_moved(tiny_model_dir, tmp_path, digits, mode):
    inbox, done, failed, out = tmp_path / "inbox", tmp_path / "done", tmp_path / "failed", tmp_path / "rows.csv"
    for i in range(5):
        write_png(inbox / f"early{i}.png", digits[i])
    run = start(inbox, tiny_model_dir, out, "--done", str(done), "--failed", str(failed), *(["--poll"] if mode == "poll" else []))
    wait_until(lambda: len(rows_of(out)) == 5)
    write_png(inbox / "sub" / "late.png", digits[7])
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    wait_until(lambda: len(rows_of(out)) == 7)
    stop(run)
    rows = {Path(r["path"]).name: r for r in rows_of(out)}
    assert set(rows) == {*(f"early{i}.png" for i in range(5)), "late.png", "broken.png"}
    assert all(set(r) == {"path", "score", "normalized_score", "threshold", "anomaly", "error"} for r in rows.values())
    assert rows["broken.png"]["error"] and not rows["late.png"]["error"] and float(rows["late.png"]["score"]) == float(rows["late.png"]["score"])
    assert (done / "sub" / "late.png").is_file() and (failed / "broken.png").is_file()
    assert not [p for p in inbox.rglob("*.png")]


def test_a_file_written_slowly_is_read_only_when_complete(tiny_model_dir, tmp_path, digits):
    inbox, out = tmp_path / "inbox", tmp_path / "rows.jsonl"
    inbox.mkdir()
    whole = write_png(tmp_path / "whole.png", digits[3]).read_bytes()
    run = start(inbox, tiny_model_dir, out, "--done", str(tmp_path / "done"))
    with open(inbox / "slow.png", "wb") as f:  # a camera writing a byte run every 0.15 s
        for i in range(0, len(whole), max(1, len(whole) // 8)):
            f.write(whole[i : i + max(1, len(whole) // 8)])
            f.flush()
            time.sleep(0.15)
    wait_until(lambda: len(rows_of(out)) == 1)
    stop(run)
    row = rows_of(out)[0]
    assert row["error"] is None and row["score"] is not None


def test_a_file_whose_writer_paused_longer_than_settle_gets_a_second_look(tiny_model_dir, tmp_path, digits):
    inbox, out = tmp_path / "inbox", tmp_path / "rows.jsonl"
    inbox.mkdir()
    whole = write_png(tmp_path / "whole.png", digits[3]).read_bytes()
    run = start(inbox, tiny_model_dir, out, "--failed", str(tmp_path / "failed"), ready=True)  # --settle 0.2: recheck 2 s
    with open(inbox / "paused.png", "wb") as f:
        f.write(whole[: len(whole) // 2])
        f.flush()
        time.sleep(1.0)  # read meanwhile, truncated: no row yet
        f.write(whole[len(whole) // 2 :])
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # stays broken: its row after the second look
    wait_until(lambda: len(rows_of(out)) == 2)
    time.sleep(1.0)
    stop(run)
    rows = {Path(r["path"]).name: r for r in rows_of(out)}
    assert len(rows_of(out)) == 2 and rows["paused.png"]["error"] is None and rows["paused.png"]["score"] is not None
    assert rows["broken.png"]["error"] and (tmp_path / "failed" / "broken.png").is_file()


def test_sigkill_at_any_moment_loses_no_image_and_scores_none_twice(tiny_model_dir, tmp_path, digits):
    inbox, done, out = tmp_path / "inbox", tmp_path / "done", tmp_path / "rows.jsonl"
    names = [f"img{i:03d}.png" for i in range(120)]
    for i, name in enumerate(names[:60]):
        write_png(inbox / name, digits[i])
    rng = np.random.default_rng(0)
    for round_ in range(6):
        run = start(inbox, tiny_model_dir, out, "--done", str(done), "--batch-size", "8")
        if round_ < 3:  # more arrive while it runs
            for i in range(60 + 20 * round_, 80 + 20 * round_):
                write_png(inbox / names[i], digits[i])
        time.sleep(float(rng.uniform(0.3, 2.0)))
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
    run = start(inbox, tiny_model_dir, out, "--done", str(done), "--batch-size", "8", ready=True)
    wait_until(lambda: len({r["path"] for r in rows_of(out)}) == 120 and not list(inbox.rglob("*.png")))
    stop(run)
    paths = [Path(r["path"]).name for r in rows_of(out)]
    assert sorted(paths) == sorted(names)  # each once: none lost, none twice
    assert sorted(p.name for p in done.rglob("*.png")) == sorted(names)


def test_left_in_place_files_are_scored_once_across_restarts_and_a_reused_name_again(tiny_model_dir, tmp_path, digits):
    inbox, out = tmp_path / "inbox", tmp_path / "rows.csv"
    write_png(inbox / "a.png", digits[0])
    write_png(inbox / "b.png", digits[1])
    run = start(inbox, tiny_model_dir, out)
    wait_until(lambda: len(rows_of(out)) == 2)
    stop(run)
    run = start(inbox, tiny_model_dir, out, ready=True)
    time.sleep(1.5)
    assert len(rows_of(out)) == 2  # nothing scored again
    os.unlink(inbox / "a.png")
    write_png(inbox / "a.png", digits[5])  # the camera reuses the name: a new image
    wait_until(lambda: len(rows_of(out)) == 3)
    stop(run)
    assert [Path(r["path"]).name for r in rows_of(out)] == ["a.png", "b.png", "a.png"]


def test_a_full_disk_for_the_results_stops_the_watcher_in_one_line_and_keeps_the_images(tiny_model_dir, tmp_path, digits):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    inbox, done = tmp_path / "inbox", tmp_path / "done"
    for i in range(3):
        write_png(inbox / f"{i}.png", digits[i])
    out = tmp_path / "rows.jsonl"
    out.symlink_to("/dev/full")
    (tmp_path / "rows.jsonl.state.json").write_text('{"results_bytes": 0, "seen_bytes": 0}\n')
    run = start(inbox, tiny_model_dir, out, "--done", str(done))
    _, err = run.communicate(timeout=60)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(errors) == 1 and "stay in the inbox" in errors[0], err
    assert len(list(inbox.glob("*.png"))) == 3 and not done.exists()


def test_a_results_file_of_another_program_is_not_appended_to(tiny_model_dir, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    out = tmp_path / "rows.csv"
    out.write_text("somebody's data\n")
    r = subprocess.run(["aae-run", "watch", str(inbox), "--model", str(tiny_model_dir), "--output", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not written by aae-run watch" in r.stderr
    assert out.read_text() == "somebody's data\n"


def test_files_deleted_or_replaced_while_waiting_are_handled_by_what_is_there_at_the_end(tiny_model_dir, tmp_path, digits):
    inbox, out = tmp_path / "inbox", tmp_path / "rows.jsonl"
    inbox.mkdir()
    run = start(inbox, tiny_model_dir, out, "--done", str(tmp_path / "done"), "--settle", "1.0", ready=True)
    write_png(inbox / "gone.png", digits[0])
    write_png(inbox / "swapped.png", digits[1])
    time.sleep(0.3)
    os.unlink(inbox / "gone.png")  # deleted while it waited to settle: never read
    noise = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    write_png(tmp_path / "new.png", noise)
    os.replace(tmp_path / "new.png", inbox / "swapped.png")  # replaced: the new image is the one scored
    wait_until(lambda: len(rows_of(out)) == 1)
    time.sleep(1.5)
    stop(run)
    rows = rows_of(out)
    from aae_runtime import AAEModel

    expected = AAEModel.load(tiny_model_dir, device="cpu").score_paths([tmp_path / "done" / "swapped.png"])[0]
    assert [Path(r["path"]).name for r in rows] == ["swapped.png"] and rows[0]["score"] == pytest.approx(expected.score, abs=1e-6)


def test_files_that_stay_are_scored_once_with_failed_only_and_with_the_inbox_named_another_way(tiny_model_dir, tmp_path, digits):
    inbox, out = tmp_path / "inbox", tmp_path / "rows.jsonl"
    write_png(inbox / "good.png", digits[0])
    (inbox / "broken.png").write_bytes(b"not an image")
    run = start(inbox, tiny_model_dir, out, "--failed", str(tmp_path / "failed"))
    wait_until(lambda: len(rows_of(out)) == 2)
    time.sleep(1.5)  # a good image without --done stays in the inbox, and in the ledger: not scored again
    stop(run)
    assert sorted(Path(r["path"]).name for r in rows_of(out)) == ["broken.png", "good.png"]
    assert (inbox / "good.png").is_file() and (tmp_path / "failed" / "broken.png").is_file()
    # the same inbox by a relative name from another folder: the ledger knows it by its resolved path
    run = start(Path("inbox"), tiny_model_dir, Path("rows.jsonl"), ready=True, cwd=tmp_path)
    time.sleep(1.5)
    stop(run)
    assert len(rows_of(out)) == 2


def test_a_damaged_ledger_and_a_destination_that_cannot_be_one_are_refused_in_one_line(tiny_model_dir, tmp_path, digits):
    inbox, out = tmp_path / "inbox", tmp_path / "rows.jsonl"
    write_png(inbox / "a.png", digits[0])
    (tmp_path / "file").write_text("x")

    def watch(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["aae-run", "watch", str(inbox), "--model", str(tiny_model_dir), "--output", str(out), *extra],
                              capture_output=True, text=True, timeout=60)

    for extra, words in ((("--done", str(inbox)), "is the inbox itself"), (("--done", str(tmp_path / "file")), "is a file"),
                         (("--failed", str(tmp_path / "file")), "is a file")):
        r = watch(*extra)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    out.write_text("")
    for state, seen in (('{"results_bytes": 1e999, "seen_bytes": 0}', ""), ('{"results_bytes": "10", "seen_bytes": 0}', ""),
                        ('{"results_bytes": 0, "seen_bytes": 8}', "garbage\n")):  # a committed ledger line that is not one
        (tmp_path / "rows.jsonl.state.json").write_text(state)
        (tmp_path / "rows.jsonl.seen").write_text(seen)
        r = watch()
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and "is damaged" in errors[0] and "internal" not in r.stderr, r.stderr


def test_a_ledger_of_version_0_2_0_is_honoured_after_the_upgrade(tiny_model_dir, tmp_path, digits):
    """Lines written before the ledger resolved paths name files as INBOX was spelled (here
    relative to the service's folder): a restart must not score them again."""
    inbox, out = tmp_path / "inbox", tmp_path / "rows.jsonl"
    write_png(inbox / "a.png", digits[0])
    run = start(inbox, tiny_model_dir, out)
    wait_until(lambda: len(rows_of(out)) == 1)
    stop(run)
    seen = tmp_path / "rows.jsonl.seen"
    old = [dict(json.loads(line), path="inbox/a.png") for line in seen.read_text().splitlines()]
    text = "".join(json.dumps({k: v for k, v in d.items() if k != "failed"}) + "\n" for d in old)
    seen.write_text(text)
    state = json.loads((tmp_path / "rows.jsonl.state.json").read_text())
    (tmp_path / "rows.jsonl.state.json").write_text(json.dumps(dict(state, seen_bytes=len(text.encode()))))
    run = start(Path("inbox"), tiny_model_dir, Path("rows.jsonl"), ready=True, cwd=tmp_path)
    time.sleep(1.5)
    stop(run)
    assert len(rows_of(out)) == 1


def test_a_second_watcher_of_the_same_inbox_is_refused_in_one_line(tiny_model_dir, tmp_path, digits):
    inbox, out = tmp_path / "inbox", tmp_path / "rows.jsonl"
    write_png(inbox / "a.png", digits[0])
    first = start(inbox, tiny_model_dir, out, ready=True)
    try:
        wait_until(lambda: len(rows_of(out)) == 1)
        second = subprocess.run(["aae-run", "watch", str(inbox), "--model", str(tiny_model_dir), "--output",
                                 str(tmp_path / "other.jsonl"), "--device", "cpu"], capture_output=True, text=True, timeout=60)
        lines = [line for line in second.stderr.splitlines() if not line.startswith("execution provider")]
        assert second.returncode == 2 and len(lines) == 1 and "another aae-run watch is watching" in lines[0], second.stderr
        assert not (tmp_path / "other.jsonl").exists()
    finally:
        stop(first)
    later = start(inbox, tiny_model_dir, out, ready=True)  # the first one's end let the folder go
    stop(later)
    assert [Path(r["path"]).name for r in rows_of(out)] == ["a.png"]  # scored once, by the first


def test_links_the_watcher_does_not_follow_are_named_once(tiny_model_dir, tmp_path, digits):
    inbox, out = tmp_path / "inbox", tmp_path / "rows.jsonl"
    write_png(inbox / "a.png", digits[0])
    write_png(tmp_path / "elsewhere" / "b.png", digits[1])
    (inbox / "gone.png").symlink_to(tmp_path / "nothing.png")
    (inbox / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    run = start(inbox, tiny_model_dir, out, ready=True)
    wait_until(lambda: len(rows_of(out)) == 1)
    time.sleep(1.5)  # a few more scans of the folder
    err = stop(run)
    assert err.count("gone.png is a dangling link: not scored") == 1, err
    assert err.count("linked is a link to a folder: not watched") == 1, err
    assert [Path(r["path"]).name for r in rows_of(out)] == ["a.png"]
