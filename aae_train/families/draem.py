"""Reconstruction and segmentation trained on synthetic defects (after DRAEM, Zavrtanik et al.
2021): the autoencoder for photos whose texture it cannot reproduce.

On a stochastic texture (grass, gravel, fabric) no small code reconstructs the detail, so the
reconstruction error is high everywhere and a defect does not stand out (README, "Defects on
real texture photographs"). This family learns *where* a crop departs from normal instead:

- each training crop gets, with probability ``defect_share``, one synthetic defect
  (`aae_train.anomalies`: smooth random shapes filled with another place of the material,
  a blur, a flat level or a change of intensity), and its mask;
- the autoencoder (encoder + decoder, as the ``ae`` family's) learns to give back the crop
  *without* the defect;
- a small U-Net (``segmenter``) sees the crop beside that reconstruction (``segment_input``
  "image+reconstruction"; or the crop alone, "image") and learns the defect's mask.

The model's per-pixel map is the segmenter's probability that a pixel belongs to a defect
(pixel error ``segment``), so the exported scorer graph computes it (metadata ``requires``
"segmentation": a runtime must run that graph). Photos are tiled as for every model trained
on crops; ``--crop`` is required. The checkpoint kept (``best.pt``) has the lowest segmentation
loss on synthetic defects made on the held-out crops (a fixed draw, the same every epoch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from aae_runtime.contract.metadata import IMAGE_INPUT, LATENT_OUTPUT, PIXEL_ERROR_OUTPUT, RECONSTRUCTION_ERROR_OUTPUT
from aae_runtime.contract.preprocessing import Preprocessing
from aae_runtime.contract.scores import SEGMENT
from aae_train import anomalies
from aae_train.config import RunConfig
from aae_train.data import DataError
from aae_train.families.ae import AEFamily
from aae_train.families.base import Batch, GraphSpec
from aae_train.graphs import SegmentScorer
from aae_train.models import SEGMENTER_LEVELS, Decoder, Encoder, Segmenter
from aae_train.speed import float32_loss

WITH_RECONSTRUCTION = "image+reconstruction"  # DRAEM's design: the crop beside the autoencoder's reconstruction
SEGMENT_INPUTS = (WITH_RECONSTRUCTION, "image")
VALIDATION_SEED = 20211  # the held-out crops' synthetic defects: one fixed draw, comparable across epochs


@dataclass(frozen=True)
class DraemOptions:
    defect_share: float = 0.5  # share of training crops that get a synthetic defect
    segment_width: int = 16  # the segmenter's channels at full resolution
    segment_input: str = WITH_RECONSTRUCTION  # what the segmenter sees: SEGMENT_INPUTS
    lr_segment: float = 1e-3  # Adam, the segmenter

    def __post_init__(self) -> None:
        if not 0.0 < self.defect_share < 1.0:
            raise ValueError("--defect-share must be between 0 and 1 (a share of crops with and without a defect)")
        if not 4 <= self.segment_width <= 256:
            raise ValueError("--segment-width must be 4 to 256 channels")
        if self.segment_input not in SEGMENT_INPUTS:
            raise ValueError(f"unknown segment input {self.segment_input!r}; choose one of {', '.join(SEGMENT_INPUTS)}")
        if not self.lr_segment > 0:
            raise ValueError("--lr-segment must be > 0")


class DraemFamily(AEFamily):
    name = "draem"
    options_class = DraemOptions
    loss_names = ("recon_loss", "segment_loss")
    selection = ("val_segment_loss", "min")
    model_networks = ("encoder", "decoder", "segmenter")
    default_score = SEGMENT

    @classmethod
    def configure(cls, cfg: RunConfig, data) -> RunConfig:
        if not cfg.data.crop:
            raise DataError("--family draem learns defect maps of whole photos: train on crops (aae-train folder DIR --crop 64)")
        step = 2**SEGMENTER_LEVELS
        least = step * (anomalies.BLUR_REACH // step + 1)
        if cfg.data.crop % step or cfg.data.crop < least:
            raise DataError(f"--family draem: --crop {cfg.data.crop} is not a multiple of {step} of at least {least} (the "
                            f"segmenter halves the crop {SEGMENTER_LEVELS} times, synthetic blurs reach "
                            f"{anomalies.BLUR_REACH} pixels): choose e.g. --crop {max(least, cfg.data.crop // step * step)}")
        return cfg

    @classmethod
    def networks(cls, cfg: RunConfig) -> dict[str, torch.nn.Module]:
        o, channels = cfg.options, cfg.model.image_shape[0]
        c_in = channels * (2 if o.segment_input == WITH_RECONSTRUCTION else 1)
        return {"encoder": Encoder(cfg.model), "decoder": Decoder(cfg.model), "segmenter": Segmenter(c_in, o.segment_width)}

    def optimizers(self):
        t, n, o = self.cfg.train, self.nets, self.cfg.options
        return {"recon": (self.adam([*n["encoder"].parameters(), *n["decoder"].parameters()], lr=t.lr_recon), t.lr_recon),
                "segment": (self.adam(n["segmenter"].parameters(), lr=o.lr_segment), o.lr_segment)}

    @property
    def value_range(self) -> tuple[float, float]:
        """(lowest, highest) model input (what pixels 0 and 255 become): synthetic defects stay inside it."""
        low, high = sorted(Preprocessing.from_dict(self.cfg.data.preprocessing).pixel_range)
        return low, high

    def host_draws(self, n: int) -> list[np.ndarray]:
        return anomalies.draw(n, self.streams.prior)

    def with_defects(self, x: torch.Tensor, draws: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Crops with synthetic defects and their masks, made in float32 whatever --precision (the
        training data must not depend on it; autocast off)."""
        low, high = self.value_range
        with float32_loss(x.device):
            return anomalies.synthesize(x.float(), draws, self.cfg.options.defect_share, low, high)

    def step(self, batch: Batch, draws: list[torch.Tensor]) -> torch.Tensor:
        enc, dec, seg, opt = self.nets["encoder"], self.nets["decoder"], self.nets["segmenter"], self.opt
        clean = batch.x
        x, mask = self.with_defects(clean, draws)
        # Reconstruction: the crop as it was before its defect.
        recon = dec(self.with_code_noise(enc(x)))
        recon_loss = self.recon_loss(recon, clean)
        opt["recon"].zero_grad(set_to_none=True)
        recon_loss.backward()
        opt["recon"].step()
        # Segmentation: where the defect is, from the crop (and the reconstruction, held fixed).
        segment_loss = self.segment_loss(seg(self.segment_input(x, recon.detach())), mask)
        opt["segment"].zero_grad(set_to_none=True)
        segment_loss.backward()
        opt["segment"].step()
        return torch.stack([recon_loss.detach(), segment_loss.detach()])

    def segment_input(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, recon], dim=1) if self.cfg.options.segment_input == WITH_RECONSTRUCTION else x

    @staticmethod
    def segment_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy per pixel plus the soft Dice loss of the batch: the cross-entropy
        alone is won by calling every pixel normal, defects being a few per cent of them."""
        with float32_loss(logits.device):
            logits = logits.float()
            p = torch.sigmoid(logits)
            dice = 1 - (2 * (p * mask).sum() + 1) / (p.sum() + mask.sum() + 1)
            return F.binary_cross_entropy_with_logits(logits, mask) + dice

    # -- validation: the autoencoder's figures on the clean held-out crops, the segmenter's on a
    # fixed draw of synthetic defects made on them
    def start_validation(self) -> None:
        self._segment = [0.0, 0]  # loss sum (weighted by crops), crops

    def observe_validation(self, model, batch: Batch, z: torch.Tensor, start: int) -> None:
        draws = [torch.from_numpy(d).to(batch.x.device) for d in anomalies.draw(len(batch.x), np.random.default_rng([VALIDATION_SEED, start]))]
        x, mask = self.with_defects(batch.x, draws)
        recon = model["decoder"](model["encoder"](x))
        loss = float(self.segment_loss(model["segmenter"](self.segment_input(x, recon)), mask))
        self._segment[0] += loss * len(x)
        self._segment[1] += len(x)

    def validation_figures(self, epoch: int) -> dict:
        return {"val_segment_loss": self._segment[0] / max(1, self._segment[1])}

    @classmethod
    def graphs(cls, cfg: RunConfig, model, pixel_error: str | None) -> list[GraphSpec]:
        specs = super().graphs(cfg, model, pixel_error if pixel_error != SEGMENT else None)
        if pixel_error == SEGMENT:
            scorer = SegmentScorer(model["encoder"], model["decoder"], model["segmenter"],
                                   cfg.options.segment_input == WITH_RECONSTRUCTION)
            specs.append(GraphSpec("scorer", scorer, (IMAGE_INPUT,), (LATENT_OUTPUT, PIXEL_ERROR_OUTPUT, RECONSTRUCTION_ERROR_OUTPUT),
                                   lambda x: (x,)))
        return specs


FAMILY = DraemFamily
