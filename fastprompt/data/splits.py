"""Splits and subsets of the CoOp protocol: split files, stratified splits, few-shot, base/new.

Every random choice here is a pure function of integers (the user's seed, the split,
the class label) through numpy's `SeedSequence` and `PCG64`, whose streams numpy
guarantees across platforms and versions; candidates are sorted before sampling. So a
seed names the same few-shot subset on every machine.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from fastprompt.errors import FastpromptError

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_CODE = {name: code for code, name in enumerate(SPLITS)}  # stored in the .beton's `split` field
CLASS_SUBSETS: tuple[str, ...] = ("all", "base", "new")
ClassSubset = Literal["all", "base", "new"]

# CoOp's split for datasets that ship none (`DTD.read_and_split_data`): 50% train, 20% val, 30% test.
STRATIFIED_FRACTIONS = (0.5, 0.2, 0.3)
# CoOp's validation hold-out when a dataset has train/test but no val (`split_trainval`): 20%.
VAL_FROM_TRAIN_FRACTION = 0.2
# Seed of the stratified split; part of the format, stored in the sidecar.
SPLIT_SEED = 0
# Validation few-shot cap: validation uses min(shots, 4) per class (CoOp).
VAL_SHOTS_CAP = 4
# Stream tags, so that the split streams and the few-shot streams never coincide.
_STREAM_STRATIFIED = 1
_STREAM_VAL_FROM_TRAIN = 2
_STREAM_FEW_SHOT = 3


@dataclass(frozen=True)
class Sample:
    """One image to write: its file, class and split."""

    path: str  # path relative to the dataset root (POSIX separators)
    label: int  # class index, 0..K-1
    split: str  # "train" | "val" | "test"


def _rng(*words: int) -> np.random.Generator:
    """A generator whose stream is a pure function of the integers `words`."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(words))))


def validate_split(split: str) -> str:
    if split not in SPLIT_CODE:
        raise FastpromptError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return split


def class_subset(num_classes: int, classes: str) -> list[int]:
    """Original labels kept by `classes` (sorted): base = first ceil(K/2), new = the rest."""
    if classes not in CLASS_SUBSETS:
        raise FastpromptError(f"unknown class subset {classes!r}; use one of {', '.join(CLASS_SUBSETS)}")
    n_base = math.ceil(num_classes / 2)
    if classes == "all":
        return list(range(num_classes))
    if classes == "base":
        return list(range(n_base))
    if n_base == num_classes:
        raise FastpromptError(f"classes='new' is empty for a dataset with {num_classes} class; use classes='all'")
    return list(range(n_base, num_classes))


def relabel_table(num_classes: int, kept: Sequence[int]) -> np.ndarray:
    """Array mapping an original label to its new label (0..K'-1), or -1 for a dropped class."""
    table = np.full(num_classes, -1, dtype=np.int64)
    table[np.asarray(kept, dtype=np.int64)] = np.arange(len(kept), dtype=np.int64)
    return table


def few_shot_indices(
    labels: np.ndarray,
    splits: np.ndarray,
    classnames: Sequence[str],
    split: str,
    shots: Optional[int],
    seed: int,
    kept: Sequence[int],
) -> np.ndarray:
    """Sorted sample indices of `split` restricted to classes `kept`; `shots` per class if given.

    Validation takes min(shots, 4) per class (CoOp). Class c's draw uses its own stream
    (seed, split, c): a class's subset does not depend on which other classes are kept,
    so base/new subsets agree with the "all" subset of the same seed, as in CoOp (which
    samples few-shot first and subsamples classes after). A class with fewer images than
    asked is an error, never a silent smaller subset.
    """
    validate_split(split)
    code = SPLIT_CODE[split]
    in_split = np.flatnonzero(splits == code)
    if shots is None:
        mask = np.isin(labels[in_split], np.asarray(kept, dtype=labels.dtype))
        return in_split[mask].astype(np.int64)
    if isinstance(shots, (bool, np.bool_)) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise FastpromptError(f"shots={shots!r} must be a positive integer (or None for the whole split)")
    if split == "test":
        raise FastpromptError("the test split is never subsampled; pass shots=None for split='test'")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise FastpromptError(f"seed={seed!r} must be a non-negative integer (CoOp uses seeds 1, 2, 3)")
    per_class = min(int(shots), VAL_SHOTS_CAP) if split == "val" else int(shots)
    chosen = []
    split_labels = labels[in_split]
    for c in kept:
        candidates = np.sort(in_split[split_labels == c])  # sorted: the draw depends only on the set
        if len(candidates) < per_class:
            raise FastpromptError(
                f"class {classnames[c]!r} has {len(candidates)} {split} images but {per_class} shots were asked; "
                f"use shots <= {len(candidates)}" + (" (validation uses min(shots, 4))" if split == "val" else "")
            )
        rng = _rng(int(seed), code, _STREAM_FEW_SHOT, int(c))
        chosen.append(rng.choice(candidates, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)


def _stratified_counts(n: int, classname: str) -> tuple[int, int, int]:
    """(train, val, test) counts of a class with n images: val and test at least one each."""
    _, p_val, p_test = STRATIFIED_FRACTIONS
    if n < 3:
        raise FastpromptError(
            f"class {classname!r} has {n} image(s); a train/val/test split needs at least 3 per class "
            "- add images, or give the split with --split-json or train/ val/ test/ folders"
        )
    n_val = max(1, round(n * p_val))
    n_test = max(1, round(n * p_test))
    return n - n_val - n_test, n_val, n_test


def stratified_split(paths_by_class: Sequence[Sequence[str]], classnames: Sequence[str]) -> list[Sample]:
    """CoOp's split for datasets without one: per class 50% train, 20% val, 30% test.

    Each class's paths are sorted and permuted by a stream of (SPLIT_SEED, class label),
    so the split depends only on the file names.
    """
    samples: list[Sample] = []
    for label, paths in enumerate(paths_by_class):
        ordered = sorted(paths)
        n_train, n_val, _ = _stratified_counts(len(ordered), classnames[label])
        perm = _rng(SPLIT_SEED, _STREAM_STRATIFIED, label).permutation(len(ordered))
        for rank, i in enumerate(perm):
            split = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
            samples.append(Sample(ordered[i], label, split))
    return samples


def hold_out_val(train_by_class: Sequence[Sequence[str]], classnames: Sequence[str]) -> list[Sample]:
    """Split train images into train and val (20% per class, at least one) when no val exists."""
    samples: list[Sample] = []
    for label, paths in enumerate(train_by_class):
        ordered = sorted(paths)
        n = len(ordered)
        if n < 2:
            raise FastpromptError(
                f"class {classnames[label]!r} has {n} train image; holding out validation images needs at least 2 "
                "- add images or a val/ folder"
            )
        n_val = max(1, round(n * VAL_FROM_TRAIN_FRACTION))
        perm = _rng(SPLIT_SEED, _STREAM_VAL_FROM_TRAIN, label).permutation(n)
        for rank, i in enumerate(perm):
            samples.append(Sample(ordered[i], label, "val" if rank < n_val else "train"))
    return samples


def read_coop_split(split_json: Path, root: Path) -> tuple[list[Sample], list[str]]:
    """Read a CoOp split file: {"train"|"val"|"test": [[relative_path, label, classname], ...]}.

    Returns the samples (in file order, train then val then test) and the raw class names
    by label. Checks that every file exists under `root`, that each label has one class
    name and each class name one label, and that labels run 0..K-1.
    """
    try:
        with open(split_json, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FastpromptError(f"split file {split_json} does not exist; check the --split-json path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FastpromptError(f"split file {split_json} is not readable JSON ({err}); pass a CoOp split_zhou_*.json") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(s), list) for s in SPLITS):
        raise FastpromptError(
            f"split file {split_json} must be a JSON object with lists 'train', 'val' and 'test' of "
            "[relative_path, label, classname] entries (CoOp's split_zhou_*.json format)"
        )
    samples: list[Sample] = []
    name_of: dict[int, str] = {}
    label_of: dict[str, int] = {}
    missing: list[str] = []
    for split in SPLITS:
        for k, entry in enumerate(data[split]):
            if (
                not isinstance(entry, list)
                or len(entry) != 3
                or not isinstance(entry[0], str)
                or isinstance(entry[1], bool)
                or not isinstance(entry[1], int)
                or not isinstance(entry[2], str)
            ):
                raise FastpromptError(
                    f"split file {split_json}: {split}[{k}] = {entry!r} is not [relative_path, label, classname]; "
                    "fix the entry"
                )
            rel, label, name = entry
            if label < 0:
                raise FastpromptError(f"split file {split_json}: {split}[{k}] has negative label {label}; labels run 0..K-1")
            if name_of.setdefault(label, name) != name:
                raise FastpromptError(
                    f"split file {split_json}: label {label} is called both {name_of[label]!r} and {name!r} "
                    f"({split}[{k}], {rel}); each label needs one class name - fix the split file"
                )
            if label_of.setdefault(name, label) != label:
                raise FastpromptError(
                    f"split file {split_json}: class {name!r} has labels {label_of[name]} and {label} "
                    f"({split}[{k}], {rel}); each class name needs one label - fix the split file"
                )
            rel = rel.replace("\\", "/")
            if not os.path.isfile(root / rel):
                missing.append(rel)
            samples.append(Sample(rel, label, split))
    if missing:
        raise FastpromptError(
            f"split file {split_json} names {len(missing)} file(s) missing under {root}, e.g. {missing[0]}; "
            "pass the image folder the split's paths are relative to"
        )
    if not samples:
        raise FastpromptError(f"split file {split_json} lists no images; pass a non-empty split file")
    num_classes = max(name_of) + 1
    absent = [c for c in range(num_classes) if c not in name_of]
    if absent:
        raise FastpromptError(
            f"split file {split_json}: labels must run 0..{num_classes - 1} but {len(absent)} are unused, e.g. {absent[0]}; "
            "fix the split file"
        )
    return samples, [name_of[c] for c in range(num_classes)]
