"""The regularisation phase every adversarial family shares, and the prior-match figure.

A discriminator learns prior samples = real (1) and encoder codes = fake (0); then the encoder,
as generator, is updated so that the discriminator calls its codes real. The stabilisers
(one-sided label smoothing, instance noise, several D steps, the R1 penalty) are the options of
`TrainConfig`; a family with two codes (semi-supervised: style and class) runs this per code.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F

from aae_train.config import TrainConfig

MMD_SAMPLES = 1000  # validation codes and prior samples compared per epoch


def disc_input(z: torch.Tensor, std: float) -> torch.Tensor:
    """Instance noise on D's inputs (a stabiliser): blurs both distributions so D cannot win outright."""
    return z + std * torch.randn_like(z) if std > 0 else z


def discriminator_phase(disc: torch.nn.Module, opt: torch.optim.Optimizer, z_fake: torch.Tensor,
                        real: Sequence[torch.Tensor], t: TrainConfig, noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """An update of ``disc`` for each batch of prior draws in ``real`` (``t.disc_steps`` of them)
    against the (detached) codes ``z_fake``; returns the last update's (loss, accuracy).
    ``noise``: apply ``t.disc_noise``."""
    std = t.disc_noise if noise else 0.0
    real_target = 1.0 - t.label_smoothing  # one-sided: only the prior's targets are smoothed
    for drawn in real:
        # detached: the draw may be a CUDA graph's input buffer, which must not itself require grad
        d_real = disc_input(drawn, std).detach().requires_grad_(t.gradient_penalty > 0)
        if draws_masks(disc):  # a pass per batch, masks and the fakes' noise drawn in the order they always were
            logits_real = disc(d_real)
            logits_fake = disc(disc_input(z_fake, std))
        else:
            logits_real, logits_fake = stacked(disc, d_real, disc_input(z_fake, std))
        d_loss = F.binary_cross_entropy_with_logits(logits_real, torch.full_like(logits_real, real_target)) + \
            F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
        if t.gradient_penalty > 0:
            d_loss = d_loss + t.gradient_penalty / 2 * r1_penalty(logits_real, d_real)
        opt.zero_grad(set_to_none=True)
        d_loss.backward()
        opt.step()
    d_acc = 0.5 * ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean())
    return d_loss.detach(), d_acc.detach()


def draws_masks(net: torch.nn.Module) -> bool:
    """Whether ``net`` draws random dropout masks in training mode."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in net.modules())


def stacked(disc: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """D's logits of both batches from one pass over the two stacked. D treats rows independently,
    so it is the same function, with multiplications twice as tall and no gradients to sum
    afterwards (a step of the paper's MLP ~10 % faster). Only for a D without dropout: with it, a
    pass per batch draws the masks as runs always did, so those runs reproduce."""
    logits = disc(torch.cat([real, fake]))
    return logits[: len(real)], logits[len(real):]


def generator_loss(disc: torch.nn.Module, z: torch.Tensor, t: TrainConfig, noise: bool = True) -> torch.Tensor:
    """The encoder's loss as generator: D should call its codes real. Its backward reaches the
    encoder through D but computes no gradients for D's own weights: D's next update starts
    from zero (`discriminator_phase`), so they would be thrown away (skipping them makes a step
    of the paper's MLP ~9 % faster, and changes no result)."""
    with without_weight_gradients(disc):
        logits = disc(disc_input(z, t.disc_noise if noise else 0.0))
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


@contextlib.contextmanager
def without_weight_gradients(net: torch.nn.Module):
    """Within: graphs built through ``net`` need no gradients for its parameters (their flags are
    read when the graph is built, so a later backward skips them); after: the flags as they were."""
    flags = [(p, p.requires_grad) for p in net.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def r1_penalty(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Mean squared norm of D's gradient at its real inputs (R1, Mescheder et al. 2018): keeps D
    flat where the prior is, so it cannot sharpen into a cliff that gives the encoder no usable
    gradient. Differentiable, so D's update minimises it."""
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad.square().sum(1).mean()


def mmd2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Unbiased MMD^2 between samples ``a`` (N, D) and ``b`` (M, D), RBF kernels over several widths.

    Widths are multiples of the median distance between prior samples ``b``, so the figure is
    comparable across priors of any scale: 0 when codes match the prior, larger the worse.
    """
    ab = torch.cat([a, b])
    d2 = torch.cdist(ab, ab).square()
    n, m = len(a), len(b)
    median = torch.cdist(b, b).median().clamp_min(1e-12)
    k = sum(torch.exp(-d2 / (2 * (s * median) ** 2)) for s in (0.25, 0.5, 1.0, 2.0))
    kaa, kbb, kab = k[:n, :n], k[n:, n:], k[:n, n:]
    term_a = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
    term_b = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return float(term_a + term_b - 2 * kab.mean())
