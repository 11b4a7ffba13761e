"""What pixels a run feeds the model, decided when a `.beton` is written.

Evaluation splits (val, test) are stored *evaluation-ready*: the pixels CoOp-family code
feeds CLIP at test time, computed once at prepare time with the same library calls:
- Dassl reads every image with `PIL.Image.open(path).convert("RGB")`
  (dassl/utils/tools.py `read_image`), so palette, grayscale, RGBA (alpha dropped) and CMYK
  files become RGB before any resize;
- then CLIP's eval transform (open_clip/transform.py `image_transform(S, is_train=False)`,
  CoOp's `INPUT.INTERPOLATION: bicubic`): torchvision's `Resize(S, BICUBIC)` (shorter side
  to S, longer side `int(S * long / short)`; torchvision/transforms/functional.py
  `_compute_resized_output_size`), which on a PIL image is PIL's antialiased bicubic
  resize, then `CenterCrop(S)` (offsets `int(round((side - S) / 2.0))`, Python's rounding;
  torchvision's `center_crop`).
Training images are stored whole, shrunk only when large (shorter side at most
`train_short_side`, longest side at most `max_resolution`, with the same resize), and the
loader crops them as Dassl does (`fastprompt.data.decoders`). The default cap, 320 px, is
where the median random-resized crop (area scale ~0.54 of U(0.08, 1)) still spans >= 224
source pixels, so it is shrunk, as Dassl's crop of a larger original is, not enlarged;
decoding cost grows with the stored pixels (BENCHMARKS.md: 448 px costs ~1.5x), paid once per
run with the decoded cache (`fastprompt.data.decoded`), which holds H x W x 3 bytes per image
(1.65x more at 448 px); benchmarks/bench_train_storage.py measures what each cap costs in
pixels against Dassl's crop of the original.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from PIL import Image


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(H', W') of torchvision's `Resize(short)`: shorter side to `short`, longer `int(short * long / shorter)`."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def center_offset(side: int, crop: int) -> int:
    """torchvision's `center_crop` offset along one side: `int(round((side - crop) / 2.0))`."""
    return int(round((side - crop) / 2.0))


def eval_resize_short(size: int, center_crop_ratio: float) -> int:
    """The shorter side an image is resized to before the centre crop of `size`: `size` for
    CLIP's transform (ratio 1), e.g. 256 for the ImageNet-style 224 / 256."""
    return size if center_crop_ratio == 1.0 else int(round(size / center_crop_ratio))


def clip_eval_pixels(image: "Image.Image", size: int) -> np.ndarray:
    """CLIP's eval transform before ToTensor on an RGB PIL image: (size, size, 3) uint8."""
    from PIL import Image

    width, height = image.size
    new_h, new_w = resized_size(height, width, size)
    if (new_h, new_w) != (height, width):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = center_offset(new_h, size), center_offset(new_w, size)
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)  # (S, S, 3)


def train_storage_size(height: int, width: int, short_cap: int, long_cap: int) -> tuple[int, int]:
    """(H', W') a training image is stored at: unchanged unless its shorter side exceeds
    `short_cap` or its longer side `long_cap` (torchvision's `Resize(short_cap, max_size=long_cap)`
    rounding, shrinking only). A very thin image's shorter side can round to 0 (`storage_problem`)."""
    short, long = min(height, width), max(height, width)
    if short > short_cap:
        short, long = short_cap, int(short_cap * long / short)
    if long > long_cap:
        short, long = int(long_cap * short / long), long_cap
    return (long, short) if height >= width else (short, long)


# The most pixels CLIP's eval resize may produce before its centre crop: PIL's own
# decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS by default). Only an image about 1,800
# times longer than wide gets there at 224 px (the resize keeps the aspect ratio).
EVAL_RESIZE_MAX_PIXELS = 89_478_485


class UnusableImage(ValueError):
    """An image that reads fine but cannot be stored (`storage_problem` says why)."""


def storage_problem(height: int, width: int, eval_size: Optional[int], short_cap: int, long_cap: int) -> Optional[str]:
    """Why a (height, width) image cannot be stored as this module says, or None. Stored
    evaluation-ready (`eval_size` given), CLIP's resize before the crop would exceed
    `EVAL_RESIZE_MAX_PIXELS`; stored for training (`eval_size` None), a side would shrink
    below 1 px (e.g. 1 x 3000 px with the longer side capped at 1024)."""
    if eval_size is not None:
        new_h, new_w = resized_size(height, width, eval_size)
        if new_h * new_w > EVAL_RESIZE_MAX_PIXELS:
            return (f"{width}x{height} px: CLIP's eval resize to {eval_size} px would make it {new_w}x{new_h} px, "
                    f"over the {EVAL_RESIZE_MAX_PIXELS / 1e6:.0f} Mpx limit")
        return None
    new_h, new_w = train_storage_size(height, width, short_cap, long_cap)
    if min(new_h, new_w) < 1:
        return (f"{width}x{height} px: stored for training (longer side at most {long_cap} px, shorter at most "
                f"{short_cap} px) its {min(height, width)} px side would shrink to 0 px")
    return None


def train_storage_pixels(image: "Image.Image", short_cap: int, long_cap: int) -> np.ndarray:
    """An RGB PIL image as stored for training (`train_storage_size`, PIL bicubic): (H, W, 3) uint8."""
    from PIL import Image

    width, height = image.size
    new_h, new_w = train_storage_size(height, width, short_cap, long_cap)
    problem = storage_problem(height, width, None, short_cap, long_cap)
    if problem is not None:
        raise UnusableImage(problem)
    if (new_h, new_w) != (height, width):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)  # (H, W, 3)


def normalisation_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, 256) float32: the normalised value of every uint8 level per channel (ToTensor's
    level / 255 then Normalize(mean, std), as one lookup; the decoders and the transforms use it)."""
    levels = np.arange(256, dtype=np.float64)  # (256,)
    table = (levels[None, :] - 255.0 * np.asarray(mean)[:, None]) / (255.0 * np.asarray(std)[:, None])  # (3, 256)
    return np.ascontiguousarray(table, dtype=np.float32)
