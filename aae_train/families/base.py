"""What a model family is: the contract between a family module and the one training loop.

The loop (`aae_train.train.Trainer`) owns everything that is the same for every family: the
device, seeds and RNG streams, learning-rate schedules over whatever optimisers the family
returns, weight averaging (EMA), the NaN/inf guard, atomic checkpoints (`checkpoint.pt` and
`best.pt`), metrics and progress. A family owns what differs: its options, networks, optimisers,
the phases of one training step, its validation figures and the graphs it exports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from aae_train.config import RunConfig
from aae_train.graphs import ssim_map
from aae_train.speed import float32_loss

# Export (`export.onnx_export`) turns each of a family's GraphSpecs into one ONNX file. The
# names below are the runtime's (aae_runtime.contract.metadata); the runtime decides what a
# model can do from the inputs and outputs its graphs list, never from the family's name.


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: a module in eval mode, its named inputs and outputs."""

    name: str  # encoder | decoder | scorer
    module: torch.nn.Module  # forward(*inputs) -> one tensor or a tuple, in the order of `outputs`
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    examples: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]  # images (B, C, H, W) -> the graph's inputs


@dataclass
class Batch:
    """A minibatch as the step sees it: images and their class indices (-1: unlabelled)."""

    x: torch.Tensor  # (B, C, H, W)
    y: torch.Tensor | None = None  # (B,) int64, or None for families that use no labels


@dataclass
class Streams:
    """The loop's seeded random streams, saved in every checkpoint so that resume is exact."""

    prior: np.random.Generator  # prior draws for the discriminators
    extra: dict[str, torch.Generator] = field(default_factory=dict)  # a family's own (e.g. labelled batches)


class Family:
    """Base class of a family; subclasses set the class attributes and override the hooks."""

    name: ClassVar[str]
    options_class: ClassVar[type]  # the family's own options dataclass (RunConfig.options)
    loss_names: ClassVar[tuple[str, ...]]  # the per-step losses `step` returns, in order (metrics keys)
    selection: ClassVar[tuple[str, str]] = ("val_recon_loss", "min")  # best.pt: (metric, min|max)
    model_networks: ClassVar[tuple[str, ...]] = ("encoder", "decoder")  # averaged by --ema, exported
    uses_labels: ClassVar[bool] = False  # needs class labels (train/val index arrays)
    allows_unlabelled: ClassVar[bool] = True  # images without a class may train (only if uses_labels)
    adversarial: ClassVar[bool] = True  # has a discriminator: prior and D options apply
    extra_streams: ClassVar[tuple[str, ...]] = ()  # names of torch.Generator streams it needs
    default_score: ClassVar[str | None] = None  # the score export uses unless told (None: export's default)

    def __init__(self, cfg: RunConfig, nets: dict[str, torch.nn.Module], device: torch.device):
        self.cfg, self.nets, self.device = cfg, nets, device

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def configure(cls, cfg: RunConfig, data) -> RunConfig:
        """The config completed from the data (e.g. the class names); called once per run."""
        return cfg

    @classmethod
    def networks(cls, cfg: RunConfig) -> dict[str, torch.nn.Module]:
        """Fresh networks from the config alone, built in a fixed order (the RNG draws depend on it)."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, float]]:
        """name -> (optimiser, base learning rate); the loop applies the schedule to each."""
        raise NotImplementedError

    def adam(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
        """Adam as every family uses it: fused (one pass over each tensor: a quarter of the epoch
        on the CPU, benchmarks/train_floor.py) on the CPU and CUDA, else PyTorch's default."""
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True if self.device.type in ("cpu", "cuda") else None)

    def prepare(self, data, streams: Streams) -> None:
        """Hook to keep data the step needs besides the minibatch (e.g. the labelled pool)."""
        self.streams = streams

    # -- training -------------------------------------------------------------------------------
    def host_draws(self, n: int) -> list[np.ndarray]:
        """The random draws one step of ``n`` images takes on the host (prior samples, picks of
        labelled images), in the order it uses them. The loop makes them before the step and
        hands them to `step` on the training device, so a step is a fixed function of device
        tensors (one a GPU can replay as a CUDA graph: `aae_train.cudagraph`)."""
        return []

    def step(self, batch: Batch, draws: list[torch.Tensor]) -> torch.Tensor:
        """One minibatch of every phase, ``draws`` being `host_draws` on the device; returns the
        losses (len(loss_names),), detached."""
        raise NotImplementedError

    def with_code_noise(self, z: torch.Tensor) -> torch.Tensor:
        """The codes the decoder reconstructs from in training: jittered by N(0, code_noise^2) when
        asked, so that the decoder also learns the space between the codes, where prior samples land."""
        std = self.cfg.train.code_noise
        return z + std * torch.randn_like(z) if std > 0 else z

    @property
    def encoder_draws_noise(self) -> bool:
        """Whether the encoder draws randomness in training (dropout, a sampling posterior). An
        encoder that does not gives the same codes on every pass until its weights change, so a
        regularisation phase can take D's fakes and the generator's codes from one pass."""
        enc = self.nets["encoder"]
        return self.cfg.model.posterior != "deterministic" or \
            any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in enc.modules())

    def decoder_label(self, batch: Batch) -> torch.Tensor | None:
        """What a conditional decoder gets beside the code in the reconstruction phase (None: nothing)."""
        return None

    def recon_loss(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with float32_loss(recon.device):  # --precision bf16: the passes in bfloat16, the loss in float32
            recon, x = recon.float(), x.float()
            if self.cfg.train.recon_loss == "bce":
                return F.binary_cross_entropy(recon, x)
            if self.cfg.train.recon_loss == "ssim":
                return (1.0 - ssim_map(recon, x)).mean()
            return F.mse_loss(recon, x)

    # -- evaluation and outputs -----------------------------------------------------------------
    def reconstruct(self, model: dict[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, reconstructions) of ``x`` by the model networks in eval mode."""
        z = model["encoder"](x)
        return z, model["decoder"](z)

    def evaluate(self, model: dict[str, torch.nn.Module], val: Iterable[Batch], epoch: int) -> dict:
        """Validation figures of the model networks (already in eval mode), merged into metrics.

        ``val`` yields the validation split in chunks, in order (a streamed folder is never whole
        in memory): the figures are accumulated chunk by chunk, and a family adds its own through
        `observe_validation` and `validation_figures`."""
        n, recon_sum, mse_sum, z_sum, z_squares = 0, 0.0, 0.0, 0.0, 0.0
        self.start_validation()
        for batch in val:
            z, recon = self.reconstruct(model, batch.x, batch.y)
            recon = recon.contiguous()  # the figures' summation order then does not depend on the decoder's memory layout
            k = len(batch.x)
            recon_sum += float(self.recon_loss(recon, batch.x)) * k
            mse_sum += float(F.mse_loss(recon, batch.x)) * k
            zd = z.double()
            z_sum, z_squares = z_sum + zd.sum(0), z_squares + (zd * zd).sum(0)
            self.observe_validation(model, batch, z, n)
            n += k
        mean = z_sum / n
        std = ((z_squares - n * mean * mean).clamp_min(0) / max(1, n - 1)).sqrt()
        return {"val_recon_loss": recon_sum / n, "val_mse": mse_sum / n,
                "latent_mean": [round(v, 4) for v in mean.tolist()], "latent_std": [round(v, 4) for v in std.tolist()],
                **self.validation_figures(epoch)}

    def start_validation(self) -> None:
        """Hook: a validation pass begins."""

    def observe_validation(self, model: dict[str, torch.nn.Module], batch: Batch, z: torch.Tensor, start: int) -> None:
        """Hook: one chunk of the validation split (its first image is image ``start``) and its codes ``z``."""

    def validation_figures(self, epoch: int) -> dict:
        """Hook: the family's own figures of the pass just ended."""
        return {}

    def sample_images(self, model: dict[str, torch.nn.Module], n: int, codes: np.ndarray) -> torch.Tensor:
        """Images decoded from ``n`` prior draws, for samples.png (``codes``: held-out codes, (N, latent))."""
        raise NotImplementedError

    @classmethod
    def prior_spec(cls, cfg: RunConfig, codes: np.ndarray) -> dict:
        """The prior the model samples from (plots, export's metadata): the one training imposed;
        ``codes`` (N, latent), held-out codes, serve families without one."""
        return cfg.model.prior

    def training_labels(self, train_y: np.ndarray | None) -> np.ndarray | None:
        """The labels the step may see (the semi-supervised family hides all but its labelled subset)."""
        return train_y

    @classmethod
    def graphs(cls, cfg: RunConfig, model: dict[str, torch.nn.Module], pixel_error: str | None) -> list[GraphSpec]:
        """The graphs export writes: encoder, decoder and (with ``pixel_error``) the fused scorer."""
        raise NotImplementedError

    @classmethod
    def metadata(cls, cfg: RunConfig) -> dict:
        """Family-specific metadata fields (e.g. the class values); merged into the exported block."""
        return {}
