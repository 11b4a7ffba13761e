"""Dassl's few-shot draw re-implemented from the published code, and a split that exercises it."""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import torch

from fastprompt.data.splits import SPLIT_CODE


def dassl_reference(split: dict, num_shots: int, seed: int) -> dict:
    """CoOp's few-shot draw, written straight from the published code, on a split dict.

    CoOp train.py: `set_random_seed(cfg.SEED)` (dassl/utils/tools.py: random.seed, np.random.seed,
    torch.manual_seed); datasets/oxford_pets.py: `generate_fewshot_dataset(train, num_shots)`, then
    `generate_fewshot_dataset(val, min(num_shots, 4))`; dassl/data/datasets/base_dataset.py:
    `split_dataset_by_label` (a defaultdict(list) over the items) and per label `random.sample(items,
    num_shots)` or all items (repeat=False).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    def split_dataset_by_label(data_source):
        output = defaultdict(list)
        for item in data_source:
            output[item[1]].append(item)
        return output

    def generate_fewshot_dataset(data_source, num_shots):
        tracker = split_dataset_by_label(data_source)
        dataset = []
        for label, items in tracker.items():
            if len(items) >= num_shots:
                sampled_items = random.sample(items, num_shots)
            else:
                sampled_items = items
            dataset.extend(sampled_items)
        return dataset

    train = generate_fewshot_dataset(split["train"], num_shots=num_shots)
    val = generate_fewshot_dataset(split["val"], num_shots=min(num_shots, 4)) if split["val"] else []
    return {"train": train, "val": val}


def interleaved_split(seed: int = 0) -> dict:
    """A split file's lists with labels interleaved (label 3 first), short classes in train and val."""
    rng = np.random.default_rng(seed)
    names = ["w", "x", "y", "z", "v"]
    split = {}
    for s, counts in (("train", [20, 3, 17, 9, 1]), ("val", [6, 2, 5, 4, 1]), ("test", [2, 2, 2, 2, 2])):
        labels = rng.permutation(np.repeat(np.arange(5), counts)).tolist()
        labels.insert(0, labels.pop(labels.index(3)))  # label 3 appears first
        split[s] = [[f"{names[c]}/{s}_{k:03d}.jpg", int(c), names[c]] for k, c in enumerate(labels)]
    return split


def as_arrays(split: dict):
    entries = [(e, s) for s in ("train", "val", "test") for e in split[s]]
    labels = np.asarray([e[1] for e, _ in entries])
    splits = np.asarray([SPLIT_CODE[s] for _, s in entries])
    return [e for e, _ in entries], labels, splits
