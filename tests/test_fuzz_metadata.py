"""Property tests (hypothesis) of the metadata block: random JSON and mutated real metadata.

Whatever the text, parsing gives a `ModelMetadata` or a `ModelError`; and metadata that parses
drives the real exported graphs (sessions loaded once) to finite scores, a finite threshold and
normalised scores in [0, 1], or to an `AAEError`: never to another exception.
"""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aae_runtime import AAEModel
from aae_runtime.contract.errors import AAEError, ModelError
from aae_runtime.contract.metadata import METADATA_KEY, ModelMetadata
from aae_runtime.model import _check_graphs

EXAMPLES = int(os.environ.get("AAE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("AAE_FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.sampled_from([0, 1, -1, 2, 28, 4096, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, 1e300, 0.5, 99.0, 100.0, 101.0]),
    st.text(max_size=20), st.sampled_from(["", "L", "RGB", "mse", "bce", "gaussian", "percentile", "log", "codes", "nan"]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


class Real(tuple):
    """(model, metadata dict, images); a short repr keeps hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return "<tiny model, its metadata, 3 random images>"


@pytest.fixture(scope="module")
def real(tiny_model_dir):
    """The tiny model's sessions and its metadata as a dict."""
    model = AAEModel.load(tiny_model_dir, device="cpu")
    text = model.encoder.get_modelmeta().custom_metadata_map[METADATA_KEY]
    x = np.random.default_rng(0).random((3, *model.input_shape), dtype=np.float32)
    return Real((model, json.loads(text), x))


def paths_of(doc, prefix=()):
    """Every key path in a JSON document."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths_of(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths_of(v, (*prefix, i))


def apply(doc, path, action, value):
    if not path:
        return value if action == "replace" else doc
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "delete":
        if isinstance(parent, dict):
            del parent[last]
        else:
            parent.pop(last)
    else:
        parent[last] = value
    return doc


def check_contract(model: AAEModel, text: str, x: np.ndarray) -> str:
    try:
        meta = ModelMetadata.from_json(text, "fuzz.onnx")
    except ModelError as exc:
        assert str(exc) and "\n" not in str(exc)
        return "refused"
    try:
        _check_graphs(model.encoder, model.decoder, meta)
        m = AAEModel(model.encoder, model.decoder, meta, scorer=model.scorer)
        assert math.isfinite(m.threshold), m.threshold
        assert isinstance(m.threshold_source, str)
        scores = m.score(x)
        assert scores.shape == (len(x),) and np.isfinite(scores).all(), scores
        norm = m.normalise(scores)
        assert np.all((norm >= 0) & (norm <= 1)), norm
        m.is_anomaly(scores)
    except AAEError as exc:
        assert str(exc) and "\n" not in str(exc)
        return "refused later"
    return "ok"


def test_the_real_metadata_passes(real):
    model, doc, x = real
    assert check_contract(model, json.dumps(doc), x) == "ok"


@FUZZ
@given(st.text(max_size=300))
def test_random_text(real, text):
    model, _, x = real
    check_contract(model, text, x)


@FUZZ
@given(json_values)
def test_random_json(real, value):
    model, _, x = real
    check_contract(model, json.dumps(value), x)


@FUZZ
@given(st.data())
def test_mutated_real_metadata(real, data):
    model, doc, x = real
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = list(paths_of(doc))
        path = data.draw(st.sampled_from(paths), label="path")
        action = data.draw(st.sampled_from(["replace", "delete"]) if path else st.just("replace"), label="action")
        value = data.draw(json_values, label="value") if action == "replace" else None
        doc = apply(doc, path, action, value)
    check_contract(model, json.dumps(doc), x)


@FUZZ
@given(st.data())
def test_truncated_and_byte_mutated_text(real, data):
    model, doc, x = real
    text = json.dumps(doc)
    cut = data.draw(st.integers(0, len(text)), label="cut")
    pos = data.draw(st.integers(0, max(0, cut - 1)), label="pos")
    ch = data.draw(st.characters(), label="char")
    mutated = text[:cut]
    if mutated:
        mutated = mutated[:pos] + ch + mutated[pos + 1:]
    check_contract(model, mutated, x)
