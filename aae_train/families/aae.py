"""The unsupervised AAE (Makhzani et al. 2015, section 2): per minibatch a reconstruction phase,
then a regularisation phase that pushes the codes towards the prior."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aae_runtime.contract.metadata import IMAGE_INPUT, LATENT_INPUT, LATENT_OUTPUT, PIXEL_ERROR_OUTPUT, \
    RECONSTRUCTION_ERROR_OUTPUT, RECONSTRUCTION_OUTPUT
from aae_runtime.contract.priors import sample_prior
from aae_train.config import RunConfig
from aae_train.families.adversary import MMD_SAMPLES, discriminator_phase, generator_loss, mmd2
from aae_train.families.base import Batch, Family, GraphSpec
from aae_train.graphs import Scorer
from aae_train.models import Decoder, Discriminator, Encoder


@dataclass(frozen=True)
class AAEOptions:
    """None of its own: the prior, posterior and discriminator options are ModelConfig's and
    TrainConfig's, shared with the other adversarial families."""


class AAEFamily(Family):
    name = "aae"
    options_class = AAEOptions
    loss_names = ("recon_loss", "disc_loss", "disc_acc", "gen_loss")

    @classmethod
    def networks(cls, cfg: RunConfig) -> dict[str, torch.nn.Module]:
        return {"encoder": Encoder(cfg.model), "decoder": Decoder(cfg.model), "discriminator": Discriminator(cfg.model)}

    def optimizers(self):
        t, n = self.cfg.train, self.nets
        return {
            "recon": (self.adam([*n["encoder"].parameters(), *n["decoder"].parameters()], lr=t.lr_recon), t.lr_recon),
            "disc": (self.adam(n["discriminator"].parameters(), lr=t.lr_disc, betas=(0.5, 0.999)), t.lr_disc),
            "gen": (self.adam(n["encoder"].parameters(), lr=t.lr_gen, betas=(0.5, 0.999)), t.lr_gen),
        }

    def host_draws(self, n: int) -> list[np.ndarray]:
        """A prior draw for each discriminator update."""
        return [sample_prior(self.cfg.model.prior, n, self.streams.prior) for _ in range(self.cfg.train.disc_steps)]

    def step(self, batch: Batch, draws: list[torch.Tensor]) -> torch.Tensor:
        enc, dec, disc, t, opt = self.nets["encoder"], self.nets["decoder"], self.nets["discriminator"], self.cfg.train, self.opt
        x = batch.x
        # Reconstruction phase: encoder + decoder (from noisy codes with --code-noise; a conditional
        # decoder also gets the label).
        recon = self.recon_loss(dec(self.with_code_noise(enc(x)), self.decoder_label(batch)), x)
        opt["recon"].zero_grad(set_to_none=True)
        recon.backward()
        opt["recon"].step()
        # Regularisation phase: the discriminator (prior samples real, codes fake), then the
        # encoder as generator, trying to make D call its codes real. D's phase leaves the
        # encoder as it is, so an encoder without randomness encodes once for both.
        if self.encoder_draws_noise:
            with torch.no_grad():  # D's fakes: no graph through the encoder
                z_fake = enc(x)
        else:
            z = enc(x)
            z_fake = z.detach()
        d_loss, d_acc = discriminator_phase(disc, opt["disc"], z_fake, draws, t)
        g_loss = generator_loss(disc, enc(x) if self.encoder_draws_noise else z, t)
        opt["gen"].zero_grad(set_to_none=True)
        g_loss.backward()
        opt["gen"].step()
        return torch.stack([recon.detach(), d_loss, d_acc, g_loss.detach()])

    def start_validation(self) -> None:
        self._val_codes: list[torch.Tensor] = []  # the first MMD_SAMPLES held-out codes

    def observe_validation(self, model, batch: Batch, z: torch.Tensor, start: int) -> None:
        if start < MMD_SAMPLES:
            self._val_codes.append(z[: MMD_SAMPLES - start])

    def validation_figures(self, epoch: int) -> dict:
        z = torch.cat(self._val_codes)
        # Prior samples from their own seeded stream: evaluating never shifts the training RNGs.
        z_prior = torch.from_numpy(sample_prior(self.cfg.model.prior, len(z), np.random.default_rng(epoch)))
        return {"prior_mmd": round(mmd2(z.cpu().double(), z_prior.double()), 6)}

    def sample_images(self, model, n: int, codes: np.ndarray) -> torch.Tensor:
        z = torch.from_numpy(sample_prior(self.cfg.model.prior, n, np.random.default_rng(0))).to(self.device)
        return model["decoder"](z)

    @classmethod
    def graphs(cls, cfg: RunConfig, model, pixel_error: str | None) -> list[GraphSpec]:
        enc, dec = model["encoder"], model["decoder"]
        specs = [GraphSpec("encoder", enc, (IMAGE_INPUT,), (LATENT_OUTPUT,), lambda x: (x,)),
                 GraphSpec("decoder", dec, (LATENT_INPUT,), (RECONSTRUCTION_OUTPUT,), lambda x: (enc(x),))]
        if pixel_error:
            specs.append(GraphSpec("scorer", Scorer(enc, dec, pixel_error), (IMAGE_INPUT,),
                                   (LATENT_OUTPUT, PIXEL_ERROR_OUTPUT, RECONSTRUCTION_ERROR_OUTPUT), lambda x: (x,)))
        return specs


FAMILY = AAEFamily
