"""Hostile model folders refused up front: operators aae-export never writes, runaway and
failing inference, metadata too large, too deep or invalid. All built at test time."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from aae_runtime import AAEModel, ModelError
from aae_runtime.contract.metadata import ENCODER_FILE, METADATA_KEY
from aae_runtime.contract.modelfolder import current_version
from aae_runtime.session import SessionConfig, create_session
from tests.conftest import write_png


def endless_loop_graph() -> onnx.ModelProto:
    """y = x after 10^15 iterations of an empty loop body: runs for ever."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Constant", [], ["n"], value=helper.make_tensor("n", TensorProto.INT64, [], [10**15])),
             helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
             helper.make_node("Loop", ["n", "c", "image"], ["latent"], body=body)]
    graph = helper.make_graph(nodes, "endless", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
                              [helper.make_tensor_value_info("latent", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def huge_allocation_graph() -> onnx.ModelProto:
    """Expands its input to 10^7 x 10^7 floats (400 TB): the allocation fails at once."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [10**7, 10**7])
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], keepdims=0),
             helper.make_node("Expand", ["m", "shape"], ["latent"])]
    graph = helper.make_graph(nodes, "huge", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
                              [helper.make_tensor_value_info("latent", TensorProto.FLOAT, None)], initializer=[shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def with_metadata(proto: onnx.ModelProto, source: Path) -> onnx.ModelProto:
    meta = {p.key: p.value for p in onnx.load(str(source)).metadata_props}
    proto.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in meta.items())
    return proto


@pytest.fixture()
def model(tiny_model_dir, tmp_path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    return out


def replace_graph(model: Path, name: str, proto: onnx.ModelProto) -> None:
    target = current_version(model) / name
    onnx.save(with_metadata(proto, target), str(target))


def test_a_graph_with_a_loop_is_refused_at_load_in_one_line(model, tmp_path, mnist_test):
    replace_graph(model, ENCODER_FILE, endless_loop_graph())
    image = write_png(tmp_path / "d.png", mnist_test[0][0])
    start = time.monotonic()
    r = subprocess.run(["aae-run", "score", str(image), "--model", str(model), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Loop" in errors[0] and "aae-export never writes" in errors[0], r.stderr


def test_a_runaway_inference_call_is_stopped_by_the_time_limit():
    session, _ = create_session(endless_loop_graph().SerializeToString(), SessionConfig(device="cpu", call_time_limit_s=1.0))
    start = time.monotonic()
    with pytest.raises(ModelError, match="ran over 1 s and was stopped"):
        session.run(None, {"image": np.zeros((1, 1, 28, 28), np.float32)})
    assert time.monotonic() - start < 10


def test_an_inference_that_cannot_allocate_is_a_model_error_not_an_internal_one(model):
    replace_graph(model, "scorer.onnx", huge_allocation_graph())
    # the allow-list passes it (Expand and ReduceMean are ops aae-export writes); its outputs do not
    with pytest.raises(ModelError):
        m = AAEModel.load(model, device="cpu")
        m.score(np.zeros((1, 1, 28, 28), np.float32))
    session, _ = create_session(huge_allocation_graph().SerializeToString(), SessionConfig(device="cpu"))
    with pytest.raises(ModelError, match="inference failed"):
        session.run(None, {"image": np.zeros((1, 1, 28, 28), np.float32)})


def _set_encoder_metadata(model: Path, text: str) -> None:
    path = current_version(model) / ENCODER_FILE
    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept + [onnx.StringStringEntryProto(key=METADATA_KEY, value=text)])
    onnx.save(proto, str(path))


def _meta(model: Path) -> dict:
    proto = onnx.load(str(current_version(model) / ENCODER_FILE))
    return json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])


HOSTILE_METADATA = {
    "50 MB": (lambda meta: json.dumps(dict(meta, padding="x" * 50_000_000)), "MB of metadata"),
    "7 million elements": (lambda meta: json.dumps(dict(meta, padding=[0] * 7_000_000)), "MB of metadata"),
    "nested 10,000 deep": (lambda meta: json.dumps(dict(meta, padding=0))[:-1] + ', "deep": ' + "[" * 10_000 + "]" * 10_000 + "}",
                           "nested"),
    "lone surrogate": (lambda meta: json.dumps(dict(meta, family="\\ud800"))[:-1].replace('"\\\\ud800"', '"\\ud800"') + "}",
                       "surrogate"),
    "scale 0": (lambda meta: json.dumps(dict(meta, preprocessing=dict(meta["preprocessing"], scale=0.0))), "scale 0"),
}


@pytest.mark.parametrize("case", list(HOSTILE_METADATA))
def test_hostile_metadata_is_refused_quickly_in_one_line(model, case):
    build, words = HOSTILE_METADATA[case]
    _set_encoder_metadata(model, build(_meta(model)))
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        AAEModel.load(model, device="cpu")
    assert time.monotonic() - start < 5
    assert words in str(info.value) and "\n" not in str(info.value), str(info.value)
