"""The AAE training loop: per minibatch a reconstruction phase, then a regularisation phase.

Regularisation: the discriminator learns prior samples = real (1) and encoder codes = fake (0);
then the encoder, as generator, is updated so that D calls its codes real.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from aae_runtime import __version__
from aae_runtime.contract.errors import AAEError
from aae_runtime.contract.fileio import atomic_write_text, remove_stale_temporaries
from aae_runtime.images import save_grid
from aae_runtime.contract.priors import sample_prior
from aae_train.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from aae_train.config import RunConfig
from aae_train.data import Dataset, load_dataset
from aae_train.models import build_models
from aae_train.plots import LATENT_NAME, LOSS_CURVES_NAME, RECONSTRUCTIONS_NAME, SAMPLES_NAME, plot_latent, plot_losses

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
RUN_FILES = (CONFIG_NAME, METRICS_NAME, CHECKPOINT_NAME, LOSS_CURVES_NAME, LATENT_NAME, SAMPLES_NAME, RECONSTRUCTIONS_NAME)
LATENT_PLOT_POINTS = 2000  # held-out codes drawn in latent.png


MMD_SAMPLES = 1000  # validation codes and prior samples compared per epoch


def lr_factor(schedule: str, epoch: int, epochs: int, min_factor: float) -> float:
    """Learning-rate multiplier for 0-based ``epoch`` of ``epochs``."""
    if schedule == "cosine":
        progress = epoch / max(1, epochs - 1)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return min_factor ** sum(epoch >= m for m in (epochs // 2, (3 * epochs) // 4) if m > 0)
    return 1.0


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


class TrainingError(AAEError):
    """Training cannot go on (e.g. the loss diverged); nothing broken was saved."""


@dataclass
class StepLosses:
    recon: float
    disc: float
    disc_acc: float
    gen: float


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: PyTorch sees no CUDA GPU here; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class Trainer:
    """Holds the models, optimisers, data (on the training device) and RNG streams of one run."""

    def __init__(self, cfg: RunConfig, data: Dataset):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        torch.manual_seed(cfg.train.seed)
        self.encoder, self.decoder, self.discriminator = (m.to(self.device) for m in build_models(cfg.model))
        t = cfg.train
        self.opt_recon = torch.optim.Adam([*self.encoder.parameters(), *self.decoder.parameters()], lr=t.lr_recon)
        self.opt_disc = torch.optim.Adam(self.discriminator.parameters(), lr=t.lr_disc, betas=(0.5, 0.999))
        self.opt_gen = torch.optim.Adam(self.encoder.parameters(), lr=t.lr_gen, betas=(0.5, 0.999))
        # The whole data set lives on the training device: no loader can stall a GPU.
        self.train_x = torch.from_numpy(data.train).to(self.device)
        self.val_x = torch.from_numpy(data.val).to(self.device)
        self.val_labels = data.val_labels
        self.class_names = data.class_names
        self.notes = data.notes  # one-line messages for the user (e.g. skipped files)
        self.shuffle = torch.Generator().manual_seed(t.seed + 1)
        self.prior_rng = np.random.default_rng(t.seed + 2)
        self.epoch = 0  # epochs completed
        self.history: list[dict] = []
        # With --ema, averaged copies of encoder and decoder are the model: evaluated, plotted,
        # checkpointed as "encoder"/"decoder" and so exported; the trained weights ride along for resume.
        self.ema = {"encoder": _frozen_copy(self.encoder), "decoder": _frozen_copy(self.decoder)} if t.ema > 0 else None
        self.ema_updates = 0
        if self.ema is not None:  # (averages, trained weights), in the same order; load_state_dict keeps the objects
            self._ema_params = ([*self.ema["encoder"].parameters(), *self.ema["decoder"].parameters()],
                                [*self.encoder.parameters(), *self.decoder.parameters()])

    @property
    def model(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(encoder, decoder) as evaluated and saved: the moving averages with --ema, else the trained ones."""
        if self.ema is not None:
            return self.ema["encoder"], self.ema["decoder"]
        return self.encoder, self.decoder

    @torch.no_grad()
    def update_ema(self) -> None:
        """Move the averages towards the current weights; the decay ramps up over the first updates
        ((1 + n) / (10 + n)) so that the averages do not remember the random initialisation."""
        self.ema_updates += 1
        decay = min(self.cfg.train.ema, (1 + self.ema_updates) / (10 + self.ema_updates))
        torch._foreach_lerp_(*self._ema_params, 1.0 - decay)

    # -- one minibatch --------------------------------------------------------------------------
    def disc_input(self, z: torch.Tensor) -> torch.Tensor:
        """Instance noise on D's inputs (a stabiliser): blurs both distributions so D cannot win outright."""
        std = self.cfg.train.disc_noise
        return z + std * torch.randn_like(z) if std > 0 else z

    def recon_loss(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.train.recon_loss == "bce":
            return F.binary_cross_entropy(recon, x)
        return F.mse_loss(recon, x)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One minibatch of both phases; returns (4,) losses: recon, disc, disc accuracy, gen."""
        enc, dec, disc, t = self.encoder, self.decoder, self.discriminator, self.cfg.train
        # Reconstruction phase: encoder + decoder (optionally from noisy codes, so that the decoder
        # also learns the space between the codes of training images, where prior samples land).
        z = enc(x)
        recon = self.recon_loss(dec(z + t.code_noise * torch.randn_like(z) if t.code_noise > 0 else z), x)
        self.opt_recon.zero_grad(set_to_none=True)
        recon.backward()
        self.opt_recon.step()
        # Regularisation phase, 1: the discriminator; prior samples are real, codes are fake.
        z_fake = enc(x).detach()
        real_target = 1.0 - t.label_smoothing  # one-sided: only the prior's targets are smoothed
        for _ in range(t.disc_steps):
            z_real = torch.from_numpy(sample_prior(self.cfg.model.prior, len(x), self.prior_rng)).to(self.device)
            d_real = self.disc_input(z_real).requires_grad_(t.gradient_penalty > 0)
            logits_real, logits_fake = disc(d_real), disc(self.disc_input(z_fake))
            d_loss = F.binary_cross_entropy_with_logits(logits_real, torch.full_like(logits_real, real_target)) + \
                F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
            if t.gradient_penalty > 0:
                d_loss = d_loss + t.gradient_penalty / 2 * r1_penalty(logits_real, d_real)
            self.opt_disc.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_disc.step()
        d_acc = 0.5 * ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean())
        # Regularisation phase, 2: the encoder as generator, trying to make D call its codes real.
        logits_gen = disc(self.disc_input(enc(x)))
        g_loss = F.binary_cross_entropy_with_logits(logits_gen, torch.ones_like(logits_gen))
        self.opt_gen.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_gen.step()
        if self.ema is not None:
            self.update_ema()
        return torch.stack([recon.detach(), d_loss.detach(), d_acc.detach(), g_loss.detach()])

    # -- one epoch ------------------------------------------------------------------------------
    def set_learning_rates(self) -> float:
        """Apply the schedule for the coming epoch (a function of the epoch alone, so resume agrees)."""
        t = self.cfg.train
        factor = lr_factor(t.lr_schedule, self.epoch, t.epochs, t.lr_min_factor)
        for opt, base in ((self.opt_recon, t.lr_recon), (self.opt_disc, t.lr_disc), (self.opt_gen, t.lr_gen)):
            for group in opt.param_groups:
                group["lr"] = base * factor
        return factor

    def train_epoch(self, on_step: Callable[[int, int, StepLosses], None] | None = None) -> dict:
        for m in (self.encoder, self.decoder, self.discriminator):
            m.train()
        factor = self.set_learning_rates()
        bs = self.cfg.train.batch_size
        n = len(self.train_x)
        order = torch.randperm(n, generator=self.shuffle).to(self.device)
        steps = max(1, n // bs)  # drop the last partial batch: D sees equal real and fake counts
        start = time.perf_counter()
        total = torch.zeros(4, device=self.device)
        for i in range(steps):
            try:
                total += self.step(self.train_x[order[i * bs : (i + 1) * bs]])
            except RuntimeError:  # e.g. BCE refusing a NaN reconstruction once the weights diverged
                if self.weights_finite():
                    raise
                raise TrainingError(f"the weights became NaN or infinite in epoch {self.epoch + 1}, step {i + 1}/{steps}; "
                                    "nothing was saved for this epoch: lower the learning rates and --resume or retrain") from None
            if on_step and (i % 10 == 9 or i == steps - 1):
                on_step(i + 1, steps, StepLosses(*(total / (i + 1)).tolist()))
        means = (total / steps).tolist()
        if not all(math.isfinite(v) for v in means) or not self.weights_finite():
            raise TrainingError(
                f"loss became NaN or infinite in epoch {self.epoch + 1} (recon {means[0]:.3g}, disc {means[1]:.3g}, "
                f"gen {means[3]:.3g}); nothing was saved for this epoch: lower the learning rates and --resume or retrain"
            )
        self.epoch += 1
        metrics = {
            "epoch": self.epoch,
            "recon_loss": means[0],
            "disc_loss": means[1],
            "disc_acc": means[2],
            "gen_loss": means[3],
            "lr_factor": round(factor, 6),
            **self.evaluate(),
            "seconds": round(time.perf_counter() - start, 3),
        }
        self.history.append(metrics)
        return metrics

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """No NaN or infinite parameter: checked before every checkpoint, so none holds a broken model."""
        return all(bool(torch.isfinite(p).all()) for m in (self.encoder, self.decoder, self.discriminator) for p in m.parameters())

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation reconstruction loss and how the codes of validation images match the prior."""
        encoder, decoder = (net.eval() for net in self.model)
        z = torch.cat([encoder(b) for b in self.val_x.split(1000)])
        recon = torch.cat([decoder(b) for b in z.split(1000)])
        # Prior samples from their own seeded stream: evaluating never shifts the training RNGs.
        z_prior = torch.from_numpy(sample_prior(self.cfg.model.prior, min(len(z), MMD_SAMPLES), np.random.default_rng(self.epoch)))
        return {
            "val_recon_loss": float(self.recon_loss(recon, self.val_x)),
            "val_mse": float(F.mse_loss(recon, self.val_x)),
            "latent_mean": [round(v, 4) for v in z.mean(0).tolist()],
            "latent_std": [round(v, 4) for v in z.std(0).tolist()],
            "prior_mmd": round(mmd2(z[:MMD_SAMPLES].cpu().double(), z_prior.double()), 6),
        }

    # -- outputs --------------------------------------------------------------------------------
    @torch.no_grad()
    def write_plots(self, run_dir: Path, n: int = 64) -> None:
        """Loss curves, held-out codes coloured by label over prior samples, sample grid, reconstructions."""
        encoder, decoder = (net.eval() for net in self.model)
        z = torch.from_numpy(sample_prior(self.cfg.model.prior, n, np.random.default_rng(0))).to(self.device)
        save_grid(decoder(z).cpu().numpy(), run_dir / SAMPLES_NAME)
        x = self.val_x[: n // 2]
        pairs = torch.stack([x, decoder(encoder(x))], dim=1).flatten(0, 1)  # original, reconstruction, ...
        save_grid(pairs.cpu().numpy(), run_dir / RECONSTRUCTIONS_NAME, ncols=16)
        if self.history:
            plot_losses(self.history, run_dir / LOSS_CURVES_NAME)
        x = self.val_x[:LATENT_PLOT_POINTS]
        codes = torch.cat([encoder(b) for b in x.split(1000)]).cpu().numpy()
        labels = self.val_labels[: len(codes)] if self.val_labels is not None else None
        prior = sample_prior(self.cfg.model.prior, len(codes), np.random.default_rng(1))
        plot_latent(codes, labels, run_dir / LATENT_NAME, prior_samples=prior, class_names=self.class_names)

    def state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "shuffle": self.shuffle.get_state(), "prior": self.prior_rng.bit_generator.state}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        encoder, decoder = self.model
        state = {
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "package_version": __version__,
            "encoder": encoder.state_dict(),
            "decoder": decoder.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "optimizers": {"recon": self.opt_recon.state_dict(), "disc": self.opt_disc.state_dict(), "gen": self.opt_gen.state_dict()},
            "rng": rng,
            "history": self.history,
        }
        if self.ema is not None:
            state["trained"] = {"encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict(),
                                "ema_updates": self.ema_updates}
        return state

    def load_state(self, state: dict) -> None:
        trained = state.get("trained", state)
        self.encoder.load_state_dict(trained["encoder"])
        self.decoder.load_state_dict(trained["decoder"])
        if self.ema is not None:
            self.ema["encoder"].load_state_dict(state["encoder"])
            self.ema["decoder"].load_state_dict(state["decoder"])
            self.ema_updates = int(state["trained"]["ema_updates"]) if "trained" in state else 0
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_recon.load_state_dict(state["optimizers"]["recon"])
        self.opt_disc.load_state_dict(state["optimizers"]["disc"])
        self.opt_gen.load_state_dict(state["optimizers"]["gen"])
        torch.set_rng_state(state["rng"]["torch"])
        self.shuffle.set_state(state["rng"]["shuffle"])
        self.prior_rng.bit_generator.state = state["rng"]["prior"]
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    metrics: list[dict]
    device: str


def train(cfg: RunConfig, run_dir: str | Path, data_dir: str | None = None, resume: str | Path | None = None,
          on_epoch: Callable[[dict], None] | None = None, on_step=None, on_start=None, download_progress=None) -> TrainResult:
    """Train (or resume) an AAE, writing checkpoint, metrics and grids into ``run_dir``.

    With ``resume``, the checkpoint's config is used, except that ``cfg.train.epochs`` may
    extend the run; training goes on from the last completed epoch with its RNG states.
    """
    run_dir = Path(run_dir)
    state = None
    if resume is not None:
        state = load_checkpoint(resume)
        saved = RunConfig.from_dict(state["config"])
        cfg = saved.replace(train=replace(saved.train, epochs=cfg.train.epochs, device=cfg.train.device))
    data = load_dataset(cfg.data, data_dir, progress=download_progress)
    if tuple(data.preprocessing.shape) != tuple(cfg.model.image_shape):
        raise TrainingError(f"the model expects images of shape {tuple(cfg.model.image_shape)} but the data are "
                            f"{data.preprocessing.shape}: set image_shape to the data's (C, H, W)")
    cfg = cfg.replace(data=replace(cfg.data, path=data.path, preprocessing=data.preprocessing.to_dict()))
    trainer = Trainer(cfg, data)
    if state is not None:
        trainer.load_state(state)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries([run_dir / name for name in RUN_FILES])  # left by a run killed mid-write
    atomic_write_text(run_dir / CONFIG_NAME, json.dumps(cfg.to_dict(), indent=1) + "\n")
    metrics_path = run_dir / METRICS_NAME
    _rewrite_metrics(metrics_path, trainer.history)  # a resumed run drops epochs after its checkpoint
    if on_start:
        on_start(trainer, len(data.train), len(data.val))
    checkpoint = run_dir / CHECKPOINT_NAME
    while trainer.epoch < cfg.train.epochs:
        metrics = trainer.train_epoch(on_step)
        # Metrics first: every checkpointed epoch then has its line on disk, even when the process
        # dies between the two writes (a line ahead of the checkpoint is dropped on resume).
        with open(metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        save_checkpoint(trainer.state(), checkpoint)
        trainer.write_plots(run_dir)  # refreshed every epoch, so a run can be watched
        if on_epoch:
            on_epoch(metrics)
    if not checkpoint.exists():  # resumed at or past the requested epochs: still leave a checkpoint
        save_checkpoint(trainer.state(), checkpoint)
    trainer.write_plots(run_dir)
    return TrainResult(run_dir, checkpoint, trainer.history, str(trainer.device))


def _frozen_copy(net: torch.nn.Module) -> torch.nn.Module:
    averaged = copy.deepcopy(net)
    averaged.requires_grad_(False)
    return averaged


def r1_penalty(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Mean squared norm of D's gradient at its real inputs (R1, Mescheder et al. 2018): keeps D
    flat where the prior is, so it cannot sharpen into a cliff that gives the encoder no usable
    gradient. Differentiable, so D's update minimises it."""
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad.square().sum(1).mean()


def _rewrite_metrics(path: Path, history: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in history))
