"""The metadata block every exported graph carries, and its validation.

Export writes one JSON document under ``METADATA_KEY`` in each ONNX file's ``metadata_props``;
the runtime reads it back through ``InferenceSession.get_modelmeta().custom_metadata_map``. It
is the single source of the model's input shape, preprocessing, prior, score and threshold.
It is parsed as JSON, never evaluated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from aae_runtime.contract.errors import ModelError
from aae_runtime.contract.preprocessing import EXIF_ORIENTATION, Preprocessing
from aae_runtime.contract.priors import validate_prior
from aae_runtime.contract.scores import PIXEL_ERRORS, SEGMENT, SEGMENTATION, validate_score_block
from aae_runtime.contract.tiling import TILING, Tiling

METADATA_KEY = "aae"
# 2: model families: "graphs" lists each graph's inputs and outputs, "family" and "classes";
# priors may be "fitted_gaussian". Schema 1 (one encoder and decoder, no classes) still loads.
# 3: "requires", the features a reader must understand to use the model at all (a runtime that
# meets an unknown one refuses the model instead of misusing it), and "tiling" (whole photos
# scored tile by tile: aae_runtime.contract.tiling). Export writes 3 only for a model that
# requires something, so models without tiling still load in schema-2 runtimes.
SCHEMA_VERSION = 3
SCHEMA_WITHOUT_REQUIREMENTS = 2  # what export writes for a model that requires nothing
# 3 also: "segmentation", maps that only the scorer graph computes (the draem family's segmenter).
KNOWN_FEATURES = (TILING, SEGMENTATION, EXIF_ORIENTATION)
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
# What the graphs of the other families add. The runtime reads what a model can do from the
# inputs and outputs its graphs list, never from the family's name: a decoder with a LABEL_INPUT
# is conditional (sampling takes a label; scoring tries each label, or uses the class head); an
# encoder with a CLASS_OUTPUT classifies; a scorer with BEST_LABEL_OUTPUT says which label fitted.
LABEL_INPUT = "label"  # (N, K) float32: one-hot label or class probabilities, K = len(classes)
CLASS_OUTPUT = "class_probs"  # (N, K) float32 softmax
BEST_LABEL_OUTPUT = "best_label"  # (N,) int64: index into classes
GRAPH_FILES = {"encoder": ENCODER_FILE, "decoder": DECODER_FILE, "scorer": SCORER_FILE}
# What each graph may take and give: (inputs it must take, inputs it may take), outputs it may give.
GRAPH_INPUTS = {"encoder": ({IMAGE_INPUT}, set()), "decoder": ({LATENT_INPUT}, {LABEL_INPUT}),
                "scorer": ({IMAGE_INPUT}, set())}
GRAPH_OUTPUTS = {"encoder": {LATENT_OUTPUT, CLASS_OUTPUT}, "decoder": {RECONSTRUCTION_OUTPUT},
                 "scorer": {LATENT_OUTPUT, PIXEL_ERROR_OUTPUT, RECONSTRUCTION_ERROR_OUTPUT, CLASS_OUTPUT, BEST_LABEL_OUTPUT}}
MAX_CLASSES = 10_000
# The graphs of a schema-1 model, which named one input and output each.
SCHEMA_1_GRAPHS = {
    "encoder": {"file": ENCODER_FILE, "inputs": [IMAGE_INPUT], "outputs": [LATENT_OUTPUT]},
    "decoder": {"file": DECODER_FILE, "inputs": [LATENT_INPUT], "outputs": [RECONSTRUCTION_OUTPUT]},
}

# Bounds on what a model's metadata may be: aae-export writes some 8 kB (a quantile table
# included) nested 4 levels deep; these are far above that and far below what hurts.
MAX_METADATA_CHARS = 1_000_000
MAX_METADATA_DEPTH = 16


def _check_plain(doc, source: str) -> None:
    """Metadata nested at most MAX_METADATA_DEPTH levels, every string valid UTF-8 (a lone
    surrogate from a JSON escape would fail later, when printed or written)."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_METADATA_DEPTH:
            raise ModelError(f"{source} has metadata nested more than {MAX_METADATA_DEPTH} levels deep: re-export the model")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
            stack.extend((k, depth) for k in value)
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ModelError(f"{source} has metadata with an invalid character (a lone surrogate): re-export the model") from None


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
    graphs: dict  # name -> {"file", "inputs": [...], "outputs": [...]} (schema 1: normalised to this)
    classes: tuple[str, ...] | None = None  # class values, in label order (conditional or classifying models)
    family: str = "aae"  # what trained it; informational only (the runtime reads the graphs)
    requires: tuple[str, ...] = ()  # features the reader must understand (KNOWN_FEATURES)
    tiling: Tiling | None = None  # whole photos are tiled, not resized (a model trained on crops)

    @property
    def conditional(self) -> bool:
        """The decoder takes a label beside the code."""
        return LABEL_INPUT in self.graphs["decoder"]["inputs"]

    @property
    def classifies(self) -> bool:
        """The encoder has a class head."""
        return CLASS_OUTPUT in self.graphs["encoder"]["outputs"]

    @property
    def threshold_value(self) -> float:
        return float(self.threshold["value"])

    @classmethod
    def from_json(cls, text: str | None, source: str) -> "ModelMetadata":
        if text is None:
            raise ModelError(f"{source} has no '{METADATA_KEY}' metadata: it was not written by aae-export; re-export it")
        if len(text) > MAX_METADATA_CHARS:
            raise ModelError(f"{source} has {len(text) / 1e6:.1f} MB of metadata, far more than aae-export writes "
                             f"(at most {MAX_METADATA_CHARS // 1000} kB): re-export the model")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"{source} has malformed metadata ({exc.msg} at char {exc.pos}): re-export the model") from None
        except RecursionError:
            raise ModelError(f"{source} has metadata nested too deep to read: re-export the model") from None
        if not isinstance(d, dict):
            raise ModelError(f"{source} metadata is not a JSON object: re-export the model")
        _check_plain(d, source)
        return cls.from_dict(d, source)

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "ModelMetadata":
        """Validate ``d``; any flaw, however odd the document, is a one-line `ModelError`."""
        try:
            return cls._from_dict(d, source)
        except ModelError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
            raise ModelError(f"{source} has malformed metadata ({type(exc).__name__}: {str(exc)[:120]}): re-export the model") from None

    @classmethod
    def _from_dict(cls, d: dict, source: str) -> "ModelMetadata":
        version = d.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ModelError(f"{source} metadata has no valid schema_version: re-export the model")
        if version > SCHEMA_VERSION:
            raise ModelError(
                f"{source} uses metadata schema {version}, newer than this runtime's {SCHEMA_VERSION}: upgrade aae"
            )
        missing = [k for k in ("export_id", "preprocessing", "latent_dim", "prior", "score", "threshold") if k not in d]
        if missing:
            raise ModelError(f"{source} metadata lacks {', '.join(missing)}: re-export the model")
        latent_dim = d["latent_dim"]
        if not isinstance(latent_dim, int) or isinstance(latent_dim, bool) or latent_dim < 1:
            raise ModelError(f"{source} metadata has an invalid latent_dim {latent_dim!r}: re-export the model")
        validate_prior(d["prior"])
        if d["prior"]["dim"] != latent_dim:
            raise ModelError(f"{source} metadata: prior dim {d['prior']['dim']} != latent_dim {latent_dim}: re-export the model")
        threshold = d["threshold"]
        if not isinstance(threshold, dict) or not _finite_number(threshold.get("value")):
            raise ModelError(f"{source} metadata has no finite numeric threshold value: re-export the model")
        if "percentile" in threshold and not _finite_number(threshold["percentile"]):
            raise ModelError(f"{source} metadata has a non-numeric threshold percentile: re-export the model")
        _check_threshold_stats(threshold.get("stats"), source)
        if not isinstance(d["score"], dict) or "name" not in d["score"]:
            raise ModelError(f"{source} metadata has no score definition: re-export the model")
        validate_score_block(d["score"], source)
        _check_codes(d["score"], latent_dim, source)
        _check_map_fields(d, source)
        graphs = _graphs(d, version, source)
        classes = _classes(d, graphs, source)
        requires = _requires(d, source)
        pre = Preprocessing.from_dict(d["preprocessing"]) if isinstance(d["preprocessing"], dict) else Preprocessing.from_dict({})
        tiling = _tiling(d, requires, pre, source)
        _segmentation(d, requires, graphs, source)
        if pre.orientation == "exif" and EXIF_ORIENTATION not in requires:  # a reader that ignored it would score sideways
            raise ModelError(f"{source} metadata: its preprocessing turns photos upright by their EXIF tag, but it does "
                             f"not list '{EXIF_ORIENTATION}' in 'requires': re-export the model")
        return cls(
            requires=requires,
            tiling=tiling,
            graphs=graphs,
            classes=classes,
            family=str(d.get("family", "aae")),
            raw=d,
            schema_version=version,
            export_id=str(d["export_id"]),
            preprocessing=pre,
            latent_dim=latent_dim,
            prior=d["prior"],
            score=d["score"],
            threshold=threshold,
        )


def _check_map_fields(d: dict, source: str) -> None:
    """What the maps and the input scaling read: the colour scale (finite, positive) and the
    input's value range (two finite numbers, low < high)."""
    scale = d["score"].get("pixel_error_scale")
    if scale is not None and not (_finite_number(scale) and scale > 0):
        raise ModelError(f"{source} metadata has pixel_error_scale {scale!r}; it must be a positive number: re-export the model")
    value_range = (d.get("input") or {}).get("value_range") if isinstance(d.get("input", {}), dict) else None
    if value_range is not None and not (isinstance(value_range, list) and len(value_range) == 2
                                        and all(_finite_number(v) for v in value_range) and value_range[0] < value_range[1]):
        raise ModelError(f"{source} metadata has input value_range {str(value_range)[:80]}; it must be [low, high] with "
                         "low < high: re-export the model")


def _graphs(d: dict, version: int, source: str) -> dict:
    """The graphs block as {name: {"file", "inputs", "outputs", ...}}; schema 1's is implied."""
    if version == 1:
        graphs = {name: dict(g) for name, g in SCHEMA_1_GRAPHS.items()}
        old = d.get("graphs") if isinstance(d.get("graphs"), dict) else {}
        if isinstance(old.get("scorer"), dict):
            graphs["scorer"] = {"file": SCORER_FILE, "inputs": [IMAGE_INPUT], "pixel_error": old["scorer"].get("pixel_error"),
                                "outputs": [LATENT_OUTPUT, PIXEL_ERROR_OUTPUT, RECONSTRUCTION_ERROR_OUTPUT]}
        return graphs
    graphs = d.get("graphs")
    ok = isinstance(graphs, dict) and {"encoder", "decoder"} <= set(graphs) and set(graphs) <= set(GRAPH_FILES)
    for name, g in graphs.items() if ok else ():
        ok = ok and isinstance(g, dict) and g.get("file") == GRAPH_FILES[name]
        ok = ok and isinstance(g.get("inputs"), list) and isinstance(g.get("outputs"), list)
        if ok:
            must, may = GRAPH_INPUTS[name]
            inputs, outputs = set(map(str, g["inputs"])), set(map(str, g["outputs"]))
            ok = must <= inputs <= must | may and len(inputs) == len(g["inputs"]) and outputs and outputs <= GRAPH_OUTPUTS[name]
    if not ok:
        raise ModelError(f"{source} metadata has a malformed 'graphs' block (encoder and decoder, each with its file, "
                         "inputs and outputs, are required): re-export the model")
    return graphs


def _requires(d: dict, source: str) -> tuple[str, ...]:
    """The features the model needs its reader to understand; an unknown one refuses the model."""
    requires = d.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise ModelError(f"{source} metadata has a malformed 'requires' list: re-export the model")
    unknown = [r for r in requires if r not in KNOWN_FEATURES]
    if unknown:
        raise ModelError(f"{source} requires {', '.join(repr(u) for u in unknown[:5])}, which this runtime does not "
                         "support: upgrade aae")
    return tuple(requires)


def _tiling(d: dict, requires: tuple[str, ...], pre: Preprocessing, source: str) -> Tiling | None:
    if TILING not in requires:
        if "tiling" in d:
            raise ModelError(f"{source} metadata has a 'tiling' block but does not list it in 'requires': re-export the model")
        return None
    tiling = Tiling.from_dict(d.get("tiling"), source)
    if tiling.tile != (pre.height, pre.width):
        raise ModelError(f"{source} metadata: tiles of {tiling.tile} but the model takes {pre.height} x {pre.width} "
                         "inputs: re-export the model")
    pix = d["score"].get("pixel_error", d["score"].get("name"))
    if d["score"].get("name") not in PIXEL_ERRORS or pix != d["score"]["name"]:
        raise ModelError(f"{source} metadata: a tiled model's score is the maximum of its per-pixel error map, so it must "
                         f"be one of {', '.join(PIXEL_ERRORS)}: recalibrate or re-export the model")
    return tiling


def _segmentation(d: dict, requires: tuple[str, ...], graphs: dict, source: str) -> None:
    """A score on the segmenter's map must be required and have the scorer graph that computes it."""
    if d["score"].get("pixel_error", d["score"].get("name")) != SEGMENT:
        return
    if SEGMENTATION not in requires or "scorer" not in graphs:
        raise ModelError(f"{source} metadata: its '{SEGMENT}' maps come from the scorer graph, but it does not list "
                         f"'{SEGMENTATION}' in 'requires' or has no scorer graph: re-export the model")


def _classes(d: dict, graphs: dict, source: str) -> tuple[str, ...] | None:
    """The class values a conditional or classifying model needs; None for the others."""
    needs = LABEL_INPUT in graphs["decoder"]["inputs"] or CLASS_OUTPUT in graphs["encoder"]["outputs"]
    classes = d.get("classes")
    if classes is None and not needs:
        return None
    ok = isinstance(classes, list) and 2 <= len(classes) <= MAX_CLASSES and all(isinstance(c, str) for c in classes)
    if not ok or len(set(classes)) != len(classes):
        raise ModelError(f"{source} metadata needs 'classes', a list of at least two distinct class names, for its "
                         "label input or class head: re-export the model")
    return tuple(classes)


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_threshold_stats(stats, source: str) -> None:
    """The stored score statistics that normalised scores and --threshold-percentile read."""
    if stats is None:
        return
    bad = not isinstance(stats, dict)
    if not bad:
        pct = stats.get("percentiles", {})
        bad = not isinstance(pct, dict) or not all(_finite_number(v) for v in pct.values())
        bad = bad or any(k in stats and not _finite_number(stats[k]) for k in ("mean", "std", "min", "max"))
        q = stats.get("quantiles")
        if q is not None and not bad:
            ok = isinstance(q, dict) and isinstance(q.get("percent"), list) and isinstance(q.get("value"), list)
            ok = ok and 0 < len(q["percent"]) == len(q["value"])
            ok = ok and all(_finite_number(v) for v in q["percent"] + q["value"])
            ok = ok and all(a <= b for a, b in zip(q["percent"], q["percent"][1:]))
            bad = not ok
    if bad:
        raise ModelError(f"{source} metadata has malformed threshold statistics: recalibrate (aae-run calibrate) or re-export the model")


def _check_codes(score: dict, latent_dim: int, source: str) -> None:
    """The fitted code statistics a 'codes' score term reads: mean (latent,), precision (latent, latent)."""
    codes = score.get("codes")
    if codes is None:
        return
    try:
        mean = [float(v) for v in codes["mean"]]
        precision = [[float(v) for v in row] for row in codes["precision"]]
        ok = len(mean) == latent_dim and len(precision) == latent_dim and all(len(r) == latent_dim for r in precision)
        ok = ok and all(math.isfinite(v) for v in mean) and all(math.isfinite(v) for r in precision for v in r)
    except (KeyError, TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ModelError(f"{source} metadata has malformed 'codes' statistics (need mean ({latent_dim},) and precision "
                         f"({latent_dim}, {latent_dim})): recalibrate or re-export the model")
