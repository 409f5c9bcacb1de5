"""The score and the verdict inside the fused graph, for ONNX Runtime clients without Python.

`add_score_head` appends to an exported scorer graph the nodes that turn its
``reconstruction_error`` (and the image's mean intensity) into the metadata's score and compare
it with the threshold: outputs ``score`` float32[N] and ``anomaly`` bool[N]. The statistics live
in the initializer ``aae_score_params`` (layout: aae_runtime.contract.scores.head_params) and the
threshold in ``threshold``, which is also an optional graph input (a client may pass its own);
aae-run calibrate rewrites both in place. Every term is computed for both sources and selected
by a 0/1 parameter, so one graph serves every score without a latent term.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aae_runtime.contract.metadata import IMAGE_INPUT, RECONSTRUCTION_ERROR_OUTPUT
from aae_runtime.contract.scores import (
    ANOMALY_OUTPUT, HEAD_LENGTH, HEAD_PARAMS, HEAD_TERM_FIELDS, HEAD_THRESHOLD, INTENSITY_FLOOR, LOG_FLOOR, SCORE_OUTPUT,
)


def add_score_head(proto: onnx.ModelProto, params: np.ndarray, threshold: float, value_range: tuple[float, float]) -> None:
    """Append the score head to ``proto`` (in place); ``params`` from `head_params`."""
    assert params.shape == (HEAD_LENGTH,)
    g = proto.graph
    lo, hi = float(value_range[0]), float(value_range[1])
    consts = {"h_lo": lo, "h_span": (hi - lo) or 1.0, "h_floor": INTENSITY_FLOOR, "h_logfloor": LOG_FLOOR, "h_one": 1.0}
    g.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items())
    g.initializer.append(numpy_helper.from_array(params.astype(np.float32), HEAD_PARAMS))
    g.initializer.append(numpy_helper.from_array(np.array(threshold, np.float32), HEAD_THRESHOLD))
    g.initializer.append(numpy_helper.from_array(np.array([1, 2, 3], np.int64), "h_axes"))
    g.input.append(helper.make_tensor_value_info(HEAD_THRESHOLD, TensorProto.FLOAT, []))  # optional: the initializer is its default
    nodes = []

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def param(k):
        g.initializer.append(numpy_helper.from_array(np.array(k, np.int64), f"h_i{k}"))
        return node("Gather", [HEAD_PARAMS, f"h_i{k}"], f"h_p{k}", axis=0)

    def blend(flag, a, b, name):  # flag * a + (1 - flag) * b
        other = node("Sub", ["h_one", flag], f"{name}_not")
        return node("Add", [node("Mul", [flag, a], f"{name}_a"), node("Mul", [other, b], f"{name}_b")], name)

    recon = RECONSTRUCTION_ERROR_OUTPUT
    mean = node("ReduceMean", [IMAGE_INPUT, "h_axes"], "h_mean", keepdims=0)
    intensity = node("Div", [node("Sub", [mean, "h_lo"], "h_centred"), "h_span"], "h_intensity")
    relative = node("Div", [recon, node("Add", [intensity, "h_floor"], "h_ink")], "h_relative")
    weighted = []
    for t in range(2):
        s, is_log, m, sd, w, two = (param(t * HEAD_TERM_FIELDS + k) for k in range(HEAD_TERM_FIELDS))
        raw = blend(s, recon, relative, f"h_raw{t}")
        logged = node("Log", [node("Max", [raw, "h_logfloor"], f"h_floored{t}")], f"h_log{t}")
        value = blend(is_log, logged, raw, f"h_value{t}")
        u = node("Div", [node("Sub", [value, m], f"h_centred{t}"), sd], f"h_u{t}")
        dev = blend(two, node("Abs", [u], f"h_abs{t}"), u, f"h_dev{t}")
        weighted.append(node("Mul", [w, dev], f"h_w{t}"))
    is_max, second = param(2 * HEAD_TERM_FIELDS), param(2 * HEAD_TERM_FIELDS + 1)
    total = node("Add", [weighted[0], node("Mul", [second, weighted[1]], "h_second")], "h_sum")
    score = blend(is_max, node("Max", weighted, "h_max"), total, SCORE_OUTPUT)
    node("Greater", [score, HEAD_THRESHOLD], ANOMALY_OUTPUT)
    g.node.extend(nodes)
    g.output.append(helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, ["batch"]))
    g.output.append(helper.make_tensor_value_info(ANOMALY_OUTPUT, TensorProto.BOOL, ["batch"]))
