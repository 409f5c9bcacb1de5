"""Light runtime for exported Adversarial Autoencoders: score images, sample the prior, classify.

Imports only the standard library, numpy, onnxruntime, pillow and typer/rich; never torch.
Importing any part of it has no side effects: the names below load their modules (and ONNX
Runtime) on first use, so reading the version or an error class costs nothing. Embed it with::

    from aae_runtime import AAEModel
    model = AAEModel.load("model_dir", device="auto")
    results = model.score_paths(["part_001.png"])

Layout: `aae_runtime.contract` holds the torch-free definitions that training and export share
(metadata schema, preprocessing, priors, scores, errors, atomic writes); the rest is the
runtime's own application code (model, CLI, calibration, maps, benchmark).
"""

__version__ = "0.2.0"

# name -> module it lives in; loaded on first access (PEP 562), see the docstring
_LAZY = {
    "AAEModel": "aae_runtime.model",
    "ImageScore": "aae_runtime.model",
    "SessionConfig": "aae_runtime.session",
    "AAEError": "aae_runtime.contract.errors",
    "ModelError": "aae_runtime.contract.errors",
    "InputError": "aae_runtime.contract.errors",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aae_runtime' has no attribute {name!r}")
