"""Cached image features for methods whose image tower is frozen and unprompted.

zeroshot, coop and e2mim never change the image tower, so an image's feature depends only on
its pixels. `FeatureCache` computes V augmented views of every training image once, under
`torch.no_grad` (view v = the train pipeline's epoch v with augmentation seed `aug_seed`),
stores them on disk (`$FASTPROMPT_CACHE/features-<key>.safetensors`, keyed by the data
file, model, weights, augmentation seed and V) and serves epoch e from view e mod V. The
whole train split is cached, so one cache serves every seed, shot count, class subset and
method on the same data and model.

A deliberate approximation when V < epochs: epoch e sees the augmentation of epoch e mod V,
not a fresh one (the trainer says so). The batch order is the loader's: a permutation of
the run's training subset drawn by `fastprompt.data.order.EpochOrder` from (seed, epoch),
dealt out to ranks as the loader does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from fastprompt.data.order import EpochOrder
from fastprompt.data.splits import relabel_table
from fastprompt.files import atomic_write, cache_dir
from fastprompt.methods.base import PromptModel

log = logging.getLogger(__name__)


def feature_cache_key(data, model: PromptModel, views: int, aug_seed: int) -> str:
    st = os.stat(data.path)
    payload = json.dumps({"data": os.path.realpath(data.path), "size": st.st_size, "mtime": st.st_mtime_ns,
                          "model": model.bundle.name, "weights": model.bundle.weights_id,
                          "image_size": model.bundle.image_size, "views": views, "aug_seed": aug_seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class FeatureCache:
    """features [V, N_train, D] (fp32, on the training device) of the train split's images."""

    def __init__(self, features: torch.Tensor, indices: np.ndarray, num_samples: int):
        self.features = features  # (V, N_train, D)
        self.indices = indices  # (N_train,) .beton indices of the rows
        self.row_of = np.full(num_samples, -1, dtype=np.int64)  # .beton index -> row
        self.row_of[indices] = np.arange(len(indices))

    @property
    def views(self) -> int:
        return int(self.features.shape[0])

    @classmethod
    @torch.no_grad()
    def build(cls, model: PromptModel, data, *, views: int, aug_seed: int, device, batch_size: int,
              num_workers, autocast) -> "FeatureCache":
        key = feature_cache_key(data, model, views, aug_seed)
        path = cache_dir() / f"features-{key}.safetensors"
        indices = data.indices("train")  # (N_train,) every training image, sorted
        if path.is_file():
            stored = load_file(str(path))
            if np.array_equal(stored["indices"].numpy(), indices):
                log.info("image features from %s", path)
                return cls(stored["features"].to(device), indices, data.num_samples)
        loader = data.loader("train", classes="all", train=True, image_size=model.bundle.image_size,
                             batch_size=batch_size, device=device, num_workers=num_workers, order_seed=aug_seed,
                             shuffle=False, drop_last=False, return_indices=True)
        row_of = np.full(data.num_samples, -1, dtype=np.int64)
        row_of[indices] = np.arange(len(indices))
        feats = torch.zeros(views, len(indices), model.bundle.embed_dim, device=device)  # (V, N, D)
        counts = torch.zeros(views, len(indices), 1, device=device)  # (V, N, 1): ranks may pad with repeats
        model.eval()
        for view in range(views):
            loader.set_epoch(view)
            for images, _, idx in loader:
                rows = torch.from_numpy(row_of[idx.numpy()]).to(device)  # (B,)
                with autocast():
                    f = model.image_features(images).float()  # (B, D), normalised
                feats[view].index_add_(0, rows, f)
                counts[view].index_add_(0, rows, torch.ones(len(rows), 1, device=device))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(feats)
            dist.all_reduce(counts)
        feats = feats / counts.clamp_min(1)  # (V, N, D)
        if not dist.is_initialized() or dist.get_rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"features": feats.cpu().contiguous(), "indices": torch.from_numpy(indices)}
            atomic_write(path, lambda tmp: save_file(payload, tmp))
        return cls(feats, indices, data.num_samples)

    def batches(self, data, subset: np.ndarray, classes: str, *, seed: int, epoch: int, batch_size: int,
                rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features [b, D], labels [b]) of epoch `epoch` on this rank: the training loader's
        batches (b = batch_size / world, same order, last partial batch dropped unless the subset is smaller than
        one batch, which is then one batch)."""
        relabel = relabel_table(data.num_classes, data.class_subset(classes))  # (K_all,)
        order = EpochOrder(subset, seed, True, rank, world).sample_order(epoch)  # (n / W,): the loader's, this rank
        view = self.features[epoch % self.views]  # (N_train, D)
        local = batch_size // world if len(subset) >= batch_size else len(order)  # Dassl: one smaller batch
        # the epoch's rows and labels go to the device once: a copy per batch would wait for the GPU every step
        rows = torch.from_numpy(self.row_of[order]).to(view.device)  # (n / W,)
        labels = torch.from_numpy(relabel[data.labels[order]]).to(view.device)  # (n / W,)
        for start in range(0, len(order) - local + 1, local):
            yield view[rows[start : start + local]], labels[start : start + local]  # (b, D), (b,)
