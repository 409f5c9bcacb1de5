"""The plain autoencoder: the AAE without its regularisation phase (the baseline the others are
measured against). It has no prior; `sample` draws from a Gaussian fitted to its held-out codes,
recorded in the metadata as such (prior ``fitted_gaussian``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aae_runtime.contract.priors import fit_gaussian_prior, sample_prior
from aae_train.config import RunConfig
from aae_train.families.aae import AAEFamily
from aae_train.families.base import Batch
from aae_train.models import Decoder, Encoder


@dataclass(frozen=True)
class AEOptions:
    """No options of its own: the networks, reconstruction loss and learning rate are shared."""


class AEFamily(AAEFamily):
    name = "ae"
    options_class = AEOptions
    loss_names = ("recon_loss",)
    adversarial = False

    @classmethod
    def networks(cls, cfg: RunConfig) -> dict[str, torch.nn.Module]:
        return {"encoder": Encoder(cfg.model), "decoder": Decoder(cfg.model)}

    def optimizers(self):
        t, n = self.cfg.train, self.nets
        params = [*n["encoder"].parameters(), *n["decoder"].parameters()]
        return {"recon": (self.adam(params, lr=t.lr_recon), t.lr_recon)}

    def host_draws(self, n: int) -> list[np.ndarray]:
        return []  # no prior to draw from

    def step(self, batch: Batch, draws: list[torch.Tensor]) -> torch.Tensor:
        recon = self.recon_loss(self.nets["decoder"](self.with_code_noise(self.nets["encoder"](batch.x))), batch.x)
        self.opt["recon"].zero_grad(set_to_none=True)
        recon.backward()
        self.opt["recon"].step()
        return recon.detach()[None]

    def start_validation(self) -> None:  # no prior, so no MMD to it
        pass

    def observe_validation(self, model, batch: Batch, z: torch.Tensor, start: int) -> None:
        pass

    def validation_figures(self, epoch: int) -> dict:
        return {}

    @classmethod
    def prior_spec(cls, cfg: RunConfig, codes: np.ndarray) -> dict:
        return fit_gaussian_prior(codes, f"{len(codes)} held-out codes (validation split, split_seed {cfg.data.split_seed})")

    def sample_images(self, model, n: int, codes: np.ndarray) -> torch.Tensor:
        z = sample_prior(self.prior_spec(self.cfg, codes), n, np.random.default_rng(0))
        return model["decoder"](torch.from_numpy(z).to(self.device))


FAMILY = AEFamily
