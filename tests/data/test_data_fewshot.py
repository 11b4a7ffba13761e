"""Dassl's few-shot draw through an opened .beton: `files()`, `indices()`, the run record."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from fastprompt.data import open_dataset, write_imagefolder
from fastprompt.errors import FastpromptError

from _dassl import dassl_reference, interleaved_split


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory):
    """A .beton written from a split file with interleaved labels and short classes."""
    base = tmp_path_factory.mktemp("interleaved")
    split = interleaved_split()
    for k, entry in enumerate(e for s in ("train", "val", "test") for e in split[s]):
        (base / "images" / entry[0]).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (k % 256, 40, 90)).save(base / "images" / entry[0])
    (base / "split_zhou_Toy.json").write_text(json.dumps(split))
    write_imagefolder(base / "images", base / "toy.beton", split_json=base / "split_zhou_Toy.json", workers=1)
    return open_dataset(base / "toy.beton"), split


@pytest.mark.parametrize("shots, seed", [(1, 1), (4, 2), (16, 3)])
def test_files_are_the_papers_files(interleaved, shots, seed):
    ds, split = interleaved
    expected = dassl_reference(split, shots, seed)
    assert ds.files("train", shots=shots, seed=seed) == [e[0] for e in expected["train"]]
    assert ds.files("val", shots=shots, seed=seed) == [e[0] for e in expected["val"]]
    assert ds.files("test", shots=shots, seed=seed) == [e[0] for e in split["test"]]  # the whole test split
    assert ds.files("train") == [e[0] for e in split["train"]]  # shots=None: the split as written
    idx = ds.indices("train", shots=shots, seed=seed)
    assert np.all(np.diff(idx) > 0)  # indices() stays sorted; files() keeps Dassl's order
    paths = ds.meta["paths"]
    assert sorted(paths[i] for i in idx) == sorted(e[0] for e in expected["train"])
    base = ds.files("train", shots=shots, seed=seed, classes="base")
    assert base == [e[0] for e in expected["train"] if e[1] < 3]  # the class half after the draw


def test_short_classes_are_named_once_and_the_run_record(interleaved, caplog):
    ds, split = interleaved
    with caplog.at_level(logging.WARNING, logger="fastprompt.data.beton"):
        ds.files("train", shots=5, seed=11)
        ds.indices("val", shots=5, seed=11)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "'x' (train: 3)" in lines[0] and "'v' (train: 1)" in lines[0]
    assert "'v' (val: 1)" in lines[0] and "'x' (val: 2)" in lines[0]
    record = ds.fewshot_record(5, 11, "all")
    expected = dassl_reference(split, 5, 11)
    assert record["train"] == expected["train"] and record["val"] == expected["val"]  # [path, label, classname]
    assert record["sampler"] == "dassl" and record["shots"] == 5 and record["seed"] == 11


def test_a_dataset_without_paths_cannot_list_files(interleaved, tmp_path):
    ds, _ = interleaved
    meta = dict(ds.meta, paths=None)
    copy = tmp_path / "copy.beton"
    copy.write_bytes(ds.path.read_bytes())
    copy.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(FastpromptError, match="records no source paths; re-create it"):
        open_dataset(copy).files("train", shots=1)


def test_a_dataset_without_val_draws_train_only(interleaved, tmp_path):
    """ImageNet in CoOp: no val split; the draw is train only (datasets/imagenet.py), val stays empty."""
    _, split = interleaved
    no_val = {"train": split["train"], "val": [], "test": split["test"]}
    for k, entry in enumerate(no_val["train"] + no_val["test"]):
        (tmp_path / "images" / entry[0]).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (k % 256, 40, 90)).save(tmp_path / "images" / entry[0])
    (tmp_path / "split_zhou_NoVal.json").write_text(json.dumps(no_val))
    write_imagefolder(tmp_path / "images", tmp_path / "noval.beton", split_json=tmp_path / "split_zhou_NoVal.json", workers=1)
    ds = open_dataset(tmp_path / "noval.beton")
    assert ds.split_sizes["val"] == 0
    record = ds.fewshot_record(4, 2, "all")
    assert record["train"] == dassl_reference(no_val, 4, 2)["train"] and record["val"] == []
    assert len(ds.indices("val", shots=4, seed=2)) == 0
