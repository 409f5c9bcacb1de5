"""int8 (static QDQ) and fp16 exports of the tiny real model: they load like any export, keep
float32 inputs and outputs, record their variant, and score MNIST digits close to float32."""

from __future__ import annotations

import subprocess

import numpy as np
import onnx
import pytest

from aae_runtime.contract.modelfolder import current_version
from aae_runtime import AAEModel
from export.onnx_export import export_checkpoint


@pytest.fixture(scope="module")
def digits(mnist_test):
    images, _ = mnist_test
    return images[:300, None].astype(np.float32) / 255


@pytest.fixture(scope="module")
def fp32_scores(tiny_model_dir, digits):
    return AAEModel.load(tiny_model_dir, device="cpu").score(digits)


@pytest.fixture(scope="module")
def fp32_recon(tiny_model_dir):
    return AAEModel.load(tiny_model_dir, device="cpu").reconstruct


@pytest.fixture(scope="module", params=["int8", "fp16"])
def variant_dir(request, tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    result = export_checkpoint(tiny_run.checkpoint, out, log=lambda s: None, variant=request.param)
    return request.param, out, result.metadata


def test_variant_loads_transparently_and_records_itself(variant_dir, digits):
    name, out, metadata = variant_dir
    m = AAEModel.load(out, device="cpu")
    assert m.metadata.raw["variant"]["precision"] == name == metadata["variant"]["precision"]
    for f in ("encoder.onnx", "decoder.onnx"):
        g = onnx.load(current_version(out) / f)
        assert all(t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for t in [*g.graph.input, *g.graph.output])
        ops = {n.op_type for n in g.graph.node}
        assert ("QuantizeLinear" in ops) if name == "int8" else any(
            i.data_type == onnx.TensorProto.FLOAT16 for i in g.graph.initializer)
    assert m.score(digits[:3]).dtype == np.float64 and m.sample(2, seed=0).dtype == np.float32


def test_variant_scores_stay_close_to_float32(variant_dir, digits, fp32_scores, fp32_recon):
    name, out, metadata = variant_dir
    m = AAEModel.load(out, device="cpu")
    scores = m.score(digits)
    rel = np.abs(scores - fp32_scores) / fp32_scores
    limit = 1e-2 if name == "fp16" else 0.1  # fp16 rounds; int8 quantises every activation
    assert np.median(rel) < limit / 4
    # reconstructions: pixels in [0, 1]; a relative score can magnify one faint image's change
    recon_gap = np.abs(m.reconstruct(digits) - fp32_recon(digits)).mean()
    assert recon_gap < (1e-3 if name == "fp16" else 0.02)
    ranks = np.corrcoef(np.argsort(np.argsort(scores)), np.argsort(np.argsort(fp32_scores)))[0, 1]
    assert ranks > 0.98
    drift = metadata["variant"]["score_drift_vs_fp32"]
    assert drift["images"] > 0 and 0 <= drift["median_relative"] <= drift["max_relative"]


def test_export_cli_refuses_int8_and_fp16_together(tmp_path):
    r = subprocess.run(["aae-export", "--checkpoint", str(tmp_path / "c.pt"), "--quantize", "int8", "--precision", "fp16"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not both" in r.stderr and "Traceback" not in r.stderr
