"""Smaller, faster variants of the exported graphs: int8 (static QDQ) and fp16.

`aae-export --quantize int8` and `--precision fp16` call `make_variant` on the verified float32
graphs. Both variants keep float32 inputs and outputs and the graph names, so the runtime loads
them like any export; the metadata's ``variant`` block records which one a folder holds.

- int8: onnxruntime.quantization static quantisation in QDQ format, int8 weights per output
  channel, uint8 activations (the U8S8 pair ORT's CPU kernels are fastest with, VNNI included),
  ranges calibrated (MinMax) on held-out *normal* images: the encoder on those images, the
  decoder on their codes plus as many prior draws, so that sampling stays in range too.
- fp16: every weight and op in float16 with casts at the float32 inputs and outputs (the ORT
  converter with ``keep_io_types``). It pays off on GPUs; ORT's CPU provider runs most fp16
  ops by casting back to float32, so on a CPU it is slower, not faster.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx

from aae_runtime.contract.metadata import IMAGE_INPUT, LABEL_INPUT, LATENT_INPUT
from aae_runtime.contract.priors import sample_prior

VARIANTS = ("fp32", "fp16", "int8")
CALIBRATION_BATCH = 64
INT8_METHOD = ("static QDQ (onnxruntime.quantization): int8 per-channel weights, uint8 activations, "
               "MinMax ranges from held-out normal images (decoder: their codes plus prior draws)")
FP16_METHOD = "float16 weights and ops, float32 inputs and outputs (onnxruntime.transformers.float16, keep_io_types)"


def make_variant(variant: str, encoder: onnx.ModelProto, decoder: onnx.ModelProto, normal: np.ndarray,
                 latents: np.ndarray, prior: dict, seed: int = 0,
                 labels: np.ndarray | None = None) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    """The ``variant`` of the float32 graphs, and the metadata block describing it.

    ``normal``: held-out normal images (N, C, H, W) for calibration; ``latents``: their codes
    from the float32 encoder (N, latent); ``prior``: the prior spec, for the decoder's calibration;
    ``labels``: a conditional decoder's label rows for those codes (N, K); the prior draws get
    one-hot rows of random classes.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant == "fp32":
        return encoder, decoder, {"precision": "fp32"}
    if variant == "fp16":
        return to_fp16(encoder), to_fp16(decoder), {"precision": "fp16", "method": FP16_METHOD}
    rng = np.random.default_rng(seed)
    draws = sample_prior(prior, len(latents), rng).astype(np.float32)
    enc = quantize_int8(encoder, {IMAGE_INPUT: normal})
    feeds = {LATENT_INPUT: np.concatenate([latents, draws])}
    if labels is not None:
        k = labels.shape[1]
        feeds[LABEL_INPUT] = np.concatenate([labels, np.eye(k, dtype=np.float32)[rng.integers(0, k, len(draws))]])
    dec = quantize_int8(decoder, feeds)
    info = {"precision": "int8", "method": INT8_METHOD, "calibration_images": int(len(normal)),
            "calibration_prior_draws": int(len(draws))}
    return enc, dec, info


def quantize_int8(proto: onnx.ModelProto, calibration: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Static QDQ int8 quantisation of one graph, calibrated on ``calibration`` (input name -> rows)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = _ArrayReader({name: np.ascontiguousarray(rows, dtype=np.float32) for name, rows in calibration.items()})
    with tempfile.TemporaryDirectory(prefix="aae-quant-") as tmp, _quiet():
        src, pre, dst = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        onnx.save(proto, src)
        quant_pre_process(str(src), str(pre))  # shape inference + ORT's float graph fusions first, as ORT advises
        quantize_static(
            str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            # weights symmetric (the int8 kernels' fast path); activations asymmetric: ReLU and
            # sigmoid outputs are one-sided, so a zero point keeps all 256 levels in use
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
        return onnx.load(str(dst))


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Float16 weights and ops; float32 graph inputs and outputs (casts inserted at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        converted = convert_float_to_float16(proto, keep_io_types=True)
    _sort_topologically(converted.graph)  # the converter appends the input casts after their users
    return converted


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node comes after the nodes producing its inputs (stable)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = list(graph.node)
    pending, ordered = list(range(len(nodes))), []
    while pending:
        ready = [k for k in pending if all(i in available for i in nodes[k].input)]
        if not ready:
            raise ValueError("graph has a cycle or an input no node produces")
        for k in ready:
            available.update(nodes[k].output)
        ordered += [nodes[k] for k in ready]
        pending = [k for k in pending if k not in set(ready)]
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


class _ArrayReader:
    """onnxruntime.quantization CalibrationDataReader over arrays of equal length (one per input), in batches."""

    def __init__(self, data: dict[str, np.ndarray]):
        n = len(next(iter(data.values())))
        self._feeds = iter([{name: rows[i : i + CALIBRATION_BATCH] for name, rows in data.items()}
                            for i in range(0, n, CALIBRATION_BATCH)])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # part of the reader protocol; MinMax reads the data once
        pass


@contextlib.contextmanager
def _quiet():
    """The quantisation tools log and warn freely; our export prints its own one-line summary."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
