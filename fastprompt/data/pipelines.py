"""How a split is loaded (`LoaderConfig`) and the FFCV pipelines that do it.

Pipelines (one FFCV `Loader` with `indices=`, which is the subset to read):
- train: random resized crop to `image_size` (torchvision's parameters: scale (0.08, 1),
  ratio (3/4, 4/3), 10 tries then a centre crop) + horizontal flip with p = 0.5;
- eval: CLIP's eval geometry (shorter side to `image_size / center_crop_ratio`, centre crop
  of `image_size`); ratio 1.0 is CLIP's and CoOp's (224/256 the ImageNet-style crop). Val and
  test of a file `prepare`d from images are stored evaluation-ready (`fastprompt.data.pixels`)
  and delivered as stored: the loader then requires `image_size` == the stored size.
Both decode the JPEG with libjpeg-turbo and resize with PIL's antialiased bicubic
(`fastprompt.data.resample`), as Dassl's and CLIP's transforms do. Images are normalised with
CLIP's mean/std into float32 (B, 3, S, S), contiguous: on CPU by the decode threads
themselves (a per-channel lookup table, fused with the HWC -> CHW transpose; doing it in
torch afterwards cost as much as decoding), on CUDA after the uint8 batch is copied to the
GPU (4x fewer bytes than float). FFCV's own `NormalizeImage` is not used: on CUDA it needs
cupy, which is not a dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from fastprompt.data.decoded import parse_cache_setting
from fastprompt.settings import resolve_workers
from fastprompt.validation import check_int, require

# CLIP's normalisation (open_clip.constants.OPENAI_DATASET_MEAN / OPENAI_DATASET_STD; a test
# checks they stay equal). Copied so that importing the data layer does not import open_clip.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

CHUNKS_PER_THREAD = 4  # decoder work items per decode thread and batch (see `image_pipelines`)


@dataclass(frozen=True)
class LoaderConfig:
    """How a split is loaded; `BetonDataset.loader(split, **fields)` builds one."""

    train: Optional[bool] = None  # augment (random resized crop + flip); None = (split == "train")
    image_size: int = 224  # side of the square output images, px
    batch_size: int = 32
    device: Union[str, torch.device] = "cpu"  # where batches are delivered
    num_workers: Optional[int] = None  # FFCV decode threads; None = available cores (clamped to them)
    drop_last: Optional[bool] = None  # None = train and the subset fills at least one batch (Dassl's rule)
    shuffle: Optional[bool] = None  # None = train
    order_seed: int = 0  # epoch e's order and augmentation are functions of (order_seed, e)
    mean: tuple[float, float, float] = CLIP_MEAN  # per-channel mean of [0, 1] pixels
    std: tuple[float, float, float] = CLIP_STD
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop: area fraction range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random resized crop: aspect ratio range
    flip_prob: float = 0.5
    center_crop_ratio: float = 1.0  # eval crop side / shorter image side (CLIP: 1.0; ImageNet-style: 224/256)
    batches_ahead: int = 3  # batches FFCV prepares ahead
    return_indices: bool = False  # also yield the (B,) .beton indices of the batch
    decoded_cache: Union[str, int] = "off"  # train: decode the subset once ("auto", "off", or a memory budget: 8G, bytes)

    def __post_init__(self) -> None:
        for name in ("image_size", "batch_size", "batches_ahead"):
            check_int(name, getattr(self, name))
        check_int("order_seed", self.order_seed, minimum=0)
        resolve_workers(self.num_workers, "num_workers")
        require(len(self.mean) == 3 and len(self.std) == 3 and min(self.std) > 0,
                f"mean={self.mean!r} and std={self.std!r} need 3 values each, std > 0")
        lo, hi = self.crop_scale
        require(0 < lo <= hi <= 1, f"crop_scale={self.crop_scale!r} must satisfy 0 < low <= high <= 1")
        lo, hi = self.crop_ratio
        require(0 < lo <= hi, f"crop_ratio={self.crop_ratio!r} must satisfy 0 < low <= high")
        require(0 <= self.flip_prob <= 1, f"flip_prob={self.flip_prob!r} must be in [0, 1]")
        require(0 < self.center_crop_ratio <= 1, f"center_crop_ratio={self.center_crop_ratio!r} must be in (0, 1]")
        parse_cache_setting("decoded_cache", self.decoded_cache)


def image_pipelines(config: LoaderConfig, train: bool, device: torch.device, num_workers: int, decoded: bool = False):
    """(image decoder, FFCV pipelines of the fields) for a loader delivering to `device`;
    `decoded`: the train decoder reads a decoded cache (`fastprompt.data.decoded`) it is given.

    CPU: the decode threads normalise into float32 (B, 3, S, S) through a lookup table.
    CUDA: uint8 (B, S, S, 3) crosses to the GPU (4x fewer bytes) and the loader normalises
    it there. The label field yields the sample index (labels come from a table)."""
    # FFCV and the numba kernels are imported on first use, so that `LoaderConfig` and the CLIP
    # constants (which pretraining uses) import without them.
    from fastprompt.data.ffcv_compat import import_ffcv

    import_ffcv()
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import ToDevice, ToTensor

    from fastprompt.data.decoders import CenterCrop, SampleIndex, SeededRandomResizedCrop, normalisation_table

    on_gpu = device.type == "cuda"
    lut: Optional[np.ndarray] = None if on_gpu else normalisation_table(config.mean, config.std)  # (3, 256)
    # A few chunks per decode thread: a batch waits for its slowest chunk, so small chunks keep a
    # thread that the OS preempts from stalling the batch; each chunk still reuses its buffers.
    chunks = CHUNKS_PER_THREAD * num_workers
    if train:
        decoder = SeededRandomResizedCrop(config.image_size, config.crop_scale, config.crop_ratio, config.flip_prob,
                                          lut, chunks, decoded=decoded)
    else:
        decoder = CenterCrop(config.image_size, config.center_crop_ratio, lut, chunks)
    image_ops = [ToTensor()]
    if on_gpu:
        image_ops.append(ToDevice(device, non_blocking=True))
    # Explicit PipelineSpecs: a decoder in a plain list must be an instance of the field's
    # default decoder class, else FFCV silently inserts the default one in front of it.
    pipelines = {
        "image": PipelineSpec("image", decoder=decoder, transforms=image_ops),
        "label": PipelineSpec("label", decoder=SampleIndex(), transforms=[ToTensor()]),
        "split": None,
    }
    return decoder, pipelines
