"""Calibrating a model's score and threshold on normal images, on the device, without torch.

`calibrate_model` fits the score's statistics (standardisation, code distribution) and the
threshold on normal images (plus, optionally, labelled anomalous ones for an F1-optimal
threshold). Export calls it on the held-out validation images; `aae-run calibrate` calls it on
new normal images (a new line, new lighting) and `recalibrate_dir` rewrites the metadata of
every graph in the model folder. The ONNX files are edited at the protobuf level (their
``metadata_props`` only; graph and weights are copied byte for byte), so neither torch nor the
onnx package is needed.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Callable

import numpy as np

from aae_runtime.calibration import DEFAULT_PERCENTILE, f1_threshold, percentile_threshold
from aae_runtime.contract.errors import InputError, ModelError
from aae_runtime.contract.metadata import DECODER_FILE, ENCODER_FILE, METADATA_KEY, SCORER_FILE, ModelMetadata
from aae_runtime.contract.onnxwire import set_metadata_prop
from aae_runtime.contract.scores import DEGENERATE_SPREAD, HEAD_PARAMS, HEAD_THRESHOLD, PIXEL_DEFINITIONS, PIXEL_ERRORS, SEGMENT, SEGMENTATION, ScoreParts, \
    evaluate_score, fit_score, head_params, score_spec

MIN_NORMAL_IMAGES = 10  # fewer cannot give a meaningful percentile or standardisation
NO_ANOMALIES = "no readable anomalous images in --anomalies: give a folder of images, or leave it out"


def parts_of(model, images: np.ndarray, batch_size: int = 256) -> ScoreParts:
    """`AAEModel.score_parts` over a large array, batch by batch, concatenated."""
    chunks = [model.score_parts(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return ScoreParts(*(np.concatenate([getattr(c, f) for c in chunks])
                        for f in ("latent", "pixel_error", "reconstruction", "intensity")))


def calibrate_model(model, normal: np.ndarray, anomalies: np.ndarray | None = None, score: str | None = None,
                    percentile: float = DEFAULT_PERCENTILE, min_images: int = MIN_NORMAL_IMAGES) -> tuple[dict, dict]:
    """(score block, threshold block) for the metadata, fitted on ``normal`` images (N, C, H, W).

    ``score`` defaults to the model's current score. With ``anomalies`` the threshold is
    F1-optimal, else the ``percentile`` of the normal scores.
    """
    name = score or model.score_name
    if model.tiling is not None and name not in PIXEL_ERRORS:
        raise InputError(f"score {name!r}: a tiled model's score is the maximum of its per-pixel error map; choose one of "
                         f"{', '.join(PIXEL_ERRORS)}")
    pix, _ = score_spec(name)
    if pix == SEGMENT and SEGMENTATION not in model.metadata.requires:
        raise InputError(f"score {name!r} is the segmenter's map of a draem model, which this model has not: choose a score of "
                         "its reconstruction (e.g. mse)")
    fused = (model.metadata.raw.get("graphs") or {}).get("scorer")
    if model.scorer is not None and fused and fused.get("pixel_error") != pix:
        raise InputError(f"score {name!r} needs {pix} pixel errors but this model's fused graph computes "
                         f"{fused.get('pixel_error')}: choose a score built on {fused.get('pixel_error')}, or export again")
    if model.tiling is not None:
        return calibrate_tiled(model, normal, anomalies, name, percentile, min_images)
    if len(normal) < min_images:
        raise InputError(f"found {len(normal)} readable normal images in the given paths; calibration needs at least {min_images}")
    if anomalies is not None and not len(anomalies):
        raise InputError(NO_ANOMALIES)
    probe = model.with_score({"name": name, "pixel_error": pix})  # two-graph path with the wanted pixel error
    parts = parts_of(probe, normal)
    block = fit_score(name, parts, model.metadata.prior)
    normal_scores = evaluate_score(block, parts, model.metadata.prior)
    # Colour scale of the anomaly maps: the 99.9th percentile of normal per-pixel errors, so
    # maps of different images compare, and only errors rare on normal images look hot.
    scale = float(np.percentile(parts.pixel_error, 99.9))
    block["pixel_error_scale"] = scale if scale > 0 else 1.0
    if anomalies is not None:
        anomaly_scores = evaluate_score(block, parts_of(probe, anomalies), model.metadata.prior)
        threshold = f1_threshold(normal_scores, anomaly_scores)
    else:
        threshold = percentile_threshold(normal_scores, percentile)
    return block, threshold


def calibrate_tiled(model, photos, anomalies, name: str, percentile: float, min_images: int) -> tuple[dict, dict]:
    """(score block, threshold block) of a tiled model from whole normal photos (a sequence of
    (C, H, W) arrays, any sizes): each photo's score is the maximum of its map. ``name``: a plain
    per-pixel error (checked by `calibrate_model`)."""
    block = {"name": name, "pixel_error": name, "higher_is_more_anomalous": True,
             "definition": f"{model.tiling.to_dict()['definition']}; per-pixel error {PIXEL_DEFINITIONS[name]}"}
    probe = model.with_score(block)
    if anomalies is not None:  # first: usually the fewer, and a folder of none is found before the normals are scored
        anomaly_scores = np.array([probe.score_photo(p)[0] for p in anomalies])
        if not len(anomaly_scores):
            raise InputError(NO_ANOMALIES)
    normal_scores = np.array([probe.score_photo(p)[0] for p in photos])  # one photo at a time (see PhotoFiles)
    if len(normal_scores) < min_images:
        raise InputError(f"found {len(normal_scores)} readable normal photos in the given paths; calibration needs at least {min_images}")
    block["fitted_on"] = len(normal_scores)
    if anomalies is not None:
        threshold = f1_threshold(normal_scores, anomaly_scores)
    else:
        threshold = percentile_threshold(normal_scores, percentile)
    # Map colours run from 0 to twice the threshold: the threshold sits mid-ramp, where a region begins.
    block["pixel_error_scale"] = 2 * threshold["value"] if threshold["value"] > 0 else 1.0
    return block, threshold


def recalibrate_dir(model_dir: str | Path, normal: np.ndarray, anomalies: np.ndarray | None = None,
                    score: str | None = None, percentile: float = DEFAULT_PERCENTILE, source: str = "", threads: int = 0,
                    waiting: Callable[[str], None] | None = None, switching: Callable[[str], None] | None = None) -> dict:
    """Refit the score and threshold of the model in ``model_dir`` and rewrite its graphs' metadata.

    The export_id is kept (the graphs still belong together). The rewritten graphs become a new
    version of the folder, switched to in one atomic rename: a crash at any point leaves the old
    model or the new one, and concurrent calibrations are serialised. ``threads``: ONNX Runtime's
    intra-op threads (0: one per physical core). ``waiting`` hears once that another writer holds
    the folder, if one does; ``switching`` the new version's name just before the switch
    (`aae_runtime.contract.modelfolder.write_version`). Returns the new metadata.
    """
    from aae_runtime.model import AAEModel  # here, not at import: model.py imports this package's modules
    from aae_runtime.session import SessionConfig

    from aae_runtime.contract.modelfolder import current_version

    model_dir = Path(model_dir)
    loaded = current_version(model_dir)  # the version calibrated: the new metadata is written onto it alone
    model = AAEModel.load(loaded, session_config=SessionConfig(device="cpu", threads=threads), use_scorer=True)
    block, threshold = calibrate_model(model, normal, anomalies, score, percentile)
    stats = threshold.get("stats", {})
    if stats.get("count", 0) >= 3 and stats["max"] - stats["min"] <= DEGENERATE_SPREAD * max(1.0, abs(stats["max"])):
        raise InputError(f"the {stats['count']} normal images all score alike ({stats['max']:.6g}), so no threshold "
                         "can be fitted on them: calibrate on varied normal images, not copies of one")
    if source and threshold["method"] == "f1":
        source += f", with {threshold['anomaly_count']} anomalous ones"
    threshold["source"] = source or threshold["source"]
    threshold["calibrated_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    metadata = dict(model.metadata.raw, score=block, threshold=threshold)
    ModelMetadata.from_dict(metadata, "the new calibration")  # never write what the loader would refuse
    rewrite_metadata(model_dir, metadata, expected=loaded, waiting=waiting, switching=switching)
    return metadata


def load_folder(model, paths: list[str | Path]) -> tuple["np.ndarray | PhotoFiles", list[tuple[str, str]]]:
    """Images of files/folders as one array (N, C, H, W), and (path, reason) of those that failed;
    a tiled model: its whole photos as `PhotoFiles` (decoded as they are met, the failures listed
    then)."""
    from aae_runtime.images import distinct_files, find_images

    files = distinct_files(find_images(list(paths)))
    if model.tiling is not None:
        photos = PhotoFiles(model, files)
        return photos, photos.failed
    decoded = model.load_images(files)
    good = [d for d in decoded if isinstance(d, np.ndarray)]
    failed = [(str(f), str(d)) for f, d in zip(files, decoded) if not isinstance(d, np.ndarray)]
    return (np.stack(good) if good else np.empty((0, *model.input_shape), np.float32)), failed


class PhotoFiles:
    """A tiled model's photos, decoded one at a time as they are iterated: a folder of line photos
    (several MB each once decoded, and any number of them) need not fit in memory. Those that
    cannot be read or tiled are listed in ``failed`` (path, reason) as they are met."""

    def __init__(self, model, files: list[Path]):
        self.model, self.files = model, files
        self.failed: list[tuple[str, str]] = []
        self.on_photo: Callable[[int, int, Path], None] | None = None  # hears (index, count, file) before each

    def __iter__(self):
        self.failed.clear()  # each pass lists its own (the list object stays the one handed out)
        for i, f in enumerate(self.files):
            if self.on_photo is not None:
                self.on_photo(i, len(self.files), f)
            photo = self.model.load_images([f])[0]  # the photo, or why it cannot be read
            try:
                if isinstance(photo, InputError):
                    raise photo
                self.model.tiling.check(photo.shape[1], photo.shape[2])
            except InputError as exc:
                self.failed.append((str(f), str(exc)))
                continue
            yield photo


def rewrite_metadata(model_dir: Path, metadata: dict, expected: Path | None = None,
                     waiting: Callable[[str], None] | None = None,
                     switching: Callable[[str], None] | None = None) -> list[Path]:
    """A new version of the model in ``model_dir`` whose graphs carry ``metadata``: each graph
    of the current version rewritten, read back through ONNX Runtime, and the set switched to
    atomically (aae_runtime.contract.modelfolder). ``expected``: the version the metadata was
    made from; when another writer (an export, a calibration) switched the folder since, nothing
    is written (the new weights must not get the old model's statistics). Returns the new files."""
    from aae_runtime.contract.modelfolder import current_version, write_metadata_json, write_version

    model_dir = Path(model_dir)
    text = json.dumps(metadata, sort_keys=True)
    with write_version(model_dir, str(metadata.get("export_id", "")), waiting=waiting, switching=switching) as staging:
        source = current_version(model_dir)  # read under the lock: no other writer is switching it
        if expected is not None and source.resolve() != Path(expected).resolve() and _export_id(source) != metadata.get("export_id"):
            raise ModelError(f"{model_dir} got a new export while this calibration ran on the one before: nothing was "
                             "written (its statistics belong to the old weights); calibrate again")
        for name in (n for n in (ENCODER_FILE, DECODER_FILE, SCORER_FILE) if (source / n).is_file()):
            data = set_metadata_prop((source / name).read_bytes(), METADATA_KEY, text)
            if name == SCORER_FILE and "score_head" in (metadata.get("graphs", {}).get("scorer") or {}):
                data = _rewrite_score_head(data, metadata)
            _check_loadable(data, name, text)
            (staging / name).write_bytes(data)
        write_metadata_json(staging, metadata)
    version = current_version(model_dir)
    return sorted(version.iterdir())


def _export_id(version: Path) -> str | None:
    """The export id of the graphs in a version folder (another calibration keeps it; an export
    makes a new one)."""
    from aae_runtime.contract.onnxwire import read_graph_file

    try:
        raw = read_graph_file(version / ENCODER_FILE).custom_metadata_map.get(METADATA_KEY)
        return json.loads(raw).get("export_id") if raw else None
    except (OSError, ValueError, AttributeError, ModelError):
        return None


def _rewrite_score_head(data: bytes, metadata: dict) -> bytes:
    """The fused graph's score statistics and threshold, rewritten in place with the metadata's."""
    from aae_runtime.contract.onnxwire import replace_initializers

    params = head_params(metadata["score"])
    if params is None:
        raise InputError(f"score {metadata['score']['name']} has a latent term, which this model's fused graph cannot "
                         "compute (it outputs the score itself): choose a reconstruction score, or export again with it")
    threshold = np.array(metadata["threshold"]["value"], dtype="<f4")
    return replace_initializers(data, {HEAD_PARAMS: params.astype("<f4").tobytes(), HEAD_THRESHOLD: threshold.tobytes()})


def _check_loadable(data: bytes, name: str, text: str) -> None:
    """The rewritten graph must load in ONNX Runtime and carry exactly the new metadata."""
    from aae_runtime.session import SessionConfig, create_session

    session, _ = create_session(data, SessionConfig(device="cpu"))
    if session.get_modelmeta().custom_metadata_map.get(METADATA_KEY) != text:
        raise ModelError(f"rewriting the metadata of {name} failed a read-back check; nothing was changed")
