"""The supervised AAE (paper section 4): the decoder gets the one-hot label beside the code, so
the code is free to carry the style alone; the code is pushed to the prior as in the AAE.

Generated images are asked for by label (`aae-run sample --label 7`); an image is scored with
the label that reconstructs it best (the fused scorer tries every label in one call).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from aae_runtime.contract.metadata import BEST_LABEL_OUTPUT, IMAGE_INPUT, LABEL_INPUT, LATENT_INPUT, LATENT_OUTPUT, \
    PIXEL_ERROR_OUTPUT, RECONSTRUCTION_ERROR_OUTPUT, RECONSTRUCTION_OUTPUT
from aae_runtime.contract.priors import sample_prior
from aae_train.config import RunConfig
from aae_train.data import DataError, class_labels
from aae_train.families.aae import AAEFamily
from aae_train.families.base import Batch, GraphSpec
from aae_train.graphs import BestLabelScorer
from aae_train.models import Decoder, Discriminator, Encoder


@dataclass(frozen=True)
class SupervisedOptions:
    classes: tuple[str, ...] | None = None  # the class values, in label order (set from the data: digits or folder names)


class SupervisedFamily(AAEFamily):
    name = "supervised"
    options_class = SupervisedOptions
    uses_labels = True
    allows_unlabelled = False

    @classmethod
    def configure(cls, cfg: RunConfig, data) -> RunConfig:
        classes, train_y, val_y = class_labels(data)
        if classes is None or len(classes) < 2:
            raise DataError(f"--family {cls.name} needs images of at least two classes (MNIST digits, or one "
                            f"sub-folder per class); this data has {'only ' + repr(str(classes[0])) if classes else 'none'}")
        unlabelled = int((train_y < 0).sum() + (val_y < 0).sum())
        if not cls.allows_unlabelled and unlabelled:
            raise DataError(f"--family {cls.name} needs a label for every image: {unlabelled} images are outside the "
                            "class sub-folders; move them into one, or use --family semi")
        empty = [name for k, name in enumerate(classes) if not (train_y == k).any()]
        if empty:  # the decoder would never see the label, yet sample --label would draw it
            raise DataError(f"--family {cls.name}: class {str(empty[0])!r} has no training image (its folder holds none "
                            "that could be read, or its only ones were held out for validation): add images to it, "
                            "or remove its folder")
        return cfg.replace(options=cls.options_class(**{**vars(cfg.options), "classes": classes}))

    @classmethod
    def n_classes(cls, cfg: RunConfig) -> int:
        return len(cfg.options.classes)

    @classmethod
    def networks(cls, cfg: RunConfig) -> dict[str, torch.nn.Module]:
        k = cls.n_classes(cfg)
        return {"encoder": Encoder(cfg.model), "decoder": Decoder(cfg.model, n_classes=k), "discriminator": Discriminator(cfg.model)}

    def one_hot(self, y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.n_classes(self.cfg)).to(torch.float32)

    def decoder_label(self, batch: Batch) -> torch.Tensor:
        return self.one_hot(batch.y)  # the step is the AAE's, with the label into the decoder

    def reconstruct(self, model, x: torch.Tensor, y: torch.Tensor | None):
        z = model["encoder"](x)
        return z, model["decoder"](z, self.one_hot(y.clamp_min(0)))

    def sample_images(self, model, n: int, codes: np.ndarray) -> torch.Tensor:
        """The paper's figure: each row one style code, each column one label."""
        k = self.n_classes(self.cfg)
        rows = max(1, n // k)
        z = torch.from_numpy(sample_prior(self.cfg.model.prior, rows, np.random.default_rng(0))).to(self.device)
        labels = torch.arange(k, device=self.device).repeat(rows)
        return model["decoder"](z.repeat_interleave(k, dim=0), self.one_hot(labels))

    @classmethod
    def graphs(cls, cfg: RunConfig, model, pixel_error: str | None) -> list[GraphSpec]:
        enc, dec, k = model["encoder"], model["decoder"], cls.n_classes(cfg)

        def decoder_inputs(x):
            return enc(x), F.one_hot(torch.arange(len(x)) % k, k).to(torch.float32)

        specs = [GraphSpec("encoder", enc, (IMAGE_INPUT,), (LATENT_OUTPUT,), lambda x: (x,)),
                 GraphSpec("decoder", dec, (LATENT_INPUT, LABEL_INPUT), (RECONSTRUCTION_OUTPUT,), decoder_inputs)]
        if pixel_error:
            specs.append(GraphSpec("scorer", BestLabelScorer(enc, dec, pixel_error, k), (IMAGE_INPUT,),
                                   (LATENT_OUTPUT, PIXEL_ERROR_OUTPUT, RECONSTRUCTION_ERROR_OUTPUT, BEST_LABEL_OUTPUT),
                                   lambda x: (x,)))
        return specs

    @classmethod
    def metadata(cls, cfg: RunConfig) -> dict:
        return {"classes": list(cfg.options.classes)}


FAMILY = SupervisedFamily
