"""Checkpoint -> verified ONNX graphs (the ones its family lists), with metadata and a calibrated threshold.

Export is a loop over the family's graphs: each is converted, checked by the ONNX checker and
compared with PyTorch on real held-out images (batches 1, 2, 7, 64; one tolerance, keyed by
output name), so a family with new outputs needs no exporter change.
"""

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
from aae_runtime.contract.modelfolder import current_version, enclosing_model, holds_model, write_metadata_json, write_version
from aae_runtime.contract.scores import ANOMALY_OUTPUT, HEAD_PARAMS, HEAD_THRESHOLD, SCORE_OUTPUT, head_params
from export.score_head import add_score_head
from aae_runtime.contract.preprocessing import Preprocessing
from aae_runtime.contract.metadata import BEST_LABEL_OUTPUT, GRAPH_FILES, IMAGE_INPUT, ModelMetadata
from aae_runtime.contract.tiling import DEFAULT_SMOOTH_SIGMA, MAX_SIGMA, Tiling
from aae_runtime.model import AAEModel
from aae_runtime.recalibrate import calibrate_model, load_folder
from aae_runtime.contract.scores import DEFAULT_SCORE, SCORES, SEGMENT, score_spec
from aae_runtime.session import SessionConfig, create_session
from aae_train.checkpoint import BEST_NAME, CHECKPOINT_NAME, file_sha256, load_trained
from aae_train.data import load_dataset
from export.fused import FUSED_TOLERANCE, fused_parity
from export.metadata import attach, build_metadata, provenance
from export.quantize import VARIANTS, make_variant

PARITY_BATCHES = (1, 2, 7, 64)
TILED_DEFAULT_SCORE = "mse"  # a tiled model's default per-pixel error: ssim measured worse (benchmarks/results/textures.md)
PARITY_TOLERANCE = 1e-4  # largest absolute difference allowed between ONNX Runtime and PyTorch
DISCRETE_OUTPUTS = (BEST_LABEL_OUTPUT,)  # compared through the continuous outputs they select (see check_parity)
RUN_MARKERS = (CHECKPOINT_NAME, BEST_NAME)  # a folder holding one is a training run: no model goes into it
FEW_HELD_OUT = 20  # fewer held-out images than this: the percentile threshold is about their largest score (a note says so)


class ExportError(AAEError):
    """Export failed a check; no model files were left behind."""


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path]  # graph name (encoder, decoder, scorer) -> file written
    metadata: dict
    max_abs_diff: dict[str, float]  # "graph.output" -> largest |ONNX Runtime - PyTorch| over the parity batches

    @property
    def encoder(self) -> Path:
        return self.files["encoder"]

    @property
    def decoder(self) -> Path:
        return self.files["decoder"]

    @property
    def scorer(self) -> Path | None:
        return self.files.get("scorer")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, data_dir: str | None = None,
                      score: str | None = None, percentile: float = DEFAULT_PERCENTILE,
                      log: Callable[[str], None] = print, variant: str = "fp32", fused: bool = True,
                      anomalies: np.ndarray | list | None = None, map_sigma: float = DEFAULT_SMOOTH_SIGMA,
                      tile_stride: int | None = None, overwrite: bool = False) -> ExportResult:
    """Export ``checkpoint`` to ``out_dir``: one ONNX file per graph its family lists (encoder,
    decoder and, with ``fused``, the scorer), each verified, and the threshold calibrated.

    ``variant`` "int8" or "fp16" (export.quantize) converts the verified float32 encoder and
    decoder; the threshold is then calibrated on the variant's own scores (and no fused scorer
    is written). ``score`` names one of aae_runtime.contract.scores.SCORES (None: DEFAULT_SCORE,
    or TILED_DEFAULT_SCORE for a tiled model); its statistics and the
    threshold are fitted on the held-out normal images (F1-optimal when ``anomalies``, labelled
    anomalous images (N, C, H, W) or paths, are given).

    A model trained on crops (``--crop``) is exported tiled (aae_runtime.contract.tiling): tiles
    ``tile_stride`` apart (default half a tile), maps smoothed by ``map_sigma`` pixels, and the
    threshold set on the held-out photos (or windows of the held-out band), scored whole.

    An ``out_dir`` that holds a model already is refused unless ``overwrite``; its parent folder
    must exist (a mistyped path is not created).
    """
    check_model_folder(Path(out_dir), overwrite)
    if score is not None and score not in SCORES:
        raise ExportError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    if variant not in VARIANTS:
        raise ExportError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    trained = load_trained(checkpoint)
    cfg, state = trained.cfg, trained.state
    data = load_dataset(cfg.data, data_dir, splits=("val",))  # the held-out split, rebuilt from the config; only it is decoded
    pre = Preprocessing.from_dict(cfg.data.preprocessing)
    normal = data.val
    log(f"exporting {Path(checkpoint)} ({cfg.family}, epoch {state['epoch']}); {len(normal)} held-out normal "
        + ("crops for the checks" if cfg.data.crop else "images for checks and threshold"))
    tiling = _tiling(cfg, map_sigma, tile_stride)
    score = score or trained.family.default_score or (TILED_DEFAULT_SCORE if tiling is not None else DEFAULT_SCORE)
    pix = score_spec(score)[0]
    scorer_maps = pix == SEGMENT  # maps only the scorer graph computes: it is the model's scoring path
    if scorer_maps and trained.family.default_score != SEGMENT:
        raise ExportError(f"score {score!r} is the segmenter's map of a --family draem model; this is a {cfg.family} model: "
                          "choose a score of its reconstruction (e.g. mse)")
    if scorer_maps and (variant != "fp32" or not fused):
        raise ExportError(f"score {score!r}: its maps come from the fused scorer graph, so it is exported in float32 "
                          "with that graph: leave out --quantize/--precision and --no-fused")
    specs = {g.name: g for g in trained.family.graphs(cfg, trained.nets, pix if fused and variant == "fp32" else None)}
    example = torch.from_numpy(normal[:2])
    with torch.no_grad():
        protos = {name: to_onnx(g.module, g.examples(example), g.inputs, g.outputs) for name, g in specs.items()}
    prior = _prior(cfg, trained, normal)
    ckpt_file = Path(checkpoint) if Path(checkpoint).is_file() else Path(checkpoint) / CHECKPOINT_NAME
    prov = provenance(file_sha256(ckpt_file), state)
    draft = build_metadata(cfg, trained.family, pre, prior, pix, {"value": 0.0, "method": "pending"}, prov, specs.values(),
                           tiling)
    for proto in protos.values():
        attach(proto, draft)
        onnx.checker.check_model(proto, full_check=True)
    log("onnx checker (full check): passed")

    diffs = check_parity(specs, protos, normal)
    log("parity with PyTorch, batches " + ", ".join(map(str, PARITY_BATCHES)) + ": largest |difference| "
        + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()) + f" (limit {PARITY_TOLERANCE:.0e})")
    if max(diffs.values()) > PARITY_TOLERANCE:
        worst = max(diffs, key=diffs.get)
        raise ExportError(f"ONNX Runtime differs from PyTorch by {diffs[worst]:.2e} > {PARITY_TOLERANCE:.0e} ({worst}); "
                          "no files written")

    model = _runtime_model(protos["encoder"], protos["decoder"], draft, protos["scorer"] if scorer_maps else None)
    model, protos["encoder"], protos["decoder"], variant_info = _apply_variant(
        variant, protos["encoder"], protos["decoder"], draft, model, normal, prior, log)
    if anomalies is not None and not isinstance(anomalies, np.ndarray):
        anomalies = _load_anomalies(anomalies, model)
    held = data.windows if tiling is not None else normal  # a tiled model's threshold is about whole photos (one at a time)
    band = tiling is not None and data.windows.from_band  # a single photo's held-out band, cut into windows
    what = ("held-out windows" if band else "held-out photos") if tiling is not None else "held-out normal images"
    block, threshold = calibrate_model(model, held, anomalies, score, percentile, min_images=1)
    threshold["split"] = (f"{data.held_out} (split_seed {cfg.data.split_seed})" if tiling is not None else
                          f"validation split held out from the training images ({len(normal)} images, split_seed {cfg.data.split_seed})")
    how = (f"F1-optimal (F1 {threshold['f1']:.3f}) on {len(held)} {what} and {threshold['anomaly_count']} anomalous images"
           if threshold["method"] == "f1" else f"{percentile:g}th percentile of the scores of {len(held)} {what}")
    log(f"score {score}; threshold {threshold['value']:.6g} = {how}")
    if threshold["method"] == "percentile" and len(held) < FEW_HELD_OUT:
        log(f"note: only {len(held)} {what} set this threshold, so one of them sits at or near it and a normal image "
            "a little above them is flagged; run aae-run calibrate on 10 or more normal images from the line")
    if band:
        side = data.windows.photos[0].shape[1:]
        threshold["windows"] = [int(side[0]), int(side[1])]
        log(f"note: a photo's score is the maximum of its map, so it grows with the photo's area; this threshold holds "
            f"for photos of about {side[1]} x {side[0]} pixels. For photos of another size, run aae-run calibrate on 10 "
            "or more whole normal photos from the line")
    if scorer_maps:
        log("fused scorer: it computes the maps itself (parity with PyTorch above)")
    elif "scorer" in protos:
        _check_fused(protos["scorer"], model, normal, log)
    elif fused:
        log(f"fused scorer graph: not made for the {variant} variant; the runtime uses the two graphs")
    metadata = build_metadata(cfg, trained.family, pre, prior, block, threshold, prov, specs.values(), tiling)
    metadata["variant"] = variant_info
    if "scorer" in protos and tiling is None:
        _add_score_head(protos["scorer"], model, metadata, normal, log)
    out_dir = Path(out_dir)
    with write_version(out_dir, metadata["export_id"], new_only=not overwrite, waiting=log) as staging:  # the whole set at once (contract/modelfolder.py)
        for name, proto in protos.items():
            attach(proto, metadata)
            (staging / GRAPH_FILES[name]).write_bytes(proto.SerializeToString())  # < 2 GB: weights inline
        write_metadata_json(staging, metadata)
    version = current_version(out_dir)
    return ExportResult(out_dir, {name: version / GRAPH_FILES[name] for name in protos}, metadata, diffs)


def check_model_folder(out_dir: Path, overwrite: bool) -> None:
    """``out_dir`` may receive a model: it holds none (or ``overwrite``), and its parent exists."""
    outer = enclosing_model(out_dir)
    if outer is not None:
        raise ExportError(f"--out {out_dir} lies inside the versions of the model folder {outer}: give {outer} itself "
                          "(with --overwrite), or another folder")
    if any((out_dir / name).exists() for name in RUN_MARKERS):
        raise ExportError(f"{out_dir} holds a training run ({', '.join(n for n in RUN_MARKERS if (out_dir / n).exists())}): "
                          "write the model into a folder of its own, e.g. --out " + str(out_dir / "model"))
    if holds_model(out_dir) and not overwrite:
        raise ExportError(f"{out_dir} already holds a model: choose another --out, or give --overwrite to replace it "
                          "(readers keep the model they loaded; the switch is atomic)")
    if not out_dir.exists() and not out_dir.parent.is_dir():
        raise ExportError(f"folder {out_dir.parent} does not exist: create it first, or choose another --out")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} is a file, not a folder: choose a folder name")


def _tiling(cfg, map_sigma: float, tile_stride: int | None) -> Tiling | None:
    """How a model trained on crops scores whole photos; None for a model of whole images."""
    if cfg.data.crop is None:
        if tile_stride is not None or map_sigma != DEFAULT_SMOOTH_SIGMA:
            raise ExportError("--tile-stride and --map-sigma apply to models trained with --crop (tiled); this one "
                              "scores whole images resized to its input")
        return None
    crop = cfg.data.crop
    stride = tile_stride or max(1, crop // 2)
    if not 1 <= stride <= crop:
        raise ExportError(f"--tile-stride {stride}: must be between 1 and the tile size {crop} (tiles must cover the photo)")
    if not 0 <= map_sigma <= MAX_SIGMA:
        raise ExportError(f"--map-sigma {map_sigma}: must be between 0 (no smoothing) and {MAX_SIGMA:g} pixels")
    return Tiling((crop, crop), (stride, stride), float(map_sigma))


def _prior(cfg, trained, normal: np.ndarray) -> dict:
    """The prior the model samples from, as its family defines it (the plain autoencoder: a
    Gaussian fitted to the held-out codes)."""
    with torch.no_grad():
        codes = torch.cat([trained.nets["encoder"](torch.from_numpy(b)) for b in _batches(normal, 1000)]).numpy()
    return trained.family.prior_spec(cfg, codes)


def _load_anomalies(paths: list, model: AAEModel) -> np.ndarray | list[np.ndarray]:
    """Labelled anomalous images (files/folders) as the model reads them (a tiled model: whole
    photos at their own size, a list); any unreadable or untileable one stops export."""
    images, failed = load_folder(model, list(paths))
    images = images if isinstance(images, np.ndarray) else list(images)  # a tiled model's photos are decoded as they are met
    if failed:
        raise ExportError(f"--anomalies: {failed[0][0]}: {failed[0][1]}")
    if not len(images):
        raise ExportError("--anomalies: no image files found in the given paths")
    return images


def _add_score_head(proto: onnx.ModelProto, model: AAEModel, metadata: dict, normal: np.ndarray, log) -> None:
    """The score and the verdict inside the fused graph (export/score_head.py), checked against the
    runtime's own score on held-out images; scores with a latent term keep the graph as it is."""
    params = head_params(metadata["score"])
    if params is None:
        log(f"score {metadata['score']['name']} has a latent term: the fused graph gives the reconstruction error, "
            "clients without Python compute the score from the metadata")
        return
    value_range = tuple(metadata["input"]["value_range"])
    add_score_head(proto, params, metadata["threshold"]["value"], value_range)
    metadata["graphs"]["scorer"]["score_head"] = {"outputs": [SCORE_OUTPUT, ANOMALY_OUTPUT], "params": HEAD_PARAMS,
                                                  "threshold_input": HEAD_THRESHOLD}
    session, _ = create_session(proto.SerializeToString(), SessionConfig(device="cpu"))
    x = normal[:256]
    graph_score, graph_flag = session.run([SCORE_OUTPUT, ANOMALY_OUTPUT], {IMAGE_INPUT: x})
    scored = model.with_score(metadata["score"])
    ref = scored.score(x)
    diff = float(np.abs(graph_score.astype(np.float64) - ref).max())
    flags_differ = int((graph_flag != (ref > metadata["threshold"]["value"])).sum())
    log(f"score in the fused graph vs the runtime's, {len(x)} images: largest difference {diff:.1e}, "
        f"{flags_differ} verdicts differ (limit {FUSED_TOLERANCE:.0e})")
    if diff > FUSED_TOLERANCE * max(1.0, float(np.abs(ref).max())):
        raise ExportError(f"the fused graph's score differs from the runtime's by {diff:.2e}; no files written")


def _check_fused(proto: onnx.ModelProto, two_graph: AAEModel, normal: np.ndarray, log: Callable[[str], None]) -> None:
    """The fused scorer against the runtime's two-graph path (its numpy errors) on real images."""
    scorer, _ = create_session(proto.SerializeToString(), SessionConfig(device="cpu"))
    fused_model = AAEModel(two_graph.encoder, two_graph.decoder, two_graph.metadata, scorer=scorer)
    diffs = fused_parity(fused_model, two_graph, normal)
    log("fused scorer vs two graphs, batches 1, 7, 64: largest difference "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + f" (limit {FUSED_TOLERANCE:.0e})")
    if max(diffs.values()) > FUSED_TOLERANCE:
        raise ExportError(f"the fused scorer differs from the two-graph path by {max(diffs.values()):.2e}; no files written")


def _apply_variant(variant: str, enc_proto, dec_proto, draft: dict, fp32: AAEModel, normal: np.ndarray,
                   prior: dict, log: Callable[[str], None]):
    """Convert the verified float32 graphs to ``variant``; check them and report the score drift."""
    if variant == "fp32":
        return fp32, enc_proto, dec_proto, {"precision": "fp32"}
    latents = np.concatenate([fp32.encode(b) for b in _batches(normal, 256)])
    labels = np.concatenate([fp32.decoder_labels(b) for b in _batches(normal, 256)]) if fp32.metadata.conditional else None
    enc_v, dec_v, info = make_variant(variant, enc_proto, dec_proto, normal, latents, prior, labels=labels)
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


def to_onnx(module: torch.nn.Module, examples: tuple[torch.Tensor, ...], input_names, output_names) -> onnx.ModelProto:
    """Export ``module`` with a dynamic batch axis on every input and output, weights inside the proto."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    quiet = io.StringIO()
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)  # the exporter logs about optional torchvision ops
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(), tuple(examples), dynamo=True, input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=tuple({0: batch} for _ in examples), verbose=False, optimize=True,
            )
    finally:
        torch_logger.setLevel(level)
    proto = program.model_proto
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


def check_parity(specs: dict, protos: dict[str, onnx.ModelProto], images: np.ndarray) -> dict[str, float]:
    """Largest absolute difference between ONNX Runtime and PyTorch, keyed "graph.output", over
    batches of 1, 2, 7 and 64 real images (each graph fed what the family says it takes)."""
    worst: dict[str, float] = {}
    cpu = SessionConfig(device="cpu")
    for name, spec in specs.items():
        session, _ = create_session(protos[name].SerializeToString(), cpu)
        start = 0
        for size in PARITY_BATCHES:
            x = images[start : start + size]
            if len(x) < size:  # tiny validation sets: wrap around
                x = np.resize(images, (size, *images.shape[1:]))
            start = (start + size) % len(images)
            with torch.no_grad():
                inputs = spec.examples(torch.from_numpy(x))
                expected = spec.module(*inputs)
            expected = expected if isinstance(expected, tuple) else (expected,)
            got = session.run(list(spec.outputs), {n: t.numpy() for n, t in zip(spec.inputs, inputs)})
            for out, ref, value in zip(spec.outputs, expected, got):
                if out in DISCRETE_OUTPUTS:  # an argmin: near-ties may go either way; the error it picks is compared
                    continue
                diff = float(np.abs(value.astype(np.float64) - ref.numpy().astype(np.float64)).max())
                worst[f"{name}.{out}"] = max(worst.get(f"{name}.{out}", 0.0), diff)
    return worst


def _runtime_model(enc_proto: onnx.ModelProto, dec_proto: onnx.ModelProto, metadata: dict,
                   scorer_proto: onnx.ModelProto | None = None) -> AAEModel:
    """The runtime's model of the graphs (the scorer too, when its maps are the model's)."""
    cpu = SessionConfig(device="cpu")
    enc, _ = create_session(enc_proto.SerializeToString(), cpu)
    dec, _ = create_session(dec_proto.SerializeToString(), cpu)
    scorer = create_session(scorer_proto.SerializeToString(), cpu)[0] if scorer_proto is not None else None
    return AAEModel(enc, dec, ModelMetadata.from_dict(metadata, "export"), scorer=scorer)


def _batches(x: np.ndarray, size: int):
    for i in range(0, len(x), size):
        yield x[i : i + size]
