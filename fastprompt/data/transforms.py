"""The loader's pixels as open_clip-style transforms: a PIL image in, a float32 tensor (3, S, S) out.

`fastprompt.create_model_and_transforms` returns these (open_clip's `create_model_and_transforms`
order: model, train transform, eval transform), so images that never went through `prepare`
(a demo, a notebook, another pipeline) reach the model as the training and evaluation loaders
deliver them:

- `EvalTransform`: what `prepare` stores for val/test (`fastprompt.data.pixels.clip_eval_pixels`:
  `convert("RGB")`, CLIP's `Resize(S, BICUBIC)` + `CenterCrop(S)`) and the loader normalises
  (the same lookup table): equal to the loader's test batch bit for bit.
- `TrainTransform`: Dassl's training transform (dassl/data/transforms/transforms.py
  `random_resized_crop` + `random_flip`, then CLIP's normalisation) as the training loader
  computes it. Like `prepare`, it first shrinks the original to the stored size (shorter side at
  most `train_short_side`, longest at most `max_resolution`: `pixels.train_storage_pixels`); then
  it draws the crop and the flip from torch's global generator as torchvision's
  `RandomResizedCrop.get_params` and `RandomHorizontalFlip` do (so `torch.manual_seed` repeats
  them), and resizes with the loader's own kernel (`fastprompt.data.resample.resample_normalised`,
  PIL's antialiased bicubic). For the same crop it gives the loader's pixels bit for bit on the
  same stored image; the loader's stored copy is also JPEG-coded (`WriteOptions.jpeg_quality`),
  which this transform skips.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from fastprompt.data.beton import WriteOptions
from fastprompt.data.pipelines import LoaderConfig
from fastprompt.data.pixels import (UnusableImage, clip_eval_pixels, normalisation_table,
                                    train_storage_pixels)
from fastprompt.errors import FastpromptError
from fastprompt.validation import check_int

if TYPE_CHECKING:
    from PIL import Image


def _default(cls, name: str):
    """The default of field `name` of dataclass `cls` (the writer's and loader's own defaults)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _rgb(image: "Image.Image") -> "Image.Image":
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise FastpromptError(f"the transform takes a PIL image, got {type(image).__name__}; "
                              "open the file with PIL.Image.open(path)")
    return image.convert("RGB")  # Dassl's read_image: palette, grayscale, RGBA and CMYK become RGB


class EvalTransform:
    """CLIP's eval transform as `prepare` stores val/test and the loader normalises them."""

    def __init__(self, size: int, mean: Sequence[float] = LoaderConfig.mean, std: Sequence[float] = LoaderConfig.std):
        check_int("size", size)
        self.size = size
        self.lut = normalisation_table(mean, std)  # (3, 256)

    def __call__(self, image: "Image.Image") -> torch.Tensor:
        pixels = clip_eval_pixels(_rgb(image), self.size)  # (S, S, 3) uint8
        chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (3, S, S)
        return torch.from_numpy(np.take_along_axis(self.lut, chw.reshape(3, -1), axis=1).reshape(chw.shape))

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}: RGB, Resize({self.size}, bicubic), CenterCrop({self.size}), CLIP normalisation)"


class TrainTransform:
    """Dassl's random resized crop + flip + CLIP normalisation, as the training loader computes it."""

    def __init__(
        self,
        size: int,
        train_short_side: int = _default(WriteOptions, "train_short_side"),
        max_resolution: int = _default(WriteOptions, "max_resolution"),
        scale: tuple[float, float] = LoaderConfig.crop_scale,
        ratio: tuple[float, float] = LoaderConfig.crop_ratio,
        flip_prob: float = LoaderConfig.flip_prob,
        mean: Sequence[float] = LoaderConfig.mean,
        std: Sequence[float] = LoaderConfig.std,
    ):
        LoaderConfig(image_size=size, crop_scale=scale, crop_ratio=ratio, flip_prob=flip_prob, mean=tuple(mean),
                     std=tuple(std))  # the loader's checks, naming the field
        WriteOptions(train_short_side=train_short_side, max_resolution=max_resolution, workers=1)
        self.size = size
        self.train_short_side, self.max_resolution = train_short_side, max_resolution
        self.scale, self.ratio, self.flip_prob = tuple(scale), tuple(ratio), flip_prob
        self.lut = normalisation_table(mean, std)  # (3, 256)

    def stored(self, image: "Image.Image") -> np.ndarray:
        """The image as `prepare` stores it for training, before JPEG coding: (H, W, 3) uint8."""
        try:
            # writable and C-contiguous (a copy only where PIL's array is read-only): the kernels' one
            # specialisation (a read-only array compiles each of them again)
            return np.require(train_storage_pixels(_rgb(image), self.train_short_side, self.max_resolution),
                              requirements=["C", "W"])  # (H, W, 3) uint8
        except UnusableImage as err:
            raise FastpromptError(f"cannot train on this image: {err}; `prepare` skips such files too") from None

    def draw(self, height: int, width: int) -> tuple[int, int, int, int, bool]:
        """(row, col, h, w, flip) from torch's global generator, as torchvision's
        `RandomResizedCrop.get_params` then `RandomHorizontalFlip` draw them (Dassl's order)."""
        from torchvision.transforms import RandomResizedCrop

        # get_params reads only the image's size: a zero-stride view of that shape holds no pixels
        shape_only = torch.empty(()).expand(3, height, width)  # (3, H, W)
        i, j, h, w = RandomResizedCrop.get_params(shape_only, list(self.scale), list(self.ratio))
        flip = bool(torch.rand(1) < self.flip_prob)
        return i, j, h, w, flip

    def crop(self, stored: np.ndarray, i: int, j: int, h: int, w: int, flip: bool) -> torch.Tensor:
        """The crop rows i..i+h, columns j..j+w of a stored image, resized to S (PIL's bicubic),
        mirrored when `flip`, normalised: (3, S, S) float32, the training loader's kernel."""
        from fastprompt.data.resample import resample_normalised

        out = np.empty((3, self.size, self.size), dtype=np.float32)  # (3, S, S)
        resample_normalised(stored, i, h, self.size, 0, j, w, self.size, 0, flip, self.lut, out)
        return torch.from_numpy(out)

    def __call__(self, image: "Image.Image") -> torch.Tensor:
        stored = self.stored(image)  # (H, W, 3)
        return self.crop(stored, *self.draw(stored.shape[0], stored.shape[1]))

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.size}: RGB, stored with shorter side <= {self.train_short_side} px and "
                f"longer <= {self.max_resolution} px, RandomResizedCrop({self.size}, scale={self.scale}, bicubic), "
                f"flip p={self.flip_prob}, CLIP normalisation)")
