"""Encoder q(z|x), decoder p(x|z) and discriminator D(z): the paper's MLPs.

Each posterior has a stochastic training path and a deterministic path used in eval mode and
at export (the mean for the Gaussian posterior, zero noise for the universal approximator), so
no sampling noise is ever frozen into an exported graph.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aae_train.config import ModelConfig


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of ``sizes`` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Images (B, C, H, W) -> latent codes (B, latent_dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.posterior = cfg.posterior
        self.noise_dim = cfg.noise_dim if cfg.posterior == "universal" else 0
        n_in = math.prod(cfg.image_shape) + self.noise_dim
        n_out = cfg.latent_dim * (2 if cfg.posterior == "gaussian" else 1)
        self.latent_dim = cfg.latent_dim
        self.net = mlp([n_in, cfg.hidden, cfg.hidden, n_out])  # linear last layer, as in the paper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Samples z ~ q(z|x) in training mode; the deterministic code in eval mode."""
        h = x.flatten(1)  # (B, C*H*W)
        if self.noise_dim:
            noise = torch.randn(len(h), self.noise_dim, device=h.device) if self.training else h.new_zeros(len(h), self.noise_dim)
            h = torch.cat([h, noise], dim=1)
        out = self.net(h)
        if self.posterior != "gaussian":
            return out
        mean, log_var = out.chunk(2, dim=1)
        if not self.training:
            return mean
        return mean + torch.randn_like(mean) * torch.exp(0.5 * log_var.clamp(-20, 10))


class Decoder(nn.Module):
    """Latent codes (B, latent_dim) -> images (B, C, H, W) in [0, 1] (sigmoid output)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.image_shape = tuple(cfg.image_shape)
        self.net = mlp([cfg.latent_dim, cfg.hidden, cfg.hidden, math.prod(cfg.image_shape)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(z)).view(-1, *self.image_shape)


class Discriminator(nn.Module):
    """Latent codes (B, latent_dim) -> logits (B, 1): high for prior samples (real), low for codes (fake)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.net = mlp([cfg.latent_dim, cfg.hidden, cfg.hidden, 1])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def build_models(cfg: ModelConfig) -> tuple[Encoder, Decoder, Discriminator]:
    return Encoder(cfg), Decoder(cfg), Discriminator(cfg)
