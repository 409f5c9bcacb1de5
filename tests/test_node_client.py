"""A client without Python: ONNX Runtime for Node.js runs the exported fused graph (docs/clients/score.cjs)
and gets the scores and verdicts of `aae-run score`, reading only the model folder's files."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from aae_runtime import AAEModel
from tests.conftest import write_png

REPO = Path(__file__).resolve().parents[1]
NODE_MODULES = REPO / ".venv" / "node" / "node_modules"
CLIENT = REPO / "docs" / "clients" / "score.cjs"

pytestmark = pytest.mark.skipif(shutil.which("node") is None or not (NODE_MODULES / "onnxruntime-node").is_dir(),
                                reason="needs node and onnxruntime-node (make setup installs it where npm exists)")


def test_node_gets_the_scores_and_verdicts_of_aae_run_score(tiny_model_dir, tmp_path, mnist_test):
    paths = [write_png(tmp_path / f"{i}.png", mnist_test[0][i]) for i in range(6)]
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    paths.append(write_png(tmp_path / "noise.png", noise))
    model = AAEModel.load(tiny_model_dir, device="cpu")
    expected = model.score_paths(paths)
    np.stack(model.load_images(paths)).astype("<f4").tofile(tmp_path / "in.bin")
    r = subprocess.run(["node", str(CLIENT), str(tiny_model_dir), str(tmp_path / "in.bin"), str(len(paths))],
                       capture_output=True, text=True, timeout=120, env={"NODE_PATH": str(NODE_MODULES), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    np.testing.assert_allclose(got["score"], [e.score for e in expected], rtol=1e-4, atol=1e-5)
    assert [bool(a) for a in got["anomaly"]] == [e.anomaly for e in expected]
