"""Splits and subsets of the CoOp protocol: split files, stratified splits, few-shot, base/new.

Few-shot subsets are Dassl's draw (`dassl_few_shot`): Python's `random` seeded with the
run seed, `random.sample` per label in the split file's order, so a seed picks the same
files as CoOp, CoCoOp, MaPLe and the CAVPT authors' code. The splits fastprompt makes
itself for datasets that ship none (stratified, validation hold-out) are pure functions of
the file names through numpy's `SeedSequence` and `PCG64`, stable across platforms.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from fastprompt.errors import FastpromptError
from fastprompt.validation import is_int

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
# Stream tags, so that the two split streams never coincide.
_STREAM_STRATIFIED = 1
_STREAM_VAL_FROM_TRAIN = 2


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


@dataclass(frozen=True)
class FewShotDraw:
    """One seed's few-shot subsets of train and val, as Dassl draws them.

    `train` and `val` are `.beton` indices in Dassl's output order (the order CoOp's
    `split_fewshot/shot_K-seed_S.pkl` stores): labels in order of first appearance in the
    split, the `random.sample` order within a label. `short` names the (split, label,
    available) of every label that had fewer images than asked and took them all.
    """

    shots: int
    seed: int
    train: np.ndarray  # (n_train,) int64
    val: np.ndarray  # (n_val,) int64
    short: tuple[tuple[str, int, int], ...]


def _check_shots_seed(shots: object, seed: object) -> None:
    if not is_int(shots) or shots < 1:
        raise FastpromptError(f"shots={shots!r} must be a positive integer (or None for the whole split)")
    if not is_int(seed) or seed < 0:
        raise FastpromptError(f"seed={seed!r} must be a non-negative integer (CoOp uses seeds 1, 2, 3)")


def _dassl_sample(order: np.ndarray, labels: np.ndarray, shots: int, rng: random.Random) -> tuple[list[int], list[tuple[int, int]]]:
    """Dassl's `generate_fewshot_dataset` on one split (`order`: its indices in split-file order).

    dassl/data/datasets/base_dataset.py: `split_dataset_by_label` groups the items by label
    in order of first appearance (a defaultdict), file order within a label; then per label
    `random.sample(items, num_shots)`, or all items when fewer (repeat=False). Returns the
    chosen indices in that order and the (label, available) of the short labels.
    """
    tracker: dict[int, list[int]] = {}
    for i in order.tolist():
        tracker.setdefault(int(labels[i]), []).append(i)
    chosen: list[int] = []
    short: list[tuple[int, int]] = []
    for label, items in tracker.items():
        if len(items) >= shots:
            chosen.extend(rng.sample(items, shots))
        else:
            chosen.extend(items)
            short.append((label, len(items)))
    return chosen, short


def dassl_few_shot(labels: np.ndarray, splits: np.ndarray, shots: int, seed: int) -> FewShotDraw:
    """The K-shot train and min(K, 4)-shot val subsets a CoOp-family run with seed `seed` uses.

    Exactly what CoOp's datasets (e.g. datasets/oxford_pets.py) do after Dassl's
    `set_random_seed(seed)` (dassl/utils/tools.py: `random.seed(seed)`, numpy, torch) in
    train.py: nothing consumes Python's `random` before the dataset is built (the trainer
    builds its data loader before its model), then `generate_fewshot_dataset(train, K)`
    and `generate_fewshot_dataset(val, min(K, 4))` draw from the same stream. A private
    `random.Random(seed)` gives that stream without touching the global one. A dataset
    without val images (ImageNet, whose val set is its test set in CoOp) draws train only,
    as CoOp's datasets/imagenet.py does. Samples of a split are in split-file order in the
    `.beton` (the writer keeps it), so `labels`/`splits` in `.beton` order suffice.
    """
    _check_shots_seed(shots, seed)
    rng = random.Random(int(seed))
    train, short_train = _dassl_sample(np.flatnonzero(splits == SPLIT_CODE["train"]), labels, int(shots), rng)
    val_order = np.flatnonzero(splits == SPLIT_CODE["val"])
    val: list[int] = []
    short_val: list[tuple[int, int]] = []
    if len(val_order):
        val, short_val = _dassl_sample(val_order, labels, min(int(shots), VAL_SHOTS_CAP), rng)
    short = tuple(("train", c, n) for c, n in short_train) + tuple(("val", c, n) for c, n in short_val)
    return FewShotDraw(int(shots), int(seed), np.asarray(train, dtype=np.int64), np.asarray(val, dtype=np.int64), short)


def few_shot_order(
    labels: np.ndarray,
    splits: np.ndarray,
    classnames: Sequence[str],
    split: str,
    shots: Optional[int],
    draw: Optional[FewShotDraw],
    kept: Sequence[int],
) -> np.ndarray:
    """Indices of `split` restricted to classes `kept`, in Dassl's order (see `FewShotDraw`).

    `shots=None` or the test split: the whole split in split-file order. Otherwise `draw`
    (made over all classes, before the class half is taken: CoCoOp's `subsample_classes`
    runs after the draw) restricted to `kept`. A kept class without images in a drawn split
    is an error.
    """
    validate_split(split)
    in_split = np.flatnonzero(splits == SPLIT_CODE[split])
    kept_arr = np.asarray(kept, dtype=labels.dtype)
    if shots is None or split == "test":  # the test split is never subsampled
        return in_split[np.isin(labels[in_split], kept_arr)].astype(np.int64)
    if draw is None or draw.shots != shots:
        raise ValueError(f"few_shot_order: {split} with shots={shots} needs that draw")
    if split == "val" and len(in_split) == 0:
        return np.zeros(0, dtype=np.int64)  # no val split (ImageNet): nothing drawn
    if len(in_split) == 0:
        raise FastpromptError(
            "this dataset has no train images (a test set only, like ImageNet-A); train on another dataset "
            "and evaluate on this one with `fastprompt eval RUN --data ...`"
        )
    present = np.bincount(labels[in_split], minlength=len(classnames))
    empty = [c for c in kept if present[c] == 0]
    if empty:
        raise FastpromptError(
            f"class {classnames[empty[0]]!r} has no {split} images"
            + (f" (and {len(empty) - 1} more classes)" if len(empty) > 1 else "")
            + "; every class needs at least one - fix the split or re-prepare the dataset"
        )
    chosen = draw.train if split == "train" else draw.val
    return chosen[np.isin(labels[chosen], kept_arr)]


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


def read_coop_split(split_json: Path, root: Path, num_classes: Optional[int] = None,
                    dataset: Optional[str] = None) -> tuple[list[Sample], list[str]]:
    """Read a CoOp split file: {"train"|"val"|"test": [[relative_path, label, classname], ...]}.

    Returns the samples (in file order, train then val then test) and the raw class names
    by label. Checks that every file exists under `root`, that each label has one class
    name and each class name one label, and that labels run 0..K-1: an entry's label must
    be a non-negative integer below `num_classes` when the dataset's class count is known
    (`dataset` names it in the message), and below the number of class names the file
    gives otherwise. Nothing is allocated per label value, so a label of 10**12 is one
    line of error, not a list of every unused label.
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
    first_at: dict[int, str] = {}  # label -> the first entry that has it
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
                raise FastpromptError(f"split file {split_json}: {split}[{k}] has negative label {label}; labels run "
                                      "0..K-1 - fix the entry's label")
            if num_classes is not None and label >= num_classes:
                raise FastpromptError(
                    f"split file {split_json}: {split}[{k}] has label {label}, but {dataset or 'the dataset'} has "
                    f"{num_classes} classes (labels 0..{num_classes - 1}); fix the entry's label, or use the dataset's own split file"
                )
            first_at.setdefault(label, f"{split}[{k}]")
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
            if rel.startswith("/") or ".." in rel.split("/") or (len(rel) > 1 and rel[1] == ":"):
                raise FastpromptError(
                    f"split file {split_json}: {split}[{k}] path {rel!r} leaves the image folder (absolute or '..'); "
                    "paths must be relative to ROOT and stay inside it - fix the split file"
                )
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
    # K distinct labels (one class name each) run 0..K-1 exactly when none is K or more
    count = len(name_of)
    beyond = min((c for c in name_of if c >= count), default=None)
    if beyond is not None:
        raise FastpromptError(
            f"split file {split_json}: {first_at[beyond]} has label {beyond}, but the file names {count} classes, so labels "
            f"must run 0..{count - 1}; fix the entry's label"
        )
    return samples, [name_of[c] for c in range(count)]
