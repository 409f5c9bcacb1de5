"""`aae-run` through the real console script: tables, CSV/JSON, sampling, info, errors, exit codes."""

from __future__ import annotations

import csv
import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_png


def run(*args):
    env = {**os.environ, "COLUMNS": "250"}  # (not a terminal: tables are never folded to a width)
    return subprocess.run(["aae-run", *map(str, args)], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, mnist_test):
    images, _ = mnist_test
    root = tmp_path_factory.mktemp("imgs")
    for i in range(4):
        write_png(root / "digits" / f"d{i}.png", images[i])
    rng = np.random.default_rng(0)
    for i in range(2):
        write_png(root / "noise" / "deeper" / f"n{i}.png", rng.integers(0, 256, (28, 28), dtype=np.uint8))
    (root / "notes.txt").write_text("ignored: not an image suffix")
    return root


def test_score_prints_a_table_and_writes_csv(folder, tiny_model_dir, tmp_path):
    r = run("score", folder, "--model", tiny_model_dir, "--device", "cpu", "--output", tmp_path / "s.csv")
    assert r.returncode == 0, r.stderr
    assert "d0.png" in r.stdout and "n1.png" in r.stdout and "scored 6 images" in r.stdout
    assert "execution provider: CPUExecutionProvider" in r.stderr
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [row["path"].rsplit("/", 1)[-1] for row in rows] == ["d0.png", "d1.png", "d2.png", "d3.png", "n0.png", "n1.png"]
    assert all(row["error"] == "" and float(row["score"]) >= 0 for row in rows)
    assert [row["anomaly"] for row in rows[4:]] == ["True", "True"]


def test_json_output_and_threshold_override(folder, tiny_model_dir, tmp_path):
    r = run("score", folder, "--model", tiny_model_dir, "--device", "cpu", "--threshold", "1e9", "-o", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "s.json").read_text())
    assert len(rows) == 6 and all(row["anomaly"] is False and row["threshold"] == 1e9 for row in rows)


def test_a_bad_file_gives_an_error_row_and_exit_code_1(folder, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    write_png(bad / "ok.png", np.zeros((28, 28), np.uint8))
    r = run("score", bad, "--model", tiny_model_dir, "--device", "cpu", "-o", tmp_path / "s.csv")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    rows = {row["path"].rsplit("/", 1)[-1]: row for row in csv.DictReader(open(tmp_path / "s.csv"))}
    assert rows["broken.png"]["error"] and rows["broken.png"]["score"] == ""
    assert rows["ok.png"]["score"] != ""


@pytest.mark.parametrize("setup, expected", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "has no encoder.onnx"),
    (lambda d: (d.mkdir(), (d / "encoder.onnx").write_text("x"), (d / "decoder.onnx").write_text("x")), "cannot load"),
])
def test_a_bad_model_dir_is_one_line_and_exit_code_2(tmp_path, folder, setup, expected):
    model = tmp_path / "model"
    setup(model)
    r = run("score", folder, "--model", model, "--device", "cpu")
    assert r.returncode == 2 and expected in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sample_writes_a_png_grid_and_a_raw_array(tiny_model_dir, tmp_path):
    assert run("sample", "--model", tiny_model_dir, "-n", "16", "--out", tmp_path / "g.png", "--device", "cpu").returncode == 0
    with Image.open(tmp_path / "g.png") as img:
        assert img.size == (4 * 30 + 2, 4 * 30 + 2)
    assert run("sample", "--model", tiny_model_dir, "-n", "5", "--out", tmp_path / "s.npy", "--seed", "3").returncode == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float32


def test_info_prints_a_short_description_and_providers_and_json_on_request(tiny_model_dir):
    r = run("info", "--model", tiny_model_dir, "--device", "cpu")
    assert r.returncode == 0 and "providers running:   CPUExecutionProvider" in r.stdout
    assert len(r.stdout.splitlines()) <= 15 and "threshold" in r.stdout and "prior gaussian" in r.stdout
    usable = r.stdout.split("providers usable here:")[1].splitlines()[0]
    assert "Tensorrt" not in usable  # a provider the build lists is not one that runs here
    full = run("info", "--model", tiny_model_dir, "--device", "cpu", "--json")
    assert full.returncode == 0 and json.loads(full.stdout)["schema_version"] >= 2  # stdout is the JSON alone
    assert "providers running:   CPUExecutionProvider" in full.stderr


def test_device_cuda_where_it_cannot_run_is_an_error_and_auto_falls_back(tiny_model_dir, folder):
    import onnxruntime as ort

    r = run("info", "--model", tiny_model_dir, "--device", "auto")
    assert r.returncode == 0 and "providers running:" in r.stdout
    if "CUDAExecutionProvider" in ort.get_available_providers() and "CUDAExecutionProvider" not in r.stdout.split("running:")[1]:
        cuda = run("info", "--model", tiny_model_dir, "--device", "cuda")
        assert cuda.returncode == 2 and "--device cuda" in cuda.stderr and "Traceback" not in cuda.stderr


def test_no_images_found_is_exit_code_2(tmp_path, tiny_model_dir):
    r = run("score", tmp_path, "--model", tiny_model_dir, "--device", "cpu")
    assert r.returncode == 2 and "no image file among the given paths (their folders hold no file ending in .bmp" in r.stderr and r.stderr.count("error:") == 1
    assert "scored 0" not in r.stdout and "┏" not in r.stdout  # the error alone, not an empty table before it


def test_low_latency_and_threads_change_speed_settings_not_scores(folder, tiny_model_dir, tmp_path):
    base = run("score", folder, "--model", tiny_model_dir, "--device", "cpu", "-o", tmp_path / "a.csv")
    fast = run("score", folder, "--model", tiny_model_dir, "--device", "cpu", "--low-latency", "--threads", "2",
               "-o", tmp_path / "b.csv")
    assert base.returncode == 0 and fast.returncode == 0, fast.stderr
    a = [float(row["score"]) for row in csv.DictReader(open(tmp_path / "a.csv"))]
    b = [float(row["score"]) for row in csv.DictReader(open(tmp_path / "b.csv"))]
    assert len(a) == 6 and np.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_negative_threads_are_refused_in_one_line(folder, tiny_model_dir):
    r = run("score", folder, "--model", tiny_model_dir, "--device", "cpu", "--threads", "-1")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--threads" in r.stderr


def test_classify_prints_class_names_as_they_are(capsys):
    """Class values are folder names: markup, escape sequences and bidi overrides print literally."""
    from types import SimpleNamespace

    from aae_runtime.cli import _print_classes
    from aae_runtime.model import ImageScore

    m = SimpleNamespace(classes=("[red]cat", "esc\x1b[31mX", "rtl\u202edog"), score_name="mse", threshold=1.0)
    rows = [ImageScore("a.png", score=0.5, anomaly=False, probabilities=np.array([0.9, 0.05, 0.05], np.float32)),
            ImageScore("b.png", score=0.7, anomaly=False, probabilities=np.array([0.1, 0.1, 0.8], np.float32))]
    _print_classes(rows, m, 0)
    out = capsys.readouterr().out
    assert "classes [red]cat, esc\\x1b[31mX, rtl\\u202edog;" in out
    lines = out.splitlines()
    assert lines[4].startswith("│ a.png │   [red]cat   │") and lines[5].startswith("│ b.png │ rtl\\u202edog │")
    assert "\x1b" not in out and "\u202e" not in out


def test_a_command_alone_prints_its_help_as_it_is():
    for argv in (["aae-run"], ["aae-train"]):
        r = subprocess.run(argv, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith(f"Usage: {argv[0]} [OPTIONS] COMMAND"), r.stderr
        assert "\nCommands:\n" in r.stderr and "error:" not in r.stderr  # the help's own lines, not one error line


def test_a_signal_during_an_import_is_an_interrupt_not_an_internal_error():
    """Ctrl-C or SIGTERM while a C extension initialises (numpy, ONNX Runtime) surfaces as
    'ImportError: initialization failed', caused by the interrupt: it ends as an interrupt."""
    from aae_runtime.clierrors import Terminated, _interrupt_behind

    try:
        try:
            raise Terminated()
        except Terminated as stop:
            raise ImportError("initialization failed") from stop
    except ImportError as exc:
        assert isinstance(_interrupt_behind(exc), Terminated)
    assert _interrupt_behind(ImportError("No module named 'x'")) is None


def test_the_summary_counts_a_scored_image_whose_map_failed_as_scored(tiny_model_dir, capsys):
    from aae_runtime import AAEModel
    from aae_runtime.cli import _print_scores
    from aae_runtime.model import ImageScore

    m = AAEModel.load(tiny_model_dir, device="cpu")
    rows = [ImageScore("a.png", score=9.0, anomaly=True, normalized_score=1.0, error="scored, but its map could not be written"),
            ImageScore("b.png", score=0.0, anomaly=False, normalized_score=0.0),
            ImageScore("c.png", error="file not found")]
    _print_scores(rows, m, show=50)
    assert capsys.readouterr().out.splitlines()[-1] == "scored 2 images: 1 anomalous, 1 failed; 1 scored image without its map"


@pytest.mark.parametrize("args", [["aae-run", "score", ""], ["aae-run", "calibrate", "", "--model", "m"],
                                  ["aae-run", "watch", "", "--model", "m"], ["aae-run", "info", "--model", ""],
                                  ["aae-export", "--checkpoint", "c.pt", "--out", ""], ["aae-train", "folder", ""]])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(args, tmp_path):
    """pathlib reads "" as ".": `watch ""` moved every image under the current folder, `calibrate ""`
    calibrated on all of them, `aae-export --out ""` wrote a model into it."""
    write_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    r = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "an empty path: give a file or folder name" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


@pytest.mark.parametrize("args", [["serve", "--max-body-mb", "nan"], ["serve", "--max-wait-ms", "nan"],
                                  ["serve", "--max-megapixels", "nan"], ["bench", "--slice", "nan"]])
def test_every_float_option_refuses_nan_and_inf(args, tiny_model_dir):
    r = subprocess.run(["aae-run", *args, "--model", str(tiny_model_dir)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is not a finite number" in r.stderr and r.stderr.count("\n") == 1, r.stderr
