"""The score and the verdict inside the fused graph: what the runtime computes, rewritten by
calibrate, refused when graph and metadata disagree, and metadata.json beside the graphs."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnxruntime as ort
import pytest

from aae_runtime import AAEModel, ModelError
from aae_runtime.contract.modelfolder import current_version
from aae_runtime.contract.onnxwire import read_graph_file, replace_initializers
from aae_runtime.contract.scores import HEAD_PARAMS, HEAD_THRESHOLD, head_params
from tests.conftest import write_png


def graph_scores(model_dir, x, threshold=None):
    session = ort.InferenceSession(str(current_version(model_dir) / "scorer.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"image": x} if threshold is None else {"image": x, "threshold": np.array(threshold, np.float32)}
    return session.run(["score", "anomaly"], feeds)


def test_the_graph_gives_the_runtimes_score_and_verdict_and_takes_a_threshold(tiny_model_dir, mnist_test):
    m = AAEModel.load(tiny_model_dir, device="cpu")
    x = np.concatenate([np.stack([np.asarray(img, np.float32)[None] / 255 for img in mnist_test[0][:50]]),
                        np.random.default_rng(0).uniform(0, 1, (10, 1, 28, 28)).astype(np.float32)])
    score, anomaly = graph_scores(tiny_model_dir, x)
    ref = m.score(x)
    np.testing.assert_allclose(score, ref, rtol=1e-4, atol=1e-5)
    assert (anomaly == (ref > m.threshold)).all() and anomaly.any() and not anomaly.all()
    _, none = graph_scores(tiny_model_dir, x, threshold=1e9)
    assert not none.any()
    meta = json.loads((current_version(tiny_model_dir) / "metadata.json").read_text())
    assert meta == m.metadata.raw


def test_calibrate_rewrites_the_graphs_statistics_and_threshold(tiny_model_dir, tmp_path, mnist_test):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    normal = tmp_path / "normal"
    for i in range(20):
        write_png(normal / f"{i}.png", mnist_test[0][100 + i])
    r = subprocess.run(["aae-run", "calibrate", str(normal), "--model", str(model), "--percentile", "50",
                        "--score", "mse_rel"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = AAEModel.load(model, device="cpu")
    assert m.score_name == "mse_rel" and m.metadata.threshold["percentile"] == 50
    x = np.stack([np.asarray(img, np.float32)[None] / 255 for img in mnist_test[0][:40]])
    score, anomaly = graph_scores(model, x)
    np.testing.assert_allclose(score, m.score(x), rtol=1e-4, atol=1e-5)
    assert (anomaly == (m.score(x) > m.threshold)).all()
    assert json.loads((current_version(model) / "metadata.json").read_text())["score"]["name"] == "mse_rel"
    latent = subprocess.run(["aae-run", "calibrate", str(normal), "--model", str(model), "--score", "mse+prior"],
                            capture_output=True, text=True)
    errors = [line for line in latent.stderr.splitlines() if line.startswith("error:")]
    assert latent.returncode == 2 and len(errors) == 1 and "latent term" in errors[0]


def test_a_graph_whose_statistics_disagree_with_its_metadata_is_refused(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    scorer = current_version(model) / "scorer.onnx"
    wire = read_graph_file(scorer, initializers=frozenset({HEAD_PARAMS}))
    params = np.frombuffer(wire.initializers[HEAD_PARAMS], "<f4").copy()
    params[2] += 1.0  # the first term's mean
    scorer.write_bytes(replace_initializers(scorer.read_bytes(), {HEAD_PARAMS: params.tobytes()}))
    with pytest.raises(ModelError, match="disagrees with its metadata"):
        AAEModel.load(model, device="cpu")


def test_head_params_cover_reconstruction_scores_only():
    assert head_params({"name": "mse", "terms": [{"source": "reconstruction", "transform": "identity", "mean": 0, "std": 1}]}) is not None
    assert head_params({"name": "mse+prior", "terms": [{"source": "reconstruction", "transform": "log", "mean": 0, "std": 1},
                                                        {"source": "prior", "transform": "identity", "mean": 0, "std": 1}]}) is None
