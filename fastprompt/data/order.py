"""The order of an epoch's samples: a pure function of (order_seed, epoch, rank, world size).

Used by the FFCV loaders (`fastprompt.data.loaders`) and by the image-feature cache
(`fastprompt.training.feature_cache`), which must see the same batches; numpy only.
"""

from __future__ import annotations

import numpy as np

_ORDER_STREAM = 7  # seed-sequence tag of the epoch order (the augmentation key uses its own hash)


class EpochOrder:
    """The samples of epoch e on this rank: a pure function of (order_seed, e, rank, world size).

    Installed as the FFCV Loader's traversal order (FFCV 1.0.2's `Loader` cannot be given a
    custom order class: its `isinstance(order, TraversalOrder)` branch then calls the
    instance), it replaces FFCV's RANDOM / SEQUENTIAL orders and its distributed mode.
    - Shuffled (training): the subset permuted by a generator seeded with
      (order_seed, e); for W ranks, padded with its first entries to a multiple of W and
      dealt out, rank r taking positions r, r + W, ... With a per-rank batch of B / W, the
      ranks' k-th batches together are exactly the one-process k-th batch of size B, so
      training on W ranks sees the same global batches as on one. (FFCV's distributed mode,
      torch's DistributedSampler, permutes with torch's generator and deals contiguous
      blocks: its global batches depend on the world size.)
    - In order (evaluation): the subset dealt out the same way without padding, so each
      sample is seen exactly once over all ranks (shards differ by at most one sample).
    """

    def __init__(self, indices: np.ndarray, order_seed: int, shuffle: bool, rank: int, world: int):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.order_seed, self.shuffle, self.rank, self.world = order_seed, shuffle, rank, world

    def sample_order(self, epoch: int) -> np.ndarray:
        order = self.indices
        if self.shuffle:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_ORDER_STREAM, self.order_seed, epoch])))
            order = rng.permutation(order)
            pad = (-len(order)) % self.world
            if pad:
                order = np.concatenate([order, order[:pad]])
        return order[self.rank :: self.world]

