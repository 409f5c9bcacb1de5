"""The whole pipeline through the real console scripts on real MNIST: train, export, score, sample."""

from __future__ import annotations

import csv
import os
import subprocess

import pytest
from PIL import Image

pytestmark = pytest.mark.e2e


def sh(*args, expect=0):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == expect, f"{args[0]} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return r


def test_train_export_score_sample(tmp_path, mnist_dir):
    run = tmp_path / "run"
    train = sh("aae-train", "mnist", "--data-dir", mnist_dir, "--limit", "3000", "--epochs", "3",
               "--hidden", "256", "--out", run, "--device", "cpu")
    assert "epoch   3" in train.stderr
    assert (run / "checkpoint.pt").is_file() and (run / "samples.png").is_file()

    export = sh("aae-export", "--checkpoint", run / "checkpoint.pt", "--out", tmp_path / "model")
    assert "largest |difference|" in export.stderr

    sh("aae-train", "demo-images", "--out", tmp_path / "imgs", "--data-dir", mnist_dir, "--digits", "20", "--noise", "5")
    score = sh("aae-run", "score", tmp_path / "imgs", "--model", tmp_path / "model", "-o", tmp_path / "scores.csv")
    assert "scored 25 images" in score.stdout
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    digits = [float(r["score"]) for r in rows if "/digits/" in r["path"]]
    noise = [float(r["score"]) for r in rows if "/noise/" in r["path"]]
    assert len(digits) == 20 and len(noise) == 5
    assert max(digits) < min(noise), (digits, noise)  # every digit below every noise image
    assert sorted(digits)[10] < min(noise) / 2, (digits, noise)  # and the median well below
    assert all(r["anomaly"] == "True" for r in rows if "/noise/" in r["path"])

    sh("aae-run", "sample", "--model", tmp_path / "model", "-n", "64", "--out", tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (8 * 30 + 2, 8 * 30 + 2)
