"""Build the metadata block that export writes into both graphs (schema in aae_runtime.contract.metadata)."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import onnx
import torch

from aae_runtime import __version__
from aae_runtime.contract.preprocessing import EXIF_ORIENTATION, Preprocessing
from aae_runtime.contract.metadata import GRAPH_FILES, IMAGE_INPUT, METADATA_KEY, SCHEMA_VERSION, SCHEMA_WITHOUT_REQUIREMENTS
from aae_runtime.contract.tiling import TILING, Tiling
from aae_runtime.contract.scores import SCORE_DEFINITIONS, SEGMENT, SEGMENTATION
from aae_train.config import RunConfig


def build_metadata(cfg: RunConfig, family, pre: Preprocessing, prior: dict, score: str | dict, threshold: dict,
                   provenance: dict, graphs, tiling: Tiling | None = None) -> dict:
    """The JSON-able metadata document (see aae_runtime.contract.metadata for how it is read).

    ``family``: the Family class; ``prior``: what the model samples from; ``score``: a fitted
    score block (aae_runtime.contract.scores.fit_score), or a plain reconstruction score's name;
    ``graphs``: the family's GraphSpecs, listed with their inputs and outputs; ``tiling``: how
    whole photos are scored, for a model trained on crops (then required of every reader).
    """
    if isinstance(score, str):
        score = {"name": score, "pixel_error": score, "definition": SCORE_DEFINITIONS[score], "higher_is_more_anomalous": True}
    listed = {}
    for g in graphs:
        listed[g.name] = {"file": GRAPH_FILES[g.name], "inputs": list(g.inputs), "outputs": list(g.outputs)}
        if g.name == "scorer":
            listed[g.name]["pixel_error"] = score.get("pixel_error", score["name"])
    requires = [TILING] if tiling is not None else []
    if score.get("pixel_error", score["name"]) == SEGMENT:  # maps that only the scorer graph computes
        requires.append(SEGMENTATION)
    if pre.orientation == "exif":  # photos turned upright by their EXIF tag, as training read them
        requires.append(EXIF_ORIENTATION)
    block = {
        "schema_version": SCHEMA_VERSION if requires else SCHEMA_WITHOUT_REQUIREMENTS,
        "export_id": provenance["export_id"],
        "family": cfg.family,
        "input": {
            "name": IMAGE_INPUT,
            "shape": ["batch", *pre.shape],
            "channels": pre.channels,
            "value_range": list(pre.pixel_range),
        },
        "preprocessing": pre.to_dict(),
        "latent_dim": cfg.model.latent_dim,
        "prior": prior,
        "posterior": {"name": cfg.model.posterior, "exported_as": _deterministic_path(cfg.model.posterior)},
        "score": score,
        "threshold": threshold,
        "graphs": listed,
        "provenance": provenance,
        **family.metadata(cfg),
    }
    if requires:
        block["requires"] = requires
    if tiling is not None:
        block["tiling"] = tiling.to_dict()
    return block


def provenance(checkpoint_sha256: str, state: dict) -> dict:
    return {
        "export_id": uuid.uuid4().hex,
        "checkpoint_sha256": checkpoint_sha256,
        "checkpoint_epoch": int(state.get("epoch", 0)),
        "package_version": __version__,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "training_config": state["config"],
        "final_metrics": _last_metrics(state),
    }


def attach(proto: onnx.ModelProto, metadata: dict) -> None:
    """Set (or replace) the metadata entry of ``proto``."""
    for prop in list(proto.metadata_props):
        if prop.key == METADATA_KEY:
            proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(metadata, sort_keys=True)
    proto.producer_name = "aae-export"
    proto.producer_version = __version__


def _deterministic_path(posterior: str) -> str:
    return {"deterministic": "the encoder as trained", "gaussian": "the posterior mean",
            "universal": "the encoder with its noise input set to zero"}[posterior]


def _last_metrics(state: dict) -> dict:
    history = state.get("history") or []
    if not history:
        return {}
    last = history[-1]
    return {k: last[k] for k in ("epoch", "recon_loss", "val_recon_loss", "disc_loss", "disc_acc", "gen_loss", "class_loss",
                                 "val_error") if k in last}
