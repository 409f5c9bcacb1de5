"""Training package: Adversarial Autoencoders (Makhzani et al. 2015) in PyTorch.

`aae-train mnist` trains on MNIST; `aae_train.train.train(config)` is the library entry point.
"""

from aae_runtime import __version__

__all__ = ["__version__"]
