"""Fused scorer parity, recalibration on the device, run-time thresholds, anomaly maps (real model)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from aae_runtime.contract.modelfolder import current_version
from aae_runtime import AAEModel, ModelError
from aae_runtime.cli import app
from aae_runtime.contract.metadata import METADATA_KEY
from aae_runtime.contract.onnxwire import set_metadata_prop
from tests.conftest import write_png

runner = CliRunner()


def _meta(path) -> dict:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return json.loads(s.get_modelmeta().custom_metadata_map[METADATA_KEY])


@pytest.fixture(scope="module")
def images(mnist_test):
    pixels, labels = mnist_test
    return pixels, labels


@pytest.fixture(scope="module")
def folders(tmp_path_factory, images):
    """normal/: 30 test digits; anomalies/: 12 noise images; a/ and b/ hold files of equal names."""
    pixels, _ = images
    root = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for i in range(30):
        write_png(root / "normal" / f"n{i:02d}.png", pixels[100 + i])
    for i in range(12):
        write_png(root / "anomalies" / f"x{i:02d}.png", (rng.random((28, 28)) * 255).astype(np.uint8))
    for sub, offset in (("a", 0), ("b", 5)):
        for i in range(3):
            write_png(root / "lines" / sub / f"img{i}.png", pixels[offset + i])
    write_png(root / "lines" / "b" / "noise.png", (rng.random((28, 28)) * 255).astype(np.uint8))
    return root


def test_fused_graph_is_used_and_matches_the_two_graph_path(tiny_model_dir, images):
    fused, two = AAEModel.load(tiny_model_dir, device="cpu"), AAEModel.load(tiny_model_dir, device="cpu", use_scorer=False)
    assert fused.scorer is not None and two.scorer is None
    assert _meta(current_version(tiny_model_dir) / "scorer.onnx") == _meta(current_version(tiny_model_dir) / "encoder.onnx")
    x = images[0][:65, None].astype(np.float32) / 255
    a, b = fused.score_parts(x), two.score_parts(x)
    np.testing.assert_allclose(a.latent, b.latent, atol=1e-5)
    np.testing.assert_allclose(a.pixel_error, b.pixel_error, atol=1e-5)
    np.testing.assert_allclose(fused.score(x), two.score(x), rtol=1e-4, atol=1e-6)
    assert a.pixel_error.shape == (65, 28, 28)


def test_calibrate_rewrites_every_graph_keeps_the_pairing_and_needs_no_torch(tiny_model_dir, folders, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    before = _meta(current_version(model) / "encoder.onnx")
    code = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from aae_runtime.cli import app
        r = CliRunner().invoke(app, ["calibrate", {str(folders / 'normal')!r}, "--model", {str(model)!r},
                                     "--anomalies", {str(folders / 'anomalies')!r}])
        print(r.output)
        assert r.exit_code == 0, r.output
        assert not [k for k in sys.modules if k.split(".")[0] in ("torch", "onnx", "aae_train", "export")]
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "F1-optimal" in r.stdout and "on 30 normal and 12 anomalous images; it flags 0 % of the normal ones" in r.stdout, r.stdout
    metas = [_meta(current_version(model) / n) for n in ("encoder.onnx", "decoder.onnx", "scorer.onnx")]
    assert metas[0] == metas[1] == metas[2]
    t = metas[0]["threshold"]
    assert metas[0]["export_id"] == before["export_id"] and metas[0]["score"]["name"] == before["score"]["name"]
    assert t["method"] == "f1" and t["anomaly_count"] == 12 and t["stats"]["count"] == 30 and t != before["threshold"]
    m = AAEModel.load(model, device="cpu")
    rows = m.score_paths([folders / "anomalies"])
    assert all(r.anomaly for r in rows)  # noise is far from digits: F1 puts the threshold between them
    info = runner.invoke(app, ["info", "--model", str(model)]).output
    assert "(f1 of 30 normal images given to aae-run calibrate, with 12 anomalous ones)" in info, info

    r = runner.invoke(app, ["calibrate", str(folders / "normal"), "--model", str(model), "--percentile", "90"])
    assert r.exit_code == 0, r.output
    t = _meta(current_version(model) / "decoder.onnx")["threshold"]
    assert t["method"] == "percentile" and t["percentile"] == 90 and t["stats"]["count"] == 30
    info = runner.invoke(app, ["info", "--model", str(model)]).output
    assert "(90th percentile of 30 normal images given to aae-run calibrate)" in info, info


def test_an_interrupted_recalibration_is_refused(tiny_model_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    graphs = current_version(model)
    meta = _meta(graphs / "encoder.onnx")
    meta["threshold"]["value"] = 123.0
    data = set_metadata_prop((graphs / "encoder.onnx").read_bytes(), METADATA_KEY, json.dumps(meta))
    (graphs / "encoder.onnx").write_bytes(data)  # a version folder edited by hand: its graphs disagree
    with pytest.raises(ModelError, match="calibrate again"):
        AAEModel.load(model, device="cpu")


def test_too_few_normal_images_is_one_line_and_exit_2(tiny_model_dir, folders, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    r = runner.invoke(app, ["calibrate", str(folders / "lines" / "a"), "--model", str(model)])
    assert r.exit_code == 2 and "at least 10" in r.output


def test_threshold_by_percentile_and_normalised_rows(tiny_model_dir, folders, tmp_path):
    m = AAEModel.load(tiny_model_dir, device="cpu")
    stats = m.metadata.threshold["stats"]
    low = AAEModel.load(tiny_model_dir, device="cpu", threshold_percentile=50)
    assert low.threshold == pytest.approx(stats["percentiles"]["50"], rel=1e-6) and low.threshold < m.threshold
    rows = m.score_paths([folders / "normal"])
    s = np.array([r.score for r in rows])
    at = AAEModel.load(tiny_model_dir, device="cpu", threshold=float(s[0]))
    assert at.score_paths([rows[0].path])[0].normalized_score == pytest.approx(0.5)
    assert all(0.0 <= r.normalized_score <= 1.0 for r in rows)
    r = runner.invoke(app, ["score", str(folders / "normal"), "--model", str(tiny_model_dir), "--threshold", "1",
                            "--threshold-percentile", "90"])
    assert r.exit_code == 2
    out = tmp_path / "rows.csv"
    r = runner.invoke(app, ["score", str(folders / "normal"), "--model", str(tiny_model_dir), "--threshold-percentile", "50",
                            "-o", str(out)])
    assert r.exit_code == 0, r.output
    csv_rows = list(csv.DictReader(open(out)))
    assert {"score", "normalized_score", "threshold"} <= set(csv_rows[0])
    flagged = [row for row in csv_rows if row["anomaly"] == "True"]
    assert 5 <= len(flagged) <= 25 and all(float(row["normalized_score"]) > 0.5 for row in flagged)


def test_maps_map_back_to_inputs_even_with_equal_names(tiny_model_dir, folders, tmp_path):
    from PIL import Image

    maps = tmp_path / "maps"
    r = runner.invoke(app, ["score", str(folders / "lines" / "a"), str(folders / "lines" / "b"), "--model", str(tiny_model_dir),
                            "--maps", str(maps)])
    assert r.exit_code == 0, r.output
    index = list(csv.DictReader(open(maps / "maps.csv")))
    assert len(index) == 7 and len({row["map"] for row in index}) == 7
    assert {row["map"] for row in index} >= {"a__img0.png.map.png", "b__img0.png.map.png"}
    for row in index:
        img = Image.open(maps / row["map"])
        assert img.mode == "RGB" and img.width > 3 * img.height - 20 and img.height >= 112
    # the noise image must be hot somewhere the digits are not
    heat = lambda name: np.asarray(Image.open(maps / name), dtype=float)[:, 120:232].mean()  # noqa: E731
    assert heat("b__noise.png.map.png") > heat("a__img0.png.map.png")

    flagged = tmp_path / "flagged"
    r = runner.invoke(app, ["score", str(folders / "lines"), "--model", str(tiny_model_dir), "--maps", str(flagged),
                            "--maps-only-flagged", "--threshold-percentile", "99.9"])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in flagged.glob("*.map.png"))
    assert "b__noise.png.map.png" in names and len(names) < 7
    r = runner.invoke(app, ["score", str(folders / "lines"), "--model", str(tiny_model_dir), "--maps-only-flagged"])
    assert r.exit_code == 2


def test_calibrating_on_copies_of_one_image_is_refused_and_changes_nothing(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = AAEModel.load(model, device="cpu").threshold
    for i in range(12):
        write_png(tmp_path / "same" / f"{i}.png", np.zeros((28, 28), np.uint8))
    r = CliRunner().invoke(app, ["calibrate", str(tmp_path / "same"), "--model", str(model)])
    assert r.exit_code == 2 and "all score alike" in " ".join(r.output.split()), r.output
    assert AAEModel.load(model, device="cpu").threshold == before


def test_an_image_given_as_normal_and_as_anomalous_is_refused_however_it_is_given(tiny_model_dir, tmp_path):
    for i in range(12):
        write_png(tmp_path / "normal" / f"{i}.png", (np.arange(28 * 28).reshape(28, 28) * (i + 1) % 256).astype(np.uint8))
    for anomalies in (tmp_path / "normal", tmp_path / "normal" / "3.png"):  # the folder itself, or a file inside it
        r = CliRunner().invoke(app, ["calibrate", str(tmp_path / "normal"), "--model", str(tiny_model_dir),
                                     "--anomalies", str(anomalies)])
        assert r.exit_code == 2 and "is given as normal and as anomalous" in " ".join(r.output.split()), r.output
