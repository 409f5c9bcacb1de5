"""`aae-run bench` and aae_runtime.bench on the tiny real model: report shape, files, CLI exit codes.

Timings are never asserted (speed targets live in benchmarks/); only that every figure exists,
is positive and ordered (median <= p90 <= p99).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from aae_runtime import bench
from aae_runtime.model import AAEModel
from aae_runtime.session import LOW_LATENCY_SPIN_US, SessionConfig


@pytest.fixture(scope="module")
def report(tiny_model_dir):
    return bench.run_bench(tiny_model_dir, batch_sizes=(1, 8), device="cpu", timing=bench.Timing.quick(),
                           cold_start_runs=1, folder_images=16, sweep=True)


def test_report_has_a_row_per_setup_op_and_batch(report):
    assert report["schema"] == bench.SCHEMA
    names = [s["name"] for s in report["setups"]]
    assert names[0] == "ort-cpu-1t" and len(names) == len(set(names)) >= 1
    keys = {(r["setup"], r["op"], r["batch"]) for r in report["results"]}
    assert keys == {(s, op, b) for s in names for op in bench.OPS for b in (1, 8)}
    for r in report["results"]:
        assert 0 < r["median_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["calls"] >= 1 and r["items_per_s"] == pytest.approx(r["batch"] / (r["median_ms"] / 1e3))
    assert report["machine"]["logical_cores"] >= 1 and report["model"]["precision"] == "fp32"


def test_sweep_folder_and_cold_start_are_measured(report):
    assert {(r["threads"], r["optimization"]) for r in report["sweep"]} >= {(1, "disable"), (1, "all")}
    cores = os.cpu_count() or 1
    if cores > 1:  # every core, with and without the low-latency spin
        assert {(r["threads"], r["spin_us"]) for r in report["sweep"]} == {(1, 0), (cores, 0), (cores, LOW_LATENCY_SPIN_US)}
    f = report["folder"]
    assert f["images"] == 16 and f["score_paths_images_per_s"] > 0 and f["overlap_speedup"] > 0
    c = report["cold_start"]
    assert 0 < c["python_startup_s"] < c["floor_s"] < c["score_one_image_s"] + 0.5 and isinstance(c["met"], bool)
    assert len(c["floor_all_s"]) == len(c["score_one_image_all_s"]) == c["runs"] and "above_floor_s" in c
    assert c["score_one_image_cpu_s"] > 0 and c["import_cpu_s"]["numpy"] > 0 and "aae_runtime.cli" in c["import_cpu_s"]


def test_paced_single_images_report_latency_and_busy_cores_per_setting(report):
    rows = {r["setting"]: r for r in report["paced"]}
    assert "1 thread" in rows and len(rows) == (3 if (os.cpu_count() or 1) > 1 else 2)
    for r in rows.values():
        assert r["calls"] >= 2 and 0 < r["median_ms"] <= r["p90_ms"] and r["cores_busy"] > 0
    assert "One image every 10 ms" in bench.markdown(report)


def test_low_latency_setup_is_timed_beside_the_default_ones(report):
    setups = {s["name"]: s for s in report["setups"]}
    cores = os.cpu_count() or 1
    if cores > 1:
        assert setups[f"ort-cpu-{cores}t-spin"]["spin_us"] == LOW_LATENCY_SPIN_US
        assert setups[f"ort-cpu-{cores}t"]["spin_us"] == 0


def test_low_latency_sessions_carry_the_spin_settings_and_give_the_same_scores(tiny_model_dir, mnist_test):
    images = mnist_test[0][:16, None].astype(np.float32) / 255
    default = AAEModel.load(tiny_model_dir, session_config=SessionConfig(device="cpu"))
    fast = AAEModel.load(tiny_model_dir, session_config=SessionConfig.low_latency("cpu", threads=2))
    opts = fast.scorer.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert opts.get_session_config_entry("session.intra_op.spin_duration_us") == str(LOW_LATENCY_SPIN_US)
    assert default.scorer.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    np.testing.assert_allclose(fast.score(images), default.score(images), rtol=1e-5, atol=1e-7)


def test_report_files_are_json_markdown_and_png(report, tmp_path):
    paths = bench.write_report(report, tmp_path, name="t")
    assert json.loads(paths["json"].read_text())["results"] == report["results"]
    md = paths["md"].read_text()
    assert "| setup | op | batch | median ms |" in md and "ort-cpu-1t" in md and "Cold start" in md
    with Image.open(paths["png"]) as img:
        assert img.format == "PNG" and img.width > 100
        assert len(np.unique(np.asarray(img.convert("L")))) > 2  # something was drawn


def test_cli_bench_exits_0_and_writes_the_three_files(tiny_model_dir, tmp_path):
    r = subprocess.run(["aae-run", "bench", "--model", str(tiny_model_dir), "--device", "cpu", "-o", str(tmp_path),
                        "--batch-sizes", "1,4", "--rounds", "1", "--slice", "0", "--cold-start-runs", "0",
                        "--folder-images", "0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| ort-cpu-1t | score | 4 |" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency.json", "latency.md", "latency.png"]


@pytest.mark.parametrize("args, words", [
    (["--batch-sizes", "1,x"], "--batch-sizes"),
    (["--device", "tpu"], "--device"),
])
def test_cli_bench_rejects_bad_options_in_one_line(tiny_model_dir, tmp_path, args, words):
    r = subprocess.run(["aae-run", "bench", "--model", str(tiny_model_dir), "-o", str(tmp_path), *args],
                       capture_output=True, text=True)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_cli_bench_refuses_an_out_dir_that_is_a_file_before_timing(tiny_model_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    r = subprocess.run(["aae-run", "bench", "--model", str(tiny_model_dir), "-o", str(tmp_path / "file")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr and "internal" not in r.stderr
    assert "execution provider" not in r.stderr  # refused before the model was loaded and timed


def test_cli_bench_on_a_missing_model_is_one_line(tmp_path):
    r = subprocess.run(["aae-run", "bench", "--model", str(tmp_path / "nope"), "-o", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_io_bound_path_matches_the_numpy_path(tiny_model_dir, mnist_test):
    """The CUDA benchmark's I/O-binding code, run with CPU buffers (no GPU needed)."""
    from aae_runtime import AAEModel

    m = AAEModel.load(tiny_model_dir, device="cpu")
    two_graphs = AAEModel(m.encoder, m.decoder, m.metadata)  # no fused scorer: encoder then decoder
    x = mnist_test[0][:5, None].astype(np.float32) / 255
    for model in (m, two_graphs):
        bound = bench.BoundScore(model, device="cpu")
        bound(x)
        bound(x)  # bindings are reused
        outputs = [o.numpy() for o in bound.bound[5][0][-1][1].get_outputs()]
        assert outputs and all(np.all(np.isfinite(o)) for o in outputs)
    recon = next(o for o in outputs if o.shape == x.shape)
    np.testing.assert_allclose(recon, m.reconstruct(x), atol=1e-6)
    sample = bench.BoundSample(m, device="cpu")
    sample(3)
    b, z, _ = sample.bound[3]
    np.testing.assert_allclose(b.get_outputs()[0].numpy(), m.decode(z.numpy()), atol=1e-6)


def test_the_benchmark_module_never_imports_torch():
    code = "import sys, aae_runtime.bench, aae_runtime.cli; sys.exit('torch' in sys.modules or 'onnx' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_cold_start_times_a_snapshot_that_writers_cannot_prune(tiny_model_dir, tmp_path):
    """Two calibrations during the cold-start runs pruned the version they timed: the runs now
    load a copy of the current version, in the model folder's own layout."""
    import shutil

    from aae_runtime import AAEModel
    from aae_runtime.bench.scenarios import _snapshot
    from aae_runtime.contract.modelfolder import POINTER, current_version

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    copy = _snapshot(model, tmp_path / "copy")
    assert (copy / POINTER).is_file() and current_version(copy).name == current_version(model).name
    shutil.rmtree(model)
    assert AAEModel.load(copy, device="cpu").threshold > 0
