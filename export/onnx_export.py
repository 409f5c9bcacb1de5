"""Checkpoint -> verified ONNX encoder and decoder, with metadata and a calibrated threshold."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from aae_runtime.calibration import DEFAULT_PERCENTILE
from aae_runtime.contract.errors import AAEError
from aae_runtime.contract.fileio import atomic_write_bytes
from aae_runtime.contract.preprocessing import Preprocessing
from aae_runtime.contract.metadata import (
    DECODER_FILE, ENCODER_FILE, IMAGE_INPUT, LATENT_INPUT, LATENT_OUTPUT, RECONSTRUCTION_OUTPUT, SCORER_FILE,
    ModelMetadata,
)
from aae_runtime.model import AAEModel
from aae_runtime.recalibrate import calibrate_model
from aae_runtime.contract.scores import DEFAULT_SCORE, SCORES, score_spec
from aae_runtime.session import SessionConfig, create_session
from aae_train.checkpoint import file_sha256, load_checkpoint
from aae_train.config import RunConfig
from aae_train.data import load_dataset
from aae_train.models import build_models
from export.fused import FUSED_TOLERANCE, fused_onnx, fused_parity
from export.metadata import attach, build_metadata, provenance
from export.quantize import VARIANTS, make_variant

PARITY_BATCHES = (1, 2, 7, 64)
PARITY_TOLERANCE = 1e-4  # largest absolute difference allowed between ONNX Runtime and PyTorch


class ExportError(AAEError):
    """Export failed a check; no model files were left behind."""


@dataclass
class ExportResult:
    out_dir: Path
    encoder: Path
    decoder: Path
    metadata: dict
    max_abs_diff: dict[str, float]  # per graph, over all parity batches
    scorer: Path | None = None  # the fused scoring graph, when exported


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, data_dir: str | None = None,
                      score: str = DEFAULT_SCORE, percentile: float = DEFAULT_PERCENTILE,
                      log: Callable[[str], None] = print, variant: str = "fp32", fused: bool = True,
                      anomalies: np.ndarray | list | None = None) -> ExportResult:
    """Export ``checkpoint`` to ``out_dir``/{encoder,decoder}.onnx, verify both, calibrate the threshold.

    ``variant`` "int8" or "fp16" (export.quantize) converts the verified float32 graphs; the
    threshold is then calibrated on the variant's own scores.

    ``score`` names one of aae_runtime.contract.scores.SCORES; its statistics and the threshold are
    fitted on the held-out normal images (F1-optimal when ``anomalies``, labelled anomalous
    images (N, C, H, W), are given). ``fused`` also writes scorer.onnx (image -> code, error
    map and mean error in one call), checked against the two-graph path.
    """
    if score not in SCORES:
        raise ExportError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    if variant not in VARIANTS:
        raise ExportError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    state = load_checkpoint(checkpoint)
    cfg = RunConfig.from_dict(state["config"])
    encoder, decoder, _ = build_models(cfg.model)
    encoder.load_state_dict(state["encoder"])
    decoder.load_state_dict(state["decoder"])
    encoder.eval()
    decoder.eval()
    data = load_dataset(cfg.data, data_dir)  # the held-out split, rebuilt from the config
    pre = Preprocessing.from_dict(cfg.data.preprocessing)
    normal = data.val
    log(f"exporting {Path(checkpoint)} (epoch {state['epoch']}); {len(normal)} held-out normal images for checks and threshold")

    example = torch.from_numpy(normal[:2])
    enc_proto = to_onnx(encoder, example, IMAGE_INPUT, LATENT_OUTPUT)
    with torch.no_grad():
        dec_proto = to_onnx(decoder, encoder(example), LATENT_INPUT, RECONSTRUCTION_OUTPUT)

    prov = provenance(file_sha256(Path(checkpoint) if Path(checkpoint).is_file() else Path(checkpoint) / "checkpoint.pt"), state)
    pix = score_spec(score)[0]
    draft = build_metadata(cfg, pre, pix, {"value": 0.0, "method": "pending"}, prov)
    for proto in (enc_proto, dec_proto):
        attach(proto, draft)
        onnx.checker.check_model(proto, full_check=True)
    log("onnx checker (full check): passed")

    model = _runtime_model(enc_proto, dec_proto, draft)
    diffs = check_parity(encoder, decoder, model, normal)
    log("parity with PyTorch, batches " + ", ".join(map(str, PARITY_BATCHES)) + ": largest |difference| "
        + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()) + f" (limit {PARITY_TOLERANCE:.0e})")
    if max(diffs.values()) > PARITY_TOLERANCE:
        raise ExportError(f"ONNX Runtime differs from PyTorch by {max(diffs.values()):.2e} > {PARITY_TOLERANCE:.0e}; no files written")

    model, enc_proto, dec_proto, variant_info = _apply_variant(variant, enc_proto, dec_proto, draft, model, normal,
                                                               cfg.model.prior, log)
    if anomalies is not None and not isinstance(anomalies, np.ndarray):
        anomalies = _load_anomalies(anomalies, pre)
    block, threshold = calibrate_model(model, normal, anomalies, score, percentile, min_images=1)
    threshold["split"] = f"validation split held out from the training images ({len(normal)} images, split_seed {cfg.data.split_seed})"
    how = (f"F1-optimal (F1 {threshold['f1']:.3f}) on {len(normal)} held-out normal and {threshold['anomaly_count']} anomalous images"
           if threshold["method"] == "f1" else f"{percentile:g}th percentile of the scores of {len(normal)} held-out normal images")
    log(f"score {score}; threshold {threshold['value']:.6g} = {how}")
    scorer_proto = None
    if fused and variant == "fp32":
        scorer_proto = _fused_scorer(encoder, decoder, pix, example, draft, model, normal, log)
    elif fused:
        log(f"fused scorer graph: not made for the {variant} variant; the runtime uses the two graphs")
    metadata = build_metadata(cfg, pre, block, threshold, prov, fused_pixel_error=pix if scorer_proto is not None else None)
    metadata["variant"] = variant_info
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    graphs = [(ENCODER_FILE, enc_proto), (DECODER_FILE, dec_proto)] + ([(SCORER_FILE, scorer_proto)] if scorer_proto else [])
    for name, proto in graphs:
        attach(proto, metadata)
        paths[name] = atomic_write_bytes(out_dir / name, proto.SerializeToString())  # < 2 GB: weights inline
    if scorer_proto is None:
        (out_dir / SCORER_FILE).unlink(missing_ok=True)  # a stale one from an earlier export would not match
    return ExportResult(out_dir, paths[ENCODER_FILE], paths[DECODER_FILE], metadata, diffs, paths.get(SCORER_FILE))


def _load_anomalies(paths: list, pre: Preprocessing) -> np.ndarray:
    """Labelled anomalous images (files/folders) as model inputs; any unreadable one stops export."""
    from aae_runtime.images import find_images, load_image

    files = find_images(list(paths))
    if not files:
        raise ExportError("--anomalies: no image files found in the given paths")
    images = []
    for f in files:
        try:
            images.append(load_image(f, pre))
        except AAEError as exc:
            raise ExportError(f"--anomalies: {f}: {exc}") from None
    return np.stack(images)


def _fused_scorer(encoder, decoder, pixel_error: str, example: torch.Tensor, draft: dict, two_graph: AAEModel,
                  normal: np.ndarray, log: Callable[[str], None]) -> onnx.ModelProto:
    """The fused scoring graph, checked and compared with the two-graph path on real images."""
    proto = fused_onnx(encoder, decoder, pixel_error, example)
    attach(proto, draft)
    onnx.checker.check_model(proto, full_check=True)
    scorer, _ = create_session(proto.SerializeToString(), SessionConfig(device="cpu"))
    fused_model = AAEModel(two_graph.encoder, two_graph.decoder, two_graph.metadata, scorer=scorer)
    diffs = fused_parity(fused_model, two_graph, normal)
    log("fused scorer vs two graphs, batches 1, 7, 64: largest difference "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + f" (limit {FUSED_TOLERANCE:.0e})")
    if max(diffs.values()) > FUSED_TOLERANCE:
        raise ExportError(f"the fused scorer differs from the two-graph path by {max(diffs.values()):.2e}; no files written")
    return proto


def _apply_variant(variant: str, enc_proto, dec_proto, draft: dict, fp32: AAEModel, normal: np.ndarray,
                   prior: dict, log: Callable[[str], None]):
    """Convert the verified float32 graphs to ``variant``; check them and report the score drift."""
    if variant == "fp32":
        return fp32, enc_proto, dec_proto, {"precision": "fp32"}
    latents = np.concatenate([fp32.encode(b) for b in _batches(normal, 256)])
    enc_v, dec_v, info = make_variant(variant, enc_proto, dec_proto, normal, latents, prior)
    for proto in (enc_v, dec_v):
        attach(proto, draft)
        onnx.checker.check_model(proto, full_check=True)
    model = _runtime_model(enc_v, dec_v, draft)
    ref = np.concatenate([fp32.score(b) for b in _batches(normal, 256)])
    got = np.concatenate([model.score(b) for b in _batches(normal, 256)])
    if not np.all(np.isfinite(got)):
        raise ExportError(f"the {variant} graphs give non-finite scores on held-out normal images; no files written")
    rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-12)
    info["score_drift_vs_fp32"] = {"images": int(len(ref)), "median_relative": float(np.median(rel)),
                                   "max_relative": float(rel.max()), "rank_correlation": _rank_correlation(ref, got)}
    log(f"{variant}: scores of {len(ref)} held-out normal images differ from float32 by {np.median(rel):.2%} "
        f"(median), {rel.max():.2%} (max); rank correlation {info['score_drift_vs_fp32']['rank_correlation']:.4f}")
    return model, enc_v, dec_v, info


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (no ties expected in continuous scores)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 1 else 1.0


def to_onnx(module: torch.nn.Module, example: torch.Tensor, input_name: str, output_name: str) -> onnx.ModelProto:
    """Export ``module`` with a dynamic batch axis, weights inside the proto (no external .data)."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    quiet = io.StringIO()
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)  # the exporter logs about optional torchvision ops
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (example,), dynamo=True, input_names=[input_name], output_names=[output_name],
                dynamic_shapes=({0: batch},), verbose=False, optimize=True,
            )
    finally:
        torch_logger.setLevel(level)
    proto = program.model_proto
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


def check_parity(encoder, decoder, model: AAEModel, images: np.ndarray) -> dict[str, float]:
    """Largest absolute difference between ORT and PyTorch, per graph, over batches of real images."""
    worst = {"encoder": 0.0, "decoder": 0.0}
    start = 0
    with torch.no_grad():
        for size in PARITY_BATCHES:
            x = images[start : start + size]
            if len(x) < size:  # tiny validation sets: wrap around
                x = np.resize(images, (size, *images.shape[1:]))
            start = (start + size) % len(images)
            z_ref = encoder(torch.from_numpy(x)).numpy()
            z = model.encode(x)
            worst["encoder"] = max(worst["encoder"], float(np.abs(z - z_ref).max()))
            r_ref = decoder(torch.from_numpy(z_ref)).numpy()
            worst["decoder"] = max(worst["decoder"], float(np.abs(model.decode(z_ref) - r_ref).max()))
    return worst


def _runtime_model(enc_proto: onnx.ModelProto, dec_proto: onnx.ModelProto, metadata: dict) -> AAEModel:
    cpu = SessionConfig(device="cpu")
    enc, _ = create_session(enc_proto.SerializeToString(), cpu)
    dec, _ = create_session(dec_proto.SerializeToString(), cpu)
    return AAEModel(enc, dec, ModelMetadata.from_dict(metadata, "export"))


def _batches(x: np.ndarray, size: int):
    for i in range(0, len(x), size):
        yield x[i : i + size]
