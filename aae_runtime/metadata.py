"""The metadata block every exported graph carries, and its validation.

Export writes one JSON document under ``METADATA_KEY`` in each ONNX file's ``metadata_props``;
the runtime reads it back through ``InferenceSession.get_modelmeta().custom_metadata_map``. It
is the single source of the model's input shape, preprocessing, prior, score and threshold.
It is parsed as JSON, never evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from aae_runtime.errors import ModelError
from aae_runtime.priors import validate_prior
from aae_runtime.scoring import validate_score_block

METADATA_KEY = "aae"
SCHEMA_VERSION = 1
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
# Graph input and output names, fixed by export and relied on by the runtime.
IMAGE_INPUT = "image"
LATENT_OUTPUT = "latent"
LATENT_INPUT = "latent"
RECONSTRUCTION_OUTPUT = "reconstruction"
# The optional fused scoring graph: image batch -> code, per-pixel error map and mean error in
# one ONNX Runtime call (export writes it beside the two graphs; the runtime uses it when present).
SCORER_FILE = "scorer.onnx"
PIXEL_ERROR_OUTPUT = "pixel_error"
RECONSTRUCTION_ERROR_OUTPUT = "reconstruction_error"

COLOR_MODES = {"L": 1, "RGB": 3}  # PIL mode -> channels


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes the model's input: one definition, used by training too."""

    color_mode: str  # PIL mode the image is converted to: "L" or "RGB"
    height: int
    width: int
    resample: str  # PIL resampling filter name used when the size differs, e.g. "bilinear"
    scale: float  # input = pixel * scale + offset; pixels are 0..255
    offset: float

    @property
    def channels(self) -> int:
        return COLOR_MODES[self.color_mode]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one model input."""
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        return {
            "color_mode": self.color_mode,
            "size": [self.height, self.width],
            "resample": self.resample,
            "scale": self.scale,
            "offset": self.offset,
            "layout": "NCHW",
            "dtype": "float32",
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        try:
            height, width = (int(v) for v in d["size"])
            pre = cls(str(d["color_mode"]), height, width, str(d["resample"]), float(d["scale"]), float(d["offset"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model metadata has a malformed 'preprocessing' block ({exc!r}): re-export the model") from None
        if pre.color_mode not in COLOR_MODES or pre.height < 1 or pre.width < 1:
            raise ModelError(f"model metadata has unsupported preprocessing {d!r}: re-export the model")
        return pre


@dataclass(frozen=True)
class ModelMetadata:
    """Parsed, validated metadata of an exported model (the same block sits in both graphs)."""

    raw: dict  # the whole JSON document, for `aae-run info` and for fields added later
    schema_version: int
    export_id: str
    preprocessing: Preprocessing
    latent_dim: int
    prior: dict
    score: dict
    threshold: dict

    @property
    def threshold_value(self) -> float:
        return float(self.threshold["value"])

    @classmethod
    def from_json(cls, text: str | None, source: str) -> "ModelMetadata":
        if text is None:
            raise ModelError(f"{source} has no '{METADATA_KEY}' metadata: it was not written by aae-export; re-export it")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"{source} has malformed metadata ({exc.msg} at char {exc.pos}): re-export the model") from None
        if not isinstance(d, dict):
            raise ModelError(f"{source} metadata is not a JSON object: re-export the model")
        return cls.from_dict(d, source)

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "ModelMetadata":
        version = d.get("schema_version")
        if not isinstance(version, int) or version < 1:
            raise ModelError(f"{source} metadata has no valid schema_version: re-export the model")
        if version > SCHEMA_VERSION:
            raise ModelError(
                f"{source} uses metadata schema {version}, newer than this runtime's {SCHEMA_VERSION}: upgrade aae"
            )
        missing = [k for k in ("export_id", "preprocessing", "latent_dim", "prior", "score", "threshold") if k not in d]
        if missing:
            raise ModelError(f"{source} metadata lacks {', '.join(missing)}: re-export the model")
        latent_dim = d["latent_dim"]
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ModelError(f"{source} metadata has an invalid latent_dim {latent_dim!r}: re-export the model")
        validate_prior(d["prior"])
        if d["prior"]["dim"] != latent_dim:
            raise ModelError(f"{source} metadata: prior dim {d['prior']['dim']} != latent_dim {latent_dim}: re-export the model")
        threshold = d["threshold"]
        if not isinstance(threshold, dict) or not isinstance(threshold.get("value"), (int, float)):
            raise ModelError(f"{source} metadata has no numeric threshold value: re-export the model")
        if not isinstance(d["score"], dict) or "name" not in d["score"]:
            raise ModelError(f"{source} metadata has no score definition: re-export the model")
        validate_score_block(d["score"], source)
        return cls(
            raw=d,
            schema_version=version,
            export_id=str(d["export_id"]),
            preprocessing=Preprocessing.from_dict(d["preprocessing"]) if isinstance(d["preprocessing"], dict)
            else Preprocessing.from_dict({}),
            latent_dim=latent_dim,
            prior=d["prior"],
            score=d["score"],
            threshold=threshold,
        )
