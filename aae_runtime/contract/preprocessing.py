"""How an image becomes the model's input: colour mode, size, resampling and scale.

One definition, shared by training (MNIST arrays and image folders), export and the runtime;
decoding files lives in `aae_runtime.images`, which applies this after Pillow has read a file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from aae_runtime.contract.errors import ModelError

COLOR_MODES = {"L": 1, "RGB": 3}  # PIL mode -> channels
RESAMPLE_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos", "box")  # PIL filters by name (images.RESAMPLE)
# How a photo's EXIF orientation tag is taken: "exif" turns the image upright as viewers show it
# (a phone's portrait photo stored sideways); "stored" takes the pixels as stored (models
# exported before the field existed, and MNIST arrays, which have no tag)
ORIENTATIONS = ("stored", "exif")
EXIF_ORIENTATION = "exif_orientation"  # the feature name in the metadata's "requires" list of an "exif" model
MAX_INPUT_SIDE = 16384  # a model input side beyond this is a damaged block, not a model


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes the model's input: one definition, used by training too."""

    color_mode: str  # PIL mode the image is converted to: "L" or "RGB"
    height: int
    width: int
    resample: str  # PIL resampling filter name used when the size differs, e.g. "bilinear"
    scale: float  # input = pixel * scale + offset; pixels are 0..255
    offset: float
    orientation: str = "stored"  # one of ORIENTATIONS

    @property
    def channels(self) -> int:
        return COLOR_MODES[self.color_mode]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one model input."""
        return (self.channels, self.height, self.width)

    @property
    def pixel_range(self) -> tuple[float, float]:
        """The inputs of pixels 0 and 255 (black and white), in that order."""
        return (self.offset, self.offset + 255 * self.scale)

    def to_dict(self) -> dict:
        return {
            "color_mode": self.color_mode,
            "size": [self.height, self.width],
            "resample": self.resample,
            "scale": self.scale,
            "offset": self.offset,
            "orientation": self.orientation,
            "layout": "NCHW",
            "dtype": "float32",
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        try:
            height, width = (int(v) for v in d["size"])
            pre = cls(str(d["color_mode"]), height, width, str(d["resample"]), float(d["scale"]), float(d["offset"]),
                      str(d.get("orientation", "stored")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model metadata has a malformed 'preprocessing' block ({exc!r}): re-export the model") from None
        if (pre.color_mode not in COLOR_MODES or not 1 <= pre.height <= MAX_INPUT_SIDE or not 1 <= pre.width <= MAX_INPUT_SIDE
                or pre.resample not in RESAMPLE_FILTERS or not math.isfinite(pre.scale) or not math.isfinite(pre.offset)
                or pre.orientation not in ORIENTATIONS):
            raise ModelError(f"model metadata has unsupported preprocessing {str(d)[:300]}: re-export the model")
        if not 1e-6 <= abs(pre.scale) <= 1e6 or abs(pre.offset) > 1e6:  # scale 0 would give every image one score
            raise ModelError(f"model metadata has preprocessing scale {pre.scale:g} and offset {pre.offset:g}: pixels "
                             "would not reach the model (a scale of 1/255 maps 8-bit pixels to [0, 1]); re-export the model")
        return pre


def pixels_to_input(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 pixels (N, H, W) or (N, H, W, C) -> model inputs (N, C, H, W) float32."""
    x = pixels.astype(np.float32) * np.float32(pre.scale) + np.float32(pre.offset)
    if x.ndim == 3:
        return x[:, None, :, :]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
