"""Run configuration: one frozen dataclass per concern, saved whole in every checkpoint.

Export and resume rebuild everything from a checkpoint's config alone, so every field that
changes what the model is or how it was trained lives here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from aae_runtime.priors import make_prior_spec

ARCHS = ("mlp",)
POSTERIORS = ("deterministic", "gaussian", "universal")
RECON_LOSSES = ("bce", "mse")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ModelConfig:
    image_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W) of one input
    latent_dim: int = 8  # the paper's MNIST likelihood model uses 8
    arch: str = "mlp"  # mlp: the paper's 2 x 1000 ReLU layers for encoder, decoder, discriminator
    hidden: int = 1000  # units per hidden layer
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


@dataclass(frozen=True)
class DataConfig:
    source: str = "mnist"  # mnist | folder
    path: str | None = None  # where the data was read from (resolved at training time)
    classes: tuple[int, ...] | None = None  # MNIST digits to train on; None = all
    limit: int | None = None  # at most this many images before the validation split
    val_fraction: float = 0.1  # held out from the training images for validation and threshold
    split_seed: int = 0  # the hold-out split depends on this alone, not on the training seed
    preprocessing: dict | None = None  # aae_runtime.metadata.Preprocessing as a dict; set by the data loader


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 100  # the paper's minibatch
    lr_recon: float = 1e-3  # Adam, encoder + decoder, reconstruction phase
    lr_disc: float = 2e-4  # Adam, discriminator
    lr_gen: float = 2e-4  # Adam, encoder as generator
    recon_loss: str = "bce"  # bce suits [0, 1] images with a sigmoid decoder; mse also offered
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.recon_loss not in RECON_LOSSES:
            raise ValueError(f"unknown reconstruction loss {self.recon_loss!r}; choose one of {', '.join(RECON_LOSSES)}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch size must be at least 1")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        """Plain dict of str/int/float/bool/list/None: safe for torch.load(weights_only=True) and JSON."""
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return cls(
            model=_build(ModelConfig, d.get("model", {})),
            data=_build(DataConfig, d.get("data", {})),
            train=_build(TrainConfig, d.get("train", {})),
        )

    def replace(self, **sections) -> "RunConfig":
        return replace(self, **sections)


def _build(kind, values: dict):
    known = {f.name for f in fields(kind)}
    kwargs = {k: v for k, v in values.items() if k in known}
    for key in ("image_shape", "classes"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    return kind(**kwargs)


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
