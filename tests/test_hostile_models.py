"""Broken model folders through the `aae-run` CLI: one clear line, exit code 2, no traceback.

Each case copies the tiny exported model and breaks one thing: a missing, empty, truncated or
non-ONNX graph; metadata missing, malformed, of a newer schema or with wrong fields; an encoder
and decoder that do not belong together (another export, another latent size).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from typer.testing import CliRunner

from aae_runtime import AAEModel, ModelError
from aae_runtime.cli import app as run_app
from aae_runtime.contract.modelfolder import current_version
from aae_runtime.contract.metadata import DECODER_FILE, ENCODER_FILE, METADATA_KEY, SCHEMA_VERSION, SCORER_FILE
from tests.conftest import write_png


def run_cli(*args):
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run(["aae-run", *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def read_meta(path: Path) -> dict:
    proto = onnx.load(str(path))
    return json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])


def set_meta(path: Path, text: str | None) -> None:
    """Replace (or with None remove) the metadata block of one graph, keeping the weights."""
    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    if text is not None:
        proto.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=text))
    onnx.save(proto, str(path))


def edit_meta(path: Path, change) -> None:
    meta = read_meta(path)
    change(meta)
    set_meta(path, json.dumps(meta))


def all_graphs(model: Path):
    return [current_version(model) / n for n in (ENCODER_FILE, DECODER_FILE, SCORER_FILE) if (current_version(model) / n).exists()]


def g(model: Path) -> Path:
    """The folder of the model's current graph files."""
    return current_version(model)


def foreign_decoder(path: Path, latent: int, meta: dict) -> None:
    """A working decoder graph of another latent size (as another export would have)."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.1, (latent, 784)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 1, 28, 28], dtype=np.int64), "shape")
    nodes = [helper.make_node("MatMul", ["latent", "w"], ["h"]), helper.make_node("Sigmoid", ["h"], ["s"]),
             helper.make_node("Reshape", ["s", "shape"], ["reconstruction"])]
    graph = helper.make_graph(nodes, "foreign", [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["batch", latent])],
                              [helper.make_tensor_value_info("reconstruction", TensorProto.FLOAT, ["batch", 1, 28, 28])],
                              initializer=[w, shape])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    meta = {**meta, "latent_dim": latent, "export_id": "another-export"}
    meta["prior"] = {**meta["prior"], "dim": latent}
    proto.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(meta)))
    onnx.save(proto, str(path))


def _lying_decoder(model: Path) -> None:
    """A decoder graph of latent size 6 carrying the encoder's own metadata (latent 4, same export)."""
    meta = read_meta(g(model) / ENCODER_FILE)
    foreign_decoder(g(model) / DECODER_FILE, 6, meta)
    set_meta(g(model) / DECODER_FILE, json.dumps(meta))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


CASES = {
    # name: (how to break the copied model folder, words the one-line error must contain)
    "folder missing": (lambda m: shutil.rmtree(m), "does not exist"),
    "folder is a file": (lambda m: (shutil.rmtree(m), m.write_text("x")), "is a file, not a model folder"),
    "encoder missing": (lambda m: (g(m) / ENCODER_FILE).unlink(), "has no encoder.onnx"),
    "decoder missing": (lambda m: (g(m) / DECODER_FILE).unlink(), "has no decoder.onnx"),
    "encoder empty": (lambda m: (g(m) / ENCODER_FILE).write_bytes(b""), "is empty"),
    "decoder truncated": (lambda m: _truncate(g(m) / DECODER_FILE), "cannot load decoder.onnx"),
    "encoder not onnx": (lambda m: (g(m) / ENCODER_FILE).write_text("<html>not a model</html>"), "cannot load encoder.onnx"),
    "encoder random bytes": (lambda m: (g(m) / ENCODER_FILE).write_bytes(np.random.default_rng(1).bytes(5000)), "cannot load encoder.onnx"),
    "encoder is a folder": (lambda m: ((g(m) / ENCODER_FILE).unlink(), (g(m) / ENCODER_FILE).mkdir()), "has no encoder.onnx"),
    "scorer truncated": (lambda m: _truncate(g(m) / SCORER_FILE) if (g(m) / SCORER_FILE).exists() else _truncate(g(m) / DECODER_FILE),
                         "cannot load"),
    "metadata missing": (lambda m: set_meta(g(m) / ENCODER_FILE, None), "no 'aae' metadata"),
    "metadata malformed": (lambda m: set_meta(g(m) / ENCODER_FILE, '{"schema_version": 1, '), "malformed metadata"),
    "metadata not an object": (lambda m: set_meta(g(m) / DECODER_FILE, "[1, 2, 3]"), "not a JSON object"),
    "metadata newer schema": (lambda m: [edit_meta(p, lambda d: d.update(schema_version=SCHEMA_VERSION + 1)) for p in all_graphs(m)],
                              "upgrade aae"),
    "metadata no schema": (lambda m: edit_meta(g(m) / ENCODER_FILE, lambda d: d.pop("schema_version")), "schema_version"),
    "metadata latent wrong type": (lambda m: edit_meta(g(m) / ENCODER_FILE, lambda d: d.update(latent_dim="4")), "latent_dim"),
    "metadata bad size": (lambda m: edit_meta(g(m) / ENCODER_FILE, lambda d: d["preprocessing"].update(size=[0, 28])), "preprocessing"),
    "metadata bad colour": (lambda m: edit_meta(g(m) / ENCODER_FILE, lambda d: d["preprocessing"].update(color_mode="CMYK")), "preprocessing"),
    "metadata no threshold": (lambda m: edit_meta(g(m) / ENCODER_FILE, lambda d: d.update(threshold={"value": "high"})), "threshold"),
    "another export": (lambda m: edit_meta(g(m) / DECODER_FILE, lambda d: d.update(export_id="another-export")), "different exports"),
    "another latent size": (lambda m: foreign_decoder(g(m) / DECODER_FILE, 6, read_meta(g(m) / DECODER_FILE)), "different exports"),
    "latent size lies": (lambda m: _lying_decoder(m), "latent size 6"),
}


@pytest.fixture(scope="module")
def image(tmp_path_factory, mnist_test) -> Path:
    return write_png(tmp_path_factory.mktemp("img") / "digit.png", mnist_test[0][0])


# These go through the installed console script (a process each); all cases also go through the
# same Typer app in-process (CliRunner), which is quicker by the process start-up.
SUBPROCESS_CASES = ("folder missing", "decoder truncated", "metadata newer schema", "another latent size", "latent size lies")


@pytest.fixture(scope="module")
def broken(tiny_model_dir, tmp_path_factory, image):
    """{case: (model folder, result)}: in-process CliRunner results, real processes for a few."""
    folders = {}
    for case, (break_it, _) in CASES.items():
        model = tmp_path_factory.mktemp("broken") / "model"
        shutil.copytree(tiny_model_dir, model)
        break_it(model)
        folders[case] = model
    runner = CliRunner()
    results = {case: runner.invoke(run_app, ["score", str(image), "--model", str(m), "--device", "cpu"])
               for case, m in folders.items()}
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = {case: pool.submit(run_cli, "score", image, "--model", folders[case], "--device", "cpu") for case in SUBPROCESS_CASES}
        procs = {case: runs[case].result() for case in SUBPROCESS_CASES}
    return {case: (folders[case], results[case], procs.get(case)) for case in CASES}


def check_one_line(r, words: str) -> None:
    """``r``: a subprocess result, or a CliRunner result (stderr mixed into ``output``)."""
    code = r.returncode if hasattr(r, "returncode") else r.exit_code
    text = r.stderr + r.stdout if hasattr(r, "returncode") else r.output
    assert code == 2, text
    if not hasattr(r, "returncode"):
        assert isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in text
    lines = [ln for ln in text.strip().splitlines() if not ln.startswith("execution provider")]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert words in lines[0], lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_model_is_one_line_and_exit_code_2(case, broken):
    model, in_process, process = broken[case]
    check_one_line(in_process, CASES[case][1])
    if process is not None:
        check_one_line(process, CASES[case][1])
    with pytest.raises(ModelError):
        AAEModel.load(model, device="cpu")


@pytest.mark.parametrize("case", ["metadata newer schema", "another latent size", "encoder empty"])
def test_info_and_sample_fail_the_same_way(case, broken, tmp_path):
    model = broken[case][0]
    runner = CliRunner()
    check_one_line(runner.invoke(run_app, ["info", "--model", str(model), "--device", "cpu"]), CASES[case][1])
    check_one_line(runner.invoke(run_app, ["sample", "--model", str(model), "--device", "cpu", "-o", str(tmp_path / "s.png")]),
                   CASES[case][1])
    assert not (tmp_path / "s.png").exists()


def test_the_intact_copy_loads(tiny_model_dir, tmp_path, image):
    """The copies above fail only because of what each case broke."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    edit_meta(g(model) / ENCODER_FILE, lambda d: None)  # rewritten through onnx, content unchanged
    r = run_cli("score", image, "--model", model, "--device", "cpu")
    assert r.returncode == 0, r.stderr
