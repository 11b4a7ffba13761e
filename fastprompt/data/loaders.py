"""The loader factory: `BetonLoader`, batches of one split of a `.beton` through FFCV.

A loader is a few-shot / class subset of a split (`BetonDataset.indices`), relabelled
0..K'-1, read by one FFCV `Loader` with `indices=` through the pipelines of
`fastprompt.data.pipelines` and the decoders of `fastprompt.data.decoders`. Building one
applies fastprompt's FFCV workarounds to the process (`fastprompt.data.ffcv_compat`).

Determinism and resume. Epoch `e` of a loader is a pure function of (order_seed, e):
- Order (`fastprompt.data.order.EpochOrder`): the subset permuted by a numpy generator
  seeded with (order_seed, e), dealt out by rank under torch.distributed so that W ranks
  with batch B / W see the same global batches as one process with batch B. FFCV's own
  orders are not used: RANDOM seeds with `order_seed + e` (so seed s, epoch 1 repeats seed
  s + 1, epoch 0; ffcv/traversal_order/random.py) and its distributed mode (torch's
  DistributedSampler) gives global batches that depend on the world size.
- Augmentation: the crop and flip of sample i in epoch e are a counter-based hash of
  (order_seed, e, i) (`fastprompt.data.decoders`), independent of threads, batch
  composition, rank and world size.
Decode once (`LoaderConfig.decoded_cache`, train only; `fastprompt.data.decoded`): the subset
is decoded into one uint8 array before the first epoch (`decode()`, or the first iteration)
and every epoch crops from it with the same kernel code and streams: the same batches.
So `loader.set_epoch(e)` before iterating reproduces epoch e exactly (same batches, same
pixels) in a fresh process and with any number of decode threads: a trainer resumes at an
epoch boundary. Across machines the crops and flips are the same (up to a last-bit libm
difference landing on a rounding boundary); the pixels are the same where libjpeg-turbo
is the same version (the resize is fastprompt's own numba code, `fastprompt.data.resample`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import torch

from fastprompt.data.ffcv_compat import apply_ffcv_compat, import_ffcv, keep_torch_threads, next_batch

import_ffcv()  # before the first FFCV import (ffcv_compat, workaround 0)
from ffcv.loader import Loader, OrderOption  # noqa: E402

from fastprompt.data.decoded import (  # noqa: E402
    CachePlan,
    DecodedImages,
    decode_once,
    decode_once_shared,
    format_bytes,
    parse_cache_setting,
    plan_cache,
)
from fastprompt.data.decoders import SeededRandomResizedCrop, augment_key  # noqa: E402
from fastprompt.data.order import EpochOrder
from fastprompt.data.pipelines import LoaderConfig, image_pipelines
from fastprompt.data.splits import relabel_table
from fastprompt.errors import FastpromptError
from fastprompt.runtime import resolve_device, resolve_workers
from fastprompt.validation import check_int

if TYPE_CHECKING:  # annotations only: beton.py builds loaders (BetonDataset.loader), not the reverse
    from fastprompt.data.beton import BetonDataset

logger = logging.getLogger(__name__)


class BetonLoader:
    """Batches of one split of a `.beton`: iterate for (images, labels) [, indices].

    images: float32 (B, 3, S, S), contiguous, normalised, on `device`;
    labels: int64 (B,), relabelled 0..K'-1 for the class subset, on `device`;
    indices (with return_indices): int64 (B,) positions in the .beton, on the CPU.
    Each `iter()` is one epoch; `set_epoch(e)` chooses which (see the module docstring).
    """

    def __init__(self, dataset: "BetonDataset", indices: np.ndarray, split: str, classes: str, config: LoaderConfig):
        if len(indices) == 0:
            raise FastpromptError(f"split {split!r} of {dataset.path} has no samples for classes={classes!r}; choose another split")
        train = config.train if config.train is not None else split == "train"
        shuffle = config.shuffle if config.shuffle is not None else train
        drop_last = config.drop_last if config.drop_last is not None else train and len(indices) >= config.batch_size
        if drop_last and len(indices) < config.batch_size:
            raise FastpromptError(
                f"drop_last=True with batch_size={config.batch_size} but the subset has only {len(indices)} samples "
                "(no batch would remain); lower batch_size or pass drop_last=False"
            )
        self.dataset, self.split, self.classes, self.config = dataset, split, classes, config
        self.train, self.shuffle, self.drop_last = train, shuffle, drop_last
        self.indices = np.asarray(indices, dtype=np.int64)
        self.device = resolve_device(config.device)
        self.num_workers = resolve_workers(config.num_workers, "num_workers")
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank, self.world_size = (
            (torch.distributed.get_rank(), torch.distributed.get_world_size()) if self.distributed else (0, 1)
        )
        kept = dataset.class_subset(classes)
        self.classnames = [dataset.classnames[c] for c in kept]
        self._sample_label = torch.from_numpy(relabel_table(dataset.num_classes, kept)[dataset.labels])  # (N,) int64
        if self.device.type == "cuda":  # the uint8 batch is normalised on the GPU (see image_pipelines)
            mean = torch.tensor(config.mean, dtype=torch.float32, device=self.device) * 255.0  # (3,)
            std = torch.tensor(config.std, dtype=torch.float32, device=self.device) * 255.0  # (3,)
            self._shift = mean.view(1, 3, 1, 1)  # (1, 3, 1, 1)
            self._scale = (1.0 / std).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        self.cache_plan = self._plan_cache(dataset, train, config)
        self.decoded: Optional[DecodedImages] = None  # the decoded subset, once `decode()` ran (cache_plan.use)
        self._decoder, pipelines = image_pipelines(config, train, self.device, self.num_workers,
                                                   decoded=self.cache_plan.use)
        apply_ffcv_compat()  # the process-wide FFCV workarounds, before FFCV compiles our pipeline
        with keep_torch_threads():  # FFCV sets torch's thread count to num_workers
            self._ffcv = Loader(
                str(dataset.path),
                batch_size=config.batch_size,
                num_workers=self.num_workers,
                os_cache=True,  # our kernels read through the OS page cache (memory-mapped file)
                order=OrderOption.SEQUENTIAL,  # replaced by EpochOrder below
                distributed=False,  # EpochOrder shards by rank
                seed=config.order_seed,
                indices=self.indices,
                pipelines=pipelines,
                drop_last=drop_last,
                batches_ahead=config.batches_ahead,
            )
        self._order = EpochOrder(self.indices, config.order_seed, shuffle, self.rank, self.world_size)
        self._ffcv.traversal_order = self._order  # FFCV's Loader asks it for each epoch's samples
        self._ffcv.first_traversal_order = self._order.sample_order(0)  # what FFCV's len() counts
        logger.info(
            "%s loader: %d samples of %s (classes=%s), %s pipeline at %d px, batch %d, %d workers%s%s",
            split, len(self.indices), dataset.path, classes, "train" if train else "eval", config.image_size,
            config.batch_size, self.num_workers, f", rank {self.rank} of {self.world_size}" if self.distributed else "",
            f"; {self.cache_plan.line()}" if train else "",
        )

    def _plan_cache(self, dataset: "BetonDataset", train: bool, config: LoaderConfig) -> CachePlan:
        """Whether this loader decodes its subset once (`fastprompt.data.decoded`); under
        torch.distributed rank 0's decision (the available memory differs between ranks)."""
        setting = parse_cache_setting("decoded_cache", config.decoded_cache)
        if not train:
            if setting != "off":
                raise FastpromptError(f"decoded_cache={config.decoded_cache!r} applies to the training pipeline; "
                                      "leave it 'off' for evaluation loaders")
            return CachePlan(False, 0, len(self.indices), "evaluation pipeline")
        if setting == "off":
            return CachePlan(False, 0, len(self.indices), "decoded_cache off")  # the same on every rank
        from ffcv.reader import Reader

        records = Reader(str(dataset.path)).metadata["f0"][self.indices]  # (n,) the subset's image records
        plan = plan_cache(setting, records["height"], records["width"])
        if self.distributed:
            shared = [plan]
            torch.distributed.broadcast_object_list(shared, src=0)
            plan = shared[0]
        return plan

    def decode(self) -> float:
        """Decode the subset into memory if the plan says so and it is not done yet (the first
        iteration calls it); returns the seconds it took (0 when nothing was done)."""
        if not self.cache_plan.use or self.decoded is not None:
            return 0.0
        start = time.perf_counter()
        manager = self._ffcv.memory_manager
        mm = np.memmap(str(self.dataset.path), dtype=np.uint8, mode="r")
        metadata = self._ffcv.reader.metadata["f0"]
        build = decode_once_shared if self.distributed else decode_once
        self.decoded = build(metadata, mm, manager.ptrs, manager.sizes, self.indices)
        self._decoder.attach(self.decoded)
        seconds = time.perf_counter() - start
        logger.info("decoded %d training images (%s) in %.2f s", len(self.indices), format_bytes(self.decoded.nbytes),
                    seconds)
        return seconds

    @property
    def epoch(self) -> int:
        """The epoch the next iteration yields."""
        return int(self._ffcv.next_epoch)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield epoch `epoch` (order and augmentation), e.g. to resume."""
        check_int("epoch", epoch, minimum=0)
        self._ffcv.next_epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples in the subset (over all ranks)."""
        return len(self.indices)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def __len__(self) -> int:
        """Batches per epoch (on this rank)."""
        return len(self._ffcv)

    def _finish(self, images: torch.Tensor) -> torch.Tensor:
        """FFCV's batch -> a float32 (B, 3, S, S) normalised tensor the caller owns."""
        if images.dtype == torch.float32:  # CPU: normalised by the decoder into new memory
            return images  # (B, 3, S, S)
        x = images.permute(0, 3, 1, 2)  # (B, 3, S, S) uint8 on the GPU, a view of (B, S, S, 3)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # (B, 3, S, S) contiguous
        out.copy_(x)
        return out.sub_(self._shift).mul_(self._scale)  # (B, 3, S, S) normalised

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self.decode()
        if isinstance(self._decoder, SeededRandomResizedCrop):
            self._decoder.set_key(augment_key(self.config.order_seed, self.epoch))
        with keep_torch_threads():
            epoch_iter = iter(self._ffcv)  # starts FFCV's background thread for this epoch
        try:
            while True:
                try:
                    images, index = next_batch(epoch_iter)  # images (B, 3, S, S) f32 / (B, S, S, 3) u8 on CUDA; index (B, 1)
                except StopIteration:
                    return
                sample = index[:, 0].clone()  # (B,)
                labels = self._sample_label[sample].to(self.device, non_blocking=True)  # (B,)
                batch = (self._finish(images), labels)
                yield (*batch, sample) if self.config.return_indices else batch
        finally:
            epoch_iter.close()


def make_loader(dataset: "BetonDataset", indices: np.ndarray, split: str, classes: str, config: LoaderConfig) -> BetonLoader:
    """The loader of `indices` (a subset of `split` for `classes`) of `dataset`."""
    return BetonLoader(dataset, indices, split, classes, config)


