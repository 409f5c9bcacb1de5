"""The registry of model families: one module each, all trained by the one loop in `aae_train.train`.

A family (see `base.Family`) owns its options dataclass, networks, optimisers, training step
(its phases), validation figures and the graphs it exports. `--family NAME` picks one; the
registry maps names to modules and imports a family (and torch) only when it is asked for, so
an unknown name is refused at once.
"""

from __future__ import annotations

import importlib

from aae_runtime.contract.errors import AAEError

# name -> (module, one-line description); the order is the order in --help
FAMILY_MODULES = {
    "aae": ("aae_train.families.aae", "the unsupervised adversarial autoencoder (the default)"),
    "ae": ("aae_train.families.ae", "a plain autoencoder: reconstruction only, no adversary (the baseline)"),
    "supervised": ("aae_train.families.supervised", "the decoder gets the one-hot label beside the style code"),
    "semi": ("aae_train.families.semi", "a categorical code learned from a few labels, and a style code"),
    "draem": ("aae_train.families.draem", "for photos (aae-train folder --crop): a defect map learned from synthetic defects"),
}
FAMILY_NAMES = tuple(FAMILY_MODULES)
DEFAULT_FAMILY = "aae"


class FamilyError(AAEError):
    """An unknown family, or options that do not belong to the chosen one."""


def get_family(name: str):
    """The Family class registered as ``name``."""
    if name not in FAMILY_MODULES:
        raise FamilyError(f"unknown family {name!r}: choose one of {', '.join(FAMILY_NAMES)}")
    return importlib.import_module(FAMILY_MODULES[name][0]).FAMILY
