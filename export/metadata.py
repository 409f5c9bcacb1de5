"""Build the metadata block that export writes into both graphs (schema in aae_runtime.contract.metadata)."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import onnx
import torch

from aae_runtime import __version__
from aae_runtime.contract.preprocessing import Preprocessing
from aae_runtime.contract.metadata import (
    DECODER_FILE, ENCODER_FILE, IMAGE_INPUT, LATENT_INPUT, LATENT_OUTPUT, METADATA_KEY, PIXEL_ERROR_OUTPUT,
    RECONSTRUCTION_ERROR_OUTPUT, RECONSTRUCTION_OUTPUT, SCHEMA_VERSION, SCORER_FILE,
)
from aae_runtime.contract.scores import SCORE_DEFINITIONS
from aae_train.config import RunConfig


def build_metadata(cfg: RunConfig, pre: Preprocessing, score: str | dict, threshold: dict, provenance: dict,
                   fused_pixel_error: str | None = None) -> dict:
    """The JSON-able metadata document (see aae_runtime.contract.metadata for how it is read).

    ``score``: a fitted score block (aae_runtime.contract.scores.fit_score), or a plain reconstruction
    score's name; ``fused_pixel_error``: set when the folder also gets the fused scorer graph.
    """
    if isinstance(score, str):
        score = {"name": score, "pixel_error": score, "definition": SCORE_DEFINITIONS[score], "higher_is_more_anomalous": True}
    graphs = {
        "encoder": {"file": ENCODER_FILE, "input": IMAGE_INPUT, "output": LATENT_OUTPUT},
        "decoder": {"file": DECODER_FILE, "input": LATENT_INPUT, "output": RECONSTRUCTION_OUTPUT},
    }
    if fused_pixel_error:
        graphs["scorer"] = {"file": SCORER_FILE, "input": IMAGE_INPUT, "pixel_error": fused_pixel_error,
                            "outputs": [LATENT_OUTPUT, PIXEL_ERROR_OUTPUT, RECONSTRUCTION_ERROR_OUTPUT]}
    return {
        "schema_version": SCHEMA_VERSION,
        "export_id": provenance["export_id"],
        "input": {
            "name": IMAGE_INPUT,
            "shape": ["batch", *pre.shape],
            "channels": pre.channels,
            "value_range": [pre.offset, pre.offset + 255 * pre.scale],
        },
        "preprocessing": pre.to_dict(),
        "latent_dim": cfg.model.latent_dim,
        "prior": cfg.model.prior,
        "posterior": {"name": cfg.model.posterior, "exported_as": _deterministic_path(cfg.model.posterior)},
        "score": score,
        "threshold": threshold,
        "graphs": graphs,
        "provenance": provenance,
    }


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
    return {k: last[k] for k in ("epoch", "recon_loss", "val_recon_loss", "disc_loss", "disc_acc", "gen_loss") if k in last}
