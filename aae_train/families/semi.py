"""The semi-supervised AAE (paper section 5): the encoder outputs a categorical code y (softmax,
pushed to a one-hot categorical prior by its own discriminator) and a style code z (pushed to
the Gaussian prior by another); the decoder reconstructs from both. Per minibatch: the
reconstruction phase, the regularisation of both codes, and a supervised classification step on
a minibatch of the few labelled images.

The labelled images are a class-balanced subset of the training split drawn by ``label_seed``;
the others train unlabelled. The validation figure that picks the kept checkpoint (``best.pt``)
is the classification error on a labelled subset of the validation split, class-balanced as far
as the split allows and no larger than the labelled training set, so no choice sees more labels
than the run was given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from aae_runtime.contract.metadata import CLASS_OUTPUT, IMAGE_INPUT, LABEL_INPUT, LATENT_INPUT, LATENT_OUTPUT, \
    PIXEL_ERROR_OUTPUT, RECONSTRUCTION_ERROR_OUTPUT, RECONSTRUCTION_OUTPUT
from aae_train.config import RunConfig
from aae_train.data import DataError, balanced_subset, class_labels
from aae_train.families.adversary import discriminator_phase, generator_loss
from aae_train.families.base import Batch, GraphSpec, Streams
from aae_train.families.supervised import SupervisedFamily
from aae_train.graphs import ClassifyingEncoder, Scorer
from aae_train.models import Decoder, Discriminator, Encoder
from aae_train.streaming import MEMORY_SHARE, FolderImages, gib, usable_memory


@dataclass(frozen=True)
class SemiOptions:
    labels: int | None = 100  # labelled training images (class-balanced); None: every label
    label_seed: int = 0  # draws the labelled subset (and the labelled validation subset)
    lr_class: float = 1e-3  # Adam, encoder's class head and trunk, supervised classification step
    class_noise: float = 0.0  # std of Gaussian noise on the labelled images of the classification step (training only)
    classes: tuple[str, ...] | None = None  # the class values, in label order (set from the data)

    def __post_init__(self) -> None:
        if self.labels is not None and self.labels < 1:
            raise ValueError("labels must be a positive number of images, or all")
        if not self.lr_class >= 0:
            raise ValueError("lr_class must be >= 0")
        if not self.class_noise >= 0:
            raise ValueError("class_noise must be >= 0")


def labelled_split(cfg: RunConfig, data) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the labelled training images and of the labelled validation images."""
    classes, train_y, val_y = class_labels(data)
    k, n, seed = len(classes), cfg.options.labels, cfg.options.label_seed
    if n is None:
        return np.flatnonzero(train_y >= 0), np.flatnonzero(val_y >= 0)
    train = balanced_subset(train_y, n, k, seed, "--labels", "the training split", names=tuple(map(str, classes)))
    val = balanced_subset(val_y, n, k, seed + 1, "--labels", "the validation split", strict=False)
    return train, val


class SemiFamily(SupervisedFamily):
    name = "semi"
    options_class = SemiOptions
    loss_names = ("recon_loss", "disc_loss", "disc_acc", "cat_disc_loss", "cat_disc_acc", "gen_loss", "class_loss")
    allows_unlabelled = True
    selection = ("val_error", "min")
    extra_streams = ("labelled",)

    @classmethod
    def configure(cls, cfg: RunConfig, data) -> RunConfig:
        cfg = super().configure(cfg, data)
        _, val = labelled_split(cfg, data)  # refuses --labels the data cannot give, before any training
        if len(val) == 0:
            raise DataError("--family semi: the validation split holds no labelled image, so no checkpoint can be chosen; "
                            "put more labelled images in the class sub-folders or raise --val-fraction")
        return cfg

    @classmethod
    def networks(cls, cfg: RunConfig) -> dict[str, torch.nn.Module]:
        k = cls.n_classes(cfg)
        return {"encoder": Encoder(cfg.model, n_classes=k), "decoder": Decoder(cfg.model, n_classes=k),
                "discriminator": Discriminator(cfg.model), "cat_discriminator": Discriminator(cfg.model, n_in=k)}

    def optimizers(self):
        t, n, o = self.cfg.train, self.nets, self.cfg.options
        adam = self.adam
        return {
            "recon": (adam([*n["encoder"].parameters(), *n["decoder"].parameters()], lr=t.lr_recon), t.lr_recon),
            "disc": (adam(n["discriminator"].parameters(), lr=t.lr_disc, betas=(0.5, 0.999)), t.lr_disc),
            "cat_disc": (adam(n["cat_discriminator"].parameters(), lr=t.lr_disc, betas=(0.5, 0.999)), t.lr_disc),
            "gen": (adam(n["encoder"].parameters(), lr=t.lr_gen, betas=(0.5, 0.999)), t.lr_gen),
            "classify": (adam(n["encoder"].parameters(), lr=o.lr_class), o.lr_class),
        }

    def prepare(self, data, streams: Streams) -> None:
        super().prepare(data, streams)
        train_idx, val_idx = labelled_split(self.cfg, data)
        _, train_y, val_y = class_labels(data)
        if isinstance(data.train, FolderImages):  # the labelled pool is held in memory, also from a streamed folder
            size = len(train_idx) * data.train.nbytes() // max(1, len(data.train))
            if size > MEMORY_SHARE * usable_memory():
                raise DataError(f"--family semi holds its labelled images in memory, and the {len(train_idx)} of this folder "
                                f"would take {gib(size)}, more than a quarter of the memory this process may use: "
                                "give --labels N to use N of them (e.g. --labels 1000)")
        self.labelled_x = torch.from_numpy(data.train[train_idx]).to(self.device)
        self.labelled_y = torch.from_numpy(train_y[train_idx]).to(self.device)
        self.val_idx = torch.from_numpy(val_idx).to(self.device)
        self.train_idx = train_idx

    def training_labels(self, train_y: np.ndarray | None) -> np.ndarray | None:
        visible = np.full_like(train_y, -1)  # the step sees the labels of its labelled subset only
        visible[self.train_idx] = train_y[self.train_idx]
        return visible

    def host_draws(self, n: int) -> list[np.ndarray]:
        """Style-prior draws for each update of the style discriminator, class draws from the
        uniform categorical prior (the same stream) for each of the class discriminator's, then
        which labelled images the classification phase takes."""
        k, steps = self.n_classes(self.cfg), self.cfg.train.disc_steps
        style = super().host_draws(n)
        classes = [self.streams.prior.integers(0, k, size=n) for _ in range(steps)]
        pick = torch.randint(len(self.labelled_x), (min(n, len(self.labelled_x)),), generator=self.streams.extra["labelled"])
        return [*style, *classes, pick.numpy()]

    def step(self, batch: Batch, draws: list[torch.Tensor]) -> torch.Tensor:
        enc, dec, t, opt = self.nets["encoder"], self.nets["decoder"], self.cfg.train, self.opt
        x = batch.x
        steps = t.disc_steps
        style, classes, pick = draws[:steps], [self.one_hot(c) for c in draws[steps : 2 * steps]], draws[-1]
        # Reconstruction phase, from both codes.
        z, logits = enc.codes(x)
        recon = self.recon_loss(dec(self.with_code_noise(z), torch.softmax(logits, dim=1)), x)
        opt["recon"].zero_grad(set_to_none=True)
        recon.backward()
        opt["recon"].step()
        # Regularisation phase: one discriminator per code, then the encoder fools both (from
        # the same pass as the fakes when the encoder draws no randomness, as in the AAE family).
        if self.encoder_draws_noise:
            with torch.no_grad():
                z_fake, logits_fake = enc.codes(x)
        else:
            z, logits = enc.codes(x)
            z_fake, logits_fake = z.detach(), logits.detach()
        d_loss, d_acc = discriminator_phase(self.nets["discriminator"], opt["disc"], z_fake, style, t)
        c_loss, c_acc = discriminator_phase(self.nets["cat_discriminator"], opt["cat_disc"], torch.softmax(logits_fake, 1),
                                            classes, t, noise=False)
        if self.encoder_draws_noise:
            z, logits = enc.codes(x)
        g_loss = generator_loss(self.nets["discriminator"], z, t) + \
            generator_loss(self.nets["cat_discriminator"], torch.softmax(logits, dim=1), t, noise=False)
        opt["gen"].zero_grad(set_to_none=True)
        g_loss.backward()
        opt["gen"].step()
        # Semi-supervised classification phase, on a minibatch of the labelled images.
        xl = self.labelled_x[pick]
        if self.cfg.options.class_noise > 0:  # a few labels are memorised at once; noise makes each pass new
            xl = xl + self.cfg.options.class_noise * torch.randn_like(xl)
        class_loss = F.cross_entropy(enc.codes(xl)[1], self.labelled_y[pick])
        opt["classify"].zero_grad(set_to_none=True)
        class_loss.backward()
        opt["classify"].step()
        return torch.stack([recon.detach(), d_loss, d_acc, c_loss, c_acc, g_loss.detach(), class_loss.detach()])

    def reconstruct(self, model, x: torch.Tensor, y: torch.Tensor | None):
        z, logits = model["encoder"].codes(x)
        return z, model["decoder"](z, torch.softmax(logits, dim=1))

    def start_validation(self) -> None:
        super().start_validation()
        self._val_logits: list[torch.Tensor] = []  # of the labelled validation images, in order
        self._val_y: list[torch.Tensor] = []

    def observe_validation(self, model, batch: Batch, z: torch.Tensor, start: int) -> None:
        super().observe_validation(model, batch, z, start)
        inside = self.val_idx[(self.val_idx >= start) & (self.val_idx < start + len(batch.x))] - start
        if len(inside):
            self._val_logits.append(model["encoder"].codes(batch.x[inside])[1])
            self._val_y.append(batch.y[inside])

    def validation_figures(self, epoch: int) -> dict:
        figures = super().validation_figures(epoch)
        logits, y = torch.cat(self._val_logits), torch.cat(self._val_y)
        figures["val_error"] = round(float((logits.argmax(1) != y).float().mean()), 6)
        figures["val_class_nll"] = round(float(F.cross_entropy(logits, y)), 6)
        figures["val_labelled"] = int(len(y))
        return figures

    @classmethod
    def graphs(cls, cfg: RunConfig, model, pixel_error: str | None) -> list[GraphSpec]:
        enc, dec = model["encoder"], model["decoder"]
        head = ClassifyingEncoder(enc)
        specs = [GraphSpec("encoder", head, (IMAGE_INPUT,), (LATENT_OUTPUT, CLASS_OUTPUT), lambda x: (x,)),
                 GraphSpec("decoder", dec, (LATENT_INPUT, LABEL_INPUT), (RECONSTRUCTION_OUTPUT,), lambda x: head(x))]
        if pixel_error:
            specs.append(GraphSpec("scorer", Scorer(enc, dec, pixel_error, classifies=True), (IMAGE_INPUT,),
                                   (LATENT_OUTPUT, PIXEL_ERROR_OUTPUT, RECONSTRUCTION_ERROR_OUTPUT, CLASS_OUTPUT),
                                   lambda x: (x,)))
        return specs


FAMILY = SemiFamily
