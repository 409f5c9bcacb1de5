"""Results stream as they come: an interrupted run keeps its rows, an unwritable results file
keeps the table, and one image's map that cannot be written is that image's error only."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_png

N_LINKS = 1500


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory) -> Path:
    """Many paths to one large noise photo: each decodes and resizes for milliseconds, so a run
    lasts seconds and can be stopped in the middle."""
    root = tmp_path_factory.mktemp("slow")
    photo = root / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (900, 900), dtype=np.uint8)).save(photo)
    folder = root / "inbox"
    folder.mkdir()
    for i in range(N_LINKS):
        (folder / f"{i:05d}.png").symlink_to(photo)
    return folder


def start_score(folder: Path, model: Path, output: Path) -> subprocess.Popen:
    return subprocess.Popen(["aae-run", "score", str(folder), "--model", str(model), "--device", "cpu",
                             "--batch-size", "8", "--output", str(output), "--show", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_run_keeps_the_rows_it_scored_in_the_csv(slow_folder, tiny_model_dir, tmp_path, sig, code):
    out = tmp_path / "rows.csv"
    run = start_score(slow_folder, tiny_model_dir, out)
    wait_until(lambda: out.exists() and out.read_text().count("\n") > 16)  # a couple of batches flushed
    run.send_signal(sig)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == code, stderr
    rows = list(csv.DictReader(out.open()))
    assert 16 <= len(rows) < N_LINKS and all(r["score"] for r in rows)
    assert f"after {len(rows)} images" in stderr and "Traceback" not in stderr
    assert stdout.count("inbox") >= 3  # the table of what was scored is shown too


def test_a_stopped_json_run_leaves_a_valid_partial_array_and_no_json(slow_folder, tiny_model_dir, tmp_path):
    out = tmp_path / "rows.json"
    partial = tmp_path / "rows.json.partial"
    run = start_score(slow_folder, tiny_model_dir, out)
    wait_until(lambda: partial.exists() and partial.stat().st_size > 2000)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 143, stderr
    rows = json.loads(partial.read_text())
    assert 0 < len(rows) < N_LINKS and not out.exists() and "rows.json.partial" in stderr


def test_a_complete_json_run_replaces_the_file_and_jsonl_has_a_row_per_line(tiny_model_dir, tmp_path, mnist_test):
    folder = tmp_path / "imgs"
    for i in range(20):
        write_png(folder / f"{i}.png", mnist_test[0][i])
    for name in ("rows.json", "rows.jsonl"):
        r = subprocess.run(["aae-run", "score", str(folder), "--model", str(tiny_model_dir), "--device", "cpu",
                            "--output", str(tmp_path / name)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 20 and not (tmp_path / "rows.json.partial").exists()
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert len(lines) == 20 and all(json.loads(line)["score"] is not None for line in lines)


def test_a_results_file_that_cannot_be_written_still_shows_the_table_and_exits_2(tiny_model_dir, tmp_path, mnist_test):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (a device whose writes fail: disk full)")
    folder = tmp_path / "imgs"
    for i in range(100):
        write_png(folder / f"{i:03d}.png", mnist_test[0][i])
    full = tmp_path / "full.csv"
    full.symlink_to("/dev/full")
    r = subprocess.run(["aae-run", "score", str(folder), "--model", str(tiny_model_dir), "--device", "cpu",
                        "--output", str(full), "--show", "0"], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stdout.count(".png") == 100 and "scored 100 images" in r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left" in errors[0], r.stderr


def test_a_long_nested_name_gets_a_short_stable_map_name_and_an_unwritable_map_fails_only_its_image(
        tiny_model_dir, tmp_path, mnist_test):
    folder = tmp_path / "imgs"
    deep = folder / ("d" * 120) / ("e" * 120)
    write_png(deep / ("f" * 100 + ".png"), mnist_test[0][0])
    write_png(folder / "blocked.png", mnist_test[0][1])
    write_png(folder / "fine.png", mnist_test[0][2])
    maps = tmp_path / "maps"
    (maps / "blocked.png.map.png").mkdir(parents=True)  # a folder where the map file should go
    args = ["aae-run", "score", str(folder), "--model", str(tiny_model_dir), "--device", "cpu", "--maps", str(maps),
            "--output", str(tmp_path / "rows.csv")]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    rows = {Path(row["path"]).name: row for row in csv.DictReader((tmp_path / "rows.csv").open())}
    assert rows["blocked.png"]["score"] and "map could not be written" in rows["blocked.png"]["error"]
    assert not rows["fine.png"]["error"] and not rows["f" * 100 + ".png"]["error"]
    index = {Path(row["image"]).name: row["map"] for row in csv.DictReader((maps / "maps.csv").open())}
    long_map = index["f" * 100 + ".png"]
    assert len(long_map.encode()) <= 255 and (maps / long_map).is_file() and "blocked.png" not in index
    again = subprocess.run(args[:-2] + ["--maps", str(tmp_path / "maps2")], capture_output=True, text=True)
    index2 = {Path(row["image"]).name: row["map"] for row in csv.DictReader((tmp_path / "maps2" / "maps.csv").open())}
    assert index2["f" * 100 + ".png"] == long_map  # deterministic
