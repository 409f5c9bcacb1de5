"""Reading ONNX files at the wire level (aae_runtime.contract.onnxwire) and the lazy sessions it allows."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from aae_runtime.contract.modelfolder import current_version
from aae_runtime.contract.errors import ModelError
from aae_runtime.contract.onnxwire import read_graph_file
from aae_runtime.model import AAEModel


@pytest.mark.parametrize("name", ["encoder.onnx", "decoder.onnx", "scorer.onnx"])
def test_metadata_inputs_and_outputs_are_what_onnx_runtime_reads(tiny_model_dir, name):
    path = current_version(tiny_model_dir) / name
    wire = read_graph_file(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert wire.custom_metadata_map == session.get_modelmeta().custom_metadata_map
    assert [(a.name, a.shape) for a in wire.get_inputs()] == [(a.name, a.shape) for a in session.get_inputs()]
    assert [(a.name, a.shape) for a in wire.get_outputs()] == [(a.name, a.shape) for a in session.get_outputs()]
    assert ("", "Gemm") in wire.operators and all(isinstance(d, str) and op for d, op in wire.operators)


@pytest.mark.parametrize("damage", ["empty", "random", "truncated", "text"])
def test_damaged_files_are_a_model_error_naming_the_file(tiny_model_dir, tmp_path, damage):
    good = (current_version(tiny_model_dir) / "encoder.onnx").read_bytes()
    data = {"empty": b"", "random": np.random.default_rng(0).bytes(5000), "truncated": good[: len(good) // 2],
            "text": b"not an onnx model\n" * 50}[damage]
    path = tmp_path / "encoder.onnx"
    path.write_bytes(data)
    with pytest.raises(ModelError) as info:
        read_graph_file(path)
    assert "encoder.onnx" in str(info.value) and "\n" not in str(info.value)


def test_a_fused_model_opens_one_session_at_load_and_the_others_on_first_use(tiny_model_dir):
    m = AAEModel.load(tiny_model_dir, device="cpu")
    assert m.scorer is not None and callable(m._encoder) and callable(m._decoder)
    m.score(np.zeros((2, *m.input_shape), np.float32))
    assert callable(m._decoder)  # scoring through the fused graph needs no decoder
    images = m.sample(3, seed=0)
    assert images.shape == (3, *m.input_shape) and not callable(m._decoder)


def test_a_graph_replaced_after_load_is_refused_when_first_used(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    m = AAEModel.load(folder, device="cpu")
    graphs = current_version(folder)
    other = tmp_path / "other.onnx"
    # the scorer's bytes in the decoder's place: a different graph, another input
    shutil.copy(graphs / "scorer.onnx", other)
    os.replace(other, graphs / "decoder.onnx")
    with pytest.raises(ModelError, match="changed since the model was loaded"):
        m.sample(2, seed=0)
