"""Light runtime for exported Adversarial Autoencoders: score images, sample the prior.

Imports only the standard library, numpy, onnxruntime, pillow and typer/rich; never torch.
Embed it with::

    from aae_runtime import AAEModel
    model = AAEModel.load("model_dir", device="auto")
    results = model.score_paths(["part_001.png"])
"""

__version__ = "0.1.0"

from aae_runtime.errors import AAEError, ModelError, InputError  # noqa: E402
from aae_runtime.model import AAEModel, ImageScore  # noqa: E402
from aae_runtime.session import SessionConfig  # noqa: E402

__all__ = ["AAEModel", "ImageScore", "SessionConfig", "AAEError", "ModelError", "InputError", "__version__"]
