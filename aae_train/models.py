"""Encoder q(z|x), decoder p(x|z) and discriminator D(z): the paper's MLPs, or small convnets.

``arch="mlp"`` is the paper's: two hidden layers of ``hidden`` ReLU units for encoder and
decoder. ``arch="conv"`` is for larger images: stride-2 convolutions halve the image while both
sides stay even and larger than 4 (at most 4 times), then one hidden fully connected layer; the
decoder mirrors it with transposed convolutions. The discriminator is always the MLP on codes.

Each posterior has a stochastic training path and a deterministic path used in eval mode and
at export (the mean for the Gaussian posterior, zero noise for the universal approximator), so
no sampling noise is ever frozen into an exported graph.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aae_train.config import ModelConfig


CONV_BASE_CHANNELS = 32  # channels after the first convolution; doubled at each halving
CONV_MAX_CHANNELS = 256
CONV_MAX_HALVINGS = 4


def mlp(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers of ``sizes`` with ReLU (and dropout, if > 0) between them, none after the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))  # identity in eval mode: export stays deterministic
    return nn.Sequential(*layers)


def conv_plan(image_shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """(channels, height, width) after each stride-2 convolution of the conv encoder, in order."""
    c, h, w = image_shape
    plan: list[tuple[int, int, int]] = []
    channels = CONV_BASE_CHANNELS
    while len(plan) < CONV_MAX_HALVINGS and h % 2 == 0 and w % 2 == 0 and h > 4 and w > 4:
        h, w = h // 2, w // 2
        plan.append((channels, h, w))
        channels = min(channels * 2, CONV_MAX_CHANNELS)
    return plan


def conv_features(image_shape: tuple[int, int, int]) -> tuple[nn.Sequential, int]:
    """The conv encoder's feature extractor (B, C, H, W) -> (B, F), and F."""
    layers: list[nn.Module] = []
    c_in, h, w = image_shape
    for c_out, h, w in conv_plan(image_shape):
        layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1), nn.ReLU()]  # exactly halves H, W
        c_in = c_out
    layers.append(nn.Flatten())
    return nn.Sequential(*layers), c_in * h * w


class ConvUpsampler(nn.Module):
    """Features (B, F) -> images (B, C, H, W) logits: the mirror of ``conv_features``."""

    def __init__(self, image_shape: tuple[int, int, int]):
        super().__init__()
        plan = conv_plan(image_shape)
        self.start = plan[-1] if plan else tuple(image_shape)
        layers: list[nn.Module] = []
        outs = [p[0] for p in reversed(plan[:-1])] + [image_shape[0]]
        c_in = self.start[0]
        for i, c_out in enumerate(outs if plan else []):
            layers.append(nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1))  # exactly doubles H, W
            if i < len(outs) - 1:
                layers.append(nn.ReLU())
            c_in = c_out
        self.net = nn.Sequential(*layers)

    @property
    def n_features(self) -> int:
        return math.prod(self.start)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.view(-1, *self.start))


class Encoder(nn.Module):
    """Images (B, C, H, W) -> latent codes (B, latent_dim); with ``n_classes`` > 0 also class
    logits (B, n_classes) from the same trunk (the semi-supervised AAE's categorical code y)."""

    def __init__(self, cfg: ModelConfig, n_classes: int = 0):
        super().__init__()
        self.posterior = cfg.posterior
        self.noise_dim = cfg.noise_dim if cfg.posterior == "universal" else 0
        self.n_classes = n_classes
        n_in = math.prod(cfg.image_shape) + self.noise_dim
        n_out = cfg.latent_dim * (2 if cfg.posterior == "gaussian" else 1) + n_classes
        self.latent_dim = cfg.latent_dim
        if cfg.arch == "conv":
            self.features, n_feat = conv_features(tuple(cfg.image_shape))
            self.net = mlp([n_feat + self.noise_dim, cfg.hidden, n_out], cfg.dropout)
        else:
            self.features = nn.Flatten()
            self.net = mlp([n_in, cfg.hidden, cfg.hidden, n_out], cfg.dropout)  # linear last layer, as in the paper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Samples z ~ q(z|x) in training mode; the deterministic code in eval mode."""
        return self.codes(x)[0]

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z (B, latent_dim), class logits (B, n_classes) or None)."""
        h = self.features(x)  # (B, F)
        if self.noise_dim:
            if self.training:
                noise = torch.randn(h.shape[0], self.noise_dim, device=h.device, dtype=h.dtype)
            else:  # zeros shaped from h itself: a traced graph keeps a dynamic batch axis
                noise = (h[:, :1] * 0).expand(-1, self.noise_dim)
            h = torch.cat([h, noise], dim=1)
        out = self.net(h)
        logits = None
        if self.n_classes:
            out, logits = out[:, : -self.n_classes], out[:, -self.n_classes :]
        if self.posterior != "gaussian":
            return out, logits
        mean, log_var = out.chunk(2, dim=1)
        if not self.training:
            return mean, logits
        return mean + torch.randn_like(mean) * torch.exp(0.5 * log_var.clamp(-20, 10)), logits


class Decoder(nn.Module):
    """Latent codes (B, latent_dim) -> images (B, C, H, W) in [0, 1] (sigmoid output).

    With ``n_classes`` > 0 the decoder is conditional: it also takes a label vector (B, n_classes),
    one-hot or class probabilities, concatenated to the code (the supervised and semi-supervised
    AAEs: the label carries the class, the code the style)."""

    def __init__(self, cfg: ModelConfig, n_classes: int = 0):
        super().__init__()
        self.image_shape = tuple(cfg.image_shape)
        self.n_classes = n_classes
        n_in = cfg.latent_dim + n_classes
        if cfg.arch == "conv":
            self.upsample = ConvUpsampler(self.image_shape)
            self.net = nn.Sequential(mlp([n_in, cfg.hidden, self.upsample.n_features], cfg.dropout), nn.ReLU())
        else:
            self.upsample = nn.Identity()
            self.net = mlp([n_in, cfg.hidden, cfg.hidden, math.prod(cfg.image_shape)], cfg.dropout)

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.n_classes:
            z = torch.cat([z, label], dim=1)
        return torch.sigmoid(self.upsample(self.net(z))).view(-1, *self.image_shape)


class Discriminator(nn.Module):
    """Codes (B, n_in) -> logits (B, 1): high for prior samples (real), low for codes (fake).
    ``n_in``: the latent size (the default), or the number of classes for a categorical code."""

    def __init__(self, cfg: ModelConfig, n_in: int | None = None):
        super().__init__()
        self.net = mlp([n_in or cfg.latent_dim, cfg.hidden, cfg.hidden, 1], cfg.disc_dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


SEGMENTER_LEVELS = 3  # halvings of the segmenter's U-Net: tiles must be multiples of 2**3


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3 x 3 convolutions, each with group normalisation (batch-size independent: the same in
    training and at inference) and ReLU."""
    groups = math.gcd(4, c_out)
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU())


class Segmenter(nn.Module):
    """A small U-Net: images (B, c_in, H, W) -> logits (B, 1, H, W) that a pixel belongs to a defect
    (the draem family). ``width`` channels at full resolution, doubled at each of
    SEGMENTER_LEVELS halvings (at most 4 x width); skip connections keep the map sharp."""

    def __init__(self, c_in: int, width: int = 16):
        super().__init__()
        widths = [width * min(2**i, 4) for i in range(SEGMENTER_LEVELS + 1)]
        self.down = nn.ModuleList([_double_conv(c_in, widths[0])] +
                                  [_double_conv(widths[i], widths[i + 1]) for i in range(SEGMENTER_LEVELS)])
        self.up = nn.ModuleList([_double_conv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(SEGMENTER_LEVELS))])
        self.out = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = block(torch.cat([nn.functional.interpolate(x, size=skip.shape[2:], mode="nearest"), skip], dim=1))
        return self.out(x)


def build_models(cfg: ModelConfig) -> tuple[Encoder, Decoder, Discriminator]:
    return Encoder(cfg), Decoder(cfg), Discriminator(cfg)
