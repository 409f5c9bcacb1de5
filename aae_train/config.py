"""Run configuration: one frozen dataclass per concern, saved whole in every checkpoint.

Export and resume rebuild everything from a checkpoint's config alone, so every field that
changes what the model is or how it was trained lives here.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from aae_runtime.contract.preprocessing import ORIENTATIONS
from aae_runtime.contract.priors import make_prior_spec

ARCHS = ("mlp", "conv")
POSTERIORS = ("deterministic", "gaussian", "universal")
RECON_LOSSES = ("bce", "mse", "ssim")
LR_SCHEDULES = ("constant", "cosine", "step")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")  # of the training step's network passes (aae_train.speed)
CUDA_GRAPH = "cuda-graph"  # the whole step as one CUDA graph (aae_train.cudagraph)
# torch.compile's modes, or CUDA_GRAPH; how the step runs, not what it computes: not in the config
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", CUDA_GRAPH)
DATA_SOURCES = ("mnist", "folder")
LOADERS = ("auto", "memory", "stream")  # how a folder is read (aae_train.streaming); not part of the config


@dataclass(frozen=True)
class ModelConfig:
    image_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W) of one input
    latent_dim: int = 8  # the paper's MNIST likelihood model uses 8
    arch: str = "mlp"  # mlp: the paper's 2 x 1000 ReLU layers; conv: stride-2 convnets for larger images
    hidden: int = 1000  # units per hidden (fully connected) layer, discriminator included
    dropout: float = 0.0  # dropout after each hidden layer of encoder and decoder (training only)
    disc_dropout: float = 0.0  # dropout after each hidden layer of the discriminator
    posterior: str = "deterministic"  # q(z|x): deterministic | gaussian | universal
    noise_dim: int = 8  # size of the noise fed to a universal-approximator encoder
    prior: dict = field(default_factory=lambda: make_prior_spec("gaussian", 8, std=5.0))

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.posterior not in POSTERIORS:
            raise ValueError(f"unknown posterior {self.posterior!r}; choose one of {', '.join(POSTERIORS)}")
        if self.prior["dim"] != self.latent_dim:
            raise ValueError(f"prior dim {self.prior['dim']} != latent_dim {self.latent_dim}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.disc_dropout < 1.0):
            raise ValueError("dropout must be in [0, 1)")
        if self.hidden < 1 or self.latent_dim < 1:
            raise ValueError("hidden units and latent size must be at least 1")


@dataclass(frozen=True)
class DataConfig:
    source: str = "mnist"  # mnist | folder
    path: str | None = None  # where the data was read from (resolved at training time)
    image_size: tuple[int, int] | None = None  # folder: (height, width) every image is resized to
    color_mode: str | None = None  # folder: "L" (grayscale) or "RGB"
    resample: str = "bilinear"  # folder: PIL filter used to resize (aae_runtime.images.RESAMPLE)
    classes: tuple[int, ...] | None = None  # MNIST digits to train on; None = all
    limit: int | None = None  # at most this many images before the validation split
    val_fraction: float = 0.1  # held out from the training images for validation and threshold
    split_seed: int = 0  # the hold-out split depends on this alone, not on the training seed
    preprocessing: dict | None = None  # aae_runtime.contract.preprocessing.Preprocessing as a dict; set by the data loader
    unlabelled_dir: str | None = None  # folder: the sub-folder of unlabelled images (semi-supervised family)
    crop: int | None = None  # folder: train on random crop x crop crops of whole photos (none: resize to image_size)
    crops_per_image: int | None = None  # crops per training photo per epoch (None: aae_train.crops.EPOCH_CROPS in all)
    augment: tuple[str, ...] = ()  # crop augmentations the part allows: "flip", "rot90", "scale" (aae_train.crops)
    orientation: str = "exif"  # folder: photos turned upright by their EXIF tag ("stored": as stored; runs from before)
    listing: str | None = None  # folder: the image files the run was trained on ("COUNT:DIGEST", aae_train.data.listing_of)

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ValueError(f"unknown data source {self.source!r}; choose one of {', '.join(DATA_SOURCES)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1): part of the images is held out (at least one)")
        if self.color_mode is not None and self.color_mode not in ("L", "RGB"):
            raise ValueError(f"unknown colour mode {self.color_mode!r}; choose L (grayscale) or RGB")
        if self.crop is not None and (self.crop < 8 or self.image_size is not None):
            raise ValueError("crop must be at least 8 pixels, and excludes image_size (--crop and --size exclude each other)")
        if self.crops_per_image is not None and self.crops_per_image < 1:
            raise ValueError("crops per image must be at least 1")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"unknown orientation {self.orientation!r}; choose one of {', '.join(ORIENTATIONS)}")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(f"image size must be two positive integers (height, width), got {self.image_size!r}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 100  # the paper's minibatch
    lr_recon: float = 1e-3  # Adam, encoder + decoder, reconstruction phase
    lr_disc: float = 2e-4  # Adam, discriminator
    lr_gen: float = 2e-4  # Adam, encoder as generator
    recon_loss: str = "bce"  # bce suits [0, 1] images with a sigmoid decoder; mse; ssim (1 - SSIM: textures)
    lr_schedule: str = "constant"  # constant | cosine (to lr_min_factor x lr at the last epoch) | step
    lr_min_factor: float = 0.1  # cosine: final lr / initial lr; step: lr is multiplied by it at 1/2 and 3/4 of the epochs
    label_smoothing: float = 0.0  # D's target for prior samples is 1 - this (one-sided smoothing)
    disc_noise: float = 0.0  # std of Gaussian noise added to both of D's inputs (codes and prior samples), in prior units
    gradient_penalty: float = 0.0  # R1: gamma / 2 * E|grad D|^2 at prior samples, added to D's loss; 0 = off
    disc_steps: int = 1  # discriminator updates per minibatch (each on fresh prior samples), before the generator's one
    code_noise: float = 0.0  # std of Gaussian noise added to the codes the decoder reconstructs from (training only)
    ema: float = 0.0  # decay of an exponential moving average of encoder + decoder weights, saved as the model; 0 = off
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # bf16: the step's network passes under bfloat16 autocast (weights and losses stay float32)

    def __post_init__(self) -> None:
        if self.recon_loss not in RECON_LOSSES:
            raise ValueError(f"unknown reconstruction loss {self.recon_loss!r}; choose one of {', '.join(RECON_LOSSES)}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be at least 1")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if not 0.0 < self.lr_min_factor <= 1.0:
            raise ValueError("lr_min_factor must be in (0, 1]")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError("label smoothing must be in [0, 0.5)")
        if not self.disc_noise >= 0:  # also refuses nan
            raise ValueError("discriminator input noise must be >= 0")
        if not self.gradient_penalty >= 0:
            raise ValueError("gradient penalty must be >= 0")
        if self.disc_steps < 1:
            raise ValueError("discriminator steps per minibatch must be at least 1")
        if not self.code_noise >= 0:
            raise ValueError("code noise must be >= 0")
        if not all(math.isfinite(v) and v >= 0 for v in (self.lr_recon, self.lr_disc, self.lr_gen)):
            raise ValueError("learning rates must be finite numbers >= 0")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError("EMA decay must be in [0, 1): 0 turns it off, 0.999 is typical")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    family: str = "aae"  # a name in aae_train.families.FAMILY_MODULES
    options: Any = None  # the family's own options dataclass; None: its defaults

    def __post_init__(self) -> None:
        if self.options is None:
            from aae_train.families import get_family

            object.__setattr__(self, "options", get_family(self.family).options_class())

    def to_dict(self) -> dict:
        """Plain dict of str/int/float/bool/list/None: safe for torch.load(weights_only=True) and JSON."""
        return _plain({"model": asdict(self.model), "data": asdict(self.data), "train": asdict(self.train),
                       "family": self.family, "options": asdict(self.options)})

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """The config of a checkpoint's dict; one written before families existed is an "aae" run."""
        from aae_train.families import get_family

        family = d.get("family", "aae")
        data = {"orientation": "stored", **d.get("data", {})}  # a run from before EXIF tags were read took pixels as stored
        return cls(
            model=_build(ModelConfig, d.get("model", {})),
            data=_build(DataConfig, data),
            train=_build(TrainConfig, d.get("train", {})),
            family=family,
            options=_build(get_family(family).options_class, d.get("options", {})),
        )

    def replace(self, **sections) -> "RunConfig":
        return replace(self, **sections)


def _build(kind, values: dict):
    known = {f.name for f in fields(kind)}
    kwargs = {k: v for k, v in values.items() if k in known}
    for key in ("image_shape", "classes", "image_size", "augment"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    if kind.__name__.endswith("Options") and kwargs.get("classes") is not None:
        kwargs["classes"] = tuple(str(c) for c in kwargs["classes"])
    return kind(**kwargs)


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
