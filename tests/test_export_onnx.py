"""Exported graphs: self-contained, dynamic batch, named I/O, metadata, threshold from held-out data."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort

from aae_runtime.contract.modelfolder import current_version
from aae_runtime.contract.metadata import METADATA_KEY, SCHEMA_WITHOUT_REQUIREMENTS as SCHEMA_VERSION


def _meta(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])


def test_files_are_self_contained_and_have_a_dynamic_named_batch_axis(tiny_model_dir):
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == [".lock", "MODEL.json", "versions"]  # the folder's layout
    graphs = current_version(tiny_model_dir)
    assert sorted(p.name for p in graphs.iterdir()) == ["decoder.onnx", "encoder.onnx", "metadata.json", "scorer.onnx"]  # no .data
    for name, inp, out in (("encoder", "image", "latent"), ("decoder", "latent", "reconstruction")):
        proto = onnx.load(str(graphs / f"{name}.onnx"))
        assert all(t.data_location == onnx.TensorProto.DEFAULT for t in proto.graph.initializer)
        assert [i.name for i in proto.graph.input] == [inp] and [o.name for o in proto.graph.output] == [out]
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_metadata_is_complete_and_identical_in_both_graphs(tiny_model_dir, tiny_run):
    _, enc = _meta(current_version(tiny_model_dir) / "encoder.onnx")
    _, dec = _meta(current_version(tiny_model_dir) / "decoder.onnx")
    assert enc == dec
    assert enc["schema_version"] == SCHEMA_VERSION
    assert enc["input"]["shape"] == ["batch", 1, 28, 28] and enc["input"]["value_range"] == [0.0, 1.0]
    assert enc["preprocessing"]["color_mode"] == "L" and enc["latent_dim"] == 4
    assert enc["prior"] == {"name": "gaussian", "dim": 4, "mean": 0.0, "std": 1.0}
    assert enc["score"]["name"]
    prov = enc["provenance"]
    from aae_train.checkpoint import file_sha256

    assert prov["checkpoint_sha256"] == file_sha256(tiny_run.checkpoint)
    assert prov["package_version"] and prov["exported_at"] and prov["training_config"]["model"]["hidden"] == 64


def test_threshold_is_a_percentile_of_held_out_validation_scores(tiny_model_dir):
    _, meta = _meta(current_version(tiny_model_dir) / "encoder.onnx")
    t = meta["threshold"]
    assert t["method"] == "percentile" and t["percentile"] == 99.0
    assert t["stats"]["count"] == 160  # 20 % of the 800 training images, never the test split
    assert t["stats"]["min"] <= t["value"] <= t["stats"]["max"]
    assert "validation" in t["split"]


def test_every_batch_size_runs(tiny_model_dir):
    enc, _ = _meta(current_version(tiny_model_dir) / "encoder.onnx")
    for n in (1, 3, 100):
        z = enc.run(None, {"image": np.zeros((n, 1, 28, 28), np.float32)})[0]
        assert z.shape == (n, 4)


def test_export_cli_prints_parity_and_fails_cleanly_on_a_missing_checkpoint(tmp_path, tiny_run):
    import subprocess

    ok = subprocess.run(["aae-export", "--checkpoint", str(tiny_run.checkpoint), "--out", str(tmp_path / "m")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "largest |difference|" in ok.stderr and "checker (full check): passed" in ok.stderr
    bad = subprocess.run(["aae-export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "m2")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "not found" in bad.stderr
    assert not (tmp_path / "m2").exists()


def test_two_exports_racing_for_one_new_folder_leave_one_model_and_refuse_the_other(tmp_path, tiny_run):
    import subprocess

    cmd = ["aae-export", "--checkpoint", str(tiny_run.checkpoint), "--out", str(tmp_path / "m")]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(r.wait(timeout=300), r.stderr.read()) for r in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "already holds a model" in refused and "--overwrite" in refused and "Traceback" not in refused
    assert len(list((tmp_path / "m" / "versions").iterdir())) == 1


def test_a_writer_that_wants_a_new_folder_is_refused_under_the_lock(tiny_model_dir):
    import pytest

    from aae_runtime.contract.errors import ModelError
    from aae_runtime.contract.modelfolder import write_version

    before = current_version(tiny_model_dir)
    with pytest.raises(ModelError, match="already holds a model"):
        with write_version(tiny_model_dir, "x", new_only=True):
            raise AssertionError("not reached")
    assert current_version(tiny_model_dir) == before
