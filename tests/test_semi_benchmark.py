"""benchmarks/semi_supervised.py end to end on a tiny recipe: trains through the real aae-train,
skips finished runs, reads the test error of best.pt only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import semi_supervised  # noqa: E402


def test_tiny_recipe_trains_reports_and_skips_finished_runs(tmp_path, mnist_dir):
    argv = ["--data-dir", str(mnist_dir), "--labels", "20", "--draws", "2", "--epochs", "2", "--work-dir", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results"), "--recipe", "--hidden 16 --latent-dim 2 --limit 600 --batch-size 20 --lr-class 3e-3"]
    assert semi_supervised.main(argv) == 0
    out = json.loads((tmp_path / "results" / "semi_supervised.json").read_text())["results"]
    runs = out["20"]["runs"]
    assert set(runs) == {"0", "1"} and all(0 <= r["test_error"] <= 100 for r in runs.values())
    assert all(r["best_epoch"] in (1, 2) and r["val_labelled"] == 20 for r in runs.values())
    assert runs["0"]["command"] != runs["1"]["command"]  # another label draw
    assert "| 20 |" in (tmp_path / "results" / "semi_supervised.md").read_text()
    stamp = (tmp_path / "runs" / "recipe-20-0" / "checkpoint.pt").stat().st_mtime
    assert semi_supervised.main(argv) == 0
    assert (tmp_path / "runs" / "recipe-20-0" / "checkpoint.pt").stat().st_mtime == stamp  # finished: not trained again


def test_sizes_without_runs_here_keep_their_rows_from_the_results_file(tmp_path, mnist_dir):
    common = ["--data-dir", str(mnist_dir), "--draws", "1", "--epochs", "1", "--results", str(tmp_path / "results"),
              "--recipe", "--hidden 16 --latent-dim 2 --limit 600 --batch-size 20 --lr-class 3e-3"]
    assert semi_supervised.main([*common, "--labels", "20", "--work-dir", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "results" / "semi_supervised.json").read_text())["results"]["20"]
    assert semi_supervised.main([*common, "--labels", "30", "--work-dir", str(tmp_path / "b")]) == 0  # another machine's folder
    out = json.loads((tmp_path / "results" / "semi_supervised.json").read_text())["results"]
    assert list(out) == ["20", "30"] and out["20"] == first and set(out["30"]["runs"]) == {"0"}
    assert "| 20 |" in (tmp_path / "results" / "semi_supervised.md").read_text()
