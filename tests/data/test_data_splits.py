"""CoOp protocol pieces without FFCV: class names, templates, splits, few-shot, base/new."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import numpy as np
import pytest

from _dassl import as_arrays, dassl_reference, interleaved_split

from fastprompt.data.datasets import canonical_name, clean_classname, dataset_name_from_split_file, default_template
from fastprompt.data.splits import (
    SPLIT_CODE,
    class_subset,
    dassl_few_shot,
    few_shot_order,
    read_coop_split,
    relabel_table,
    stratified_split,
)
from fastprompt.errors import FastpromptError


def test_eurosat_names_and_template():
    folders = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
               "PermanentCrop", "Residential", "River", "SeaLake"]
    assert [clean_classname(f, "EuroSAT") for f in folders] == [
        "Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
        "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"]
    assert clean_classname("Sea or Lake", "eurosat") == "Sea or Lake"  # CoOp's names pass unchanged
    assert default_template("split_zhou_EuroSAT"[11:]) == "a centered satellite photo of {}."


@pytest.mark.parametrize(
    "name, template",
    [("OxfordPets", "a photo of a {}, a type of pet."), ("oxford_flowers", "a photo of a {}, a type of flower."),
     ("Food101", "a photo of {}, a type of food."), ("fgvc_aircraft", "a photo of a {}, a type of aircraft."),
     ("DescribableTextures", "{} texture."), ("dtd", "{} texture."), ("StanfordCars", "a photo of a {}."),
     ("Caltech101", "a photo of a {}."), ("SUN397", "a photo of a {}."), ("UCF101", "a photo of a person doing {}."),
     ("imagenet", "a photo of a {}."), ("my_shapes", "a photo of a {}.")],
)
def test_templates(name, template):
    assert default_template(name) == template


def test_generic_cleanup_and_names():
    assert clean_classname("american_pit_bull_terrier", "oxford_pets") == "american pit bull terrier"
    assert clean_classname("ApplyEyeMakeup", "UCF101") == "Apply Eye Makeup"
    assert clean_classname("Apply_Eye_Makeup", "ucf101") == "Apply Eye Makeup"
    assert clean_classname("Faces", "caltech101") == "face"
    assert clean_classname("red__ball ", None) == "red ball"
    assert dataset_name_from_split_file("split_zhou_OxfordFlowers.json") == "OxfordFlowers"
    assert dataset_name_from_split_file("splits.json") is None
    assert canonical_name("OxfordFlowers") == "oxford_flowers"
    assert canonical_name("2750") == "eurosat"
    assert canonical_name("My Shapes!") == "my_shapes"


def test_stratified_split_counts_and_determinism():
    paths = [[f"c{c}/{k:03d}.png" for k in range(n)] for c, n in enumerate([10, 3, 7])]
    names = ["a", "b", "c"]
    samples = stratified_split(paths, names)
    assert samples == stratified_split([list(reversed(p)) for p in paths], names)  # depends on the file set only
    counts = {(s.label, s.split): 0 for s in samples}
    for s in samples:
        counts[(s.label, s.split)] += 1
    assert [counts[(0, s)] for s in ("train", "val", "test")] == [5, 2, 3]  # 50/20/30
    assert [counts[(1, s)] for s in ("train", "val", "test")] == [1, 1, 1]
    assert [counts[(2, s)] for s in ("train", "val", "test")] == [4, 1, 2]
    with pytest.raises(FastpromptError, match="'b' has 2 image"):
        stratified_split([["x1", "x2", "x3"], ["y1", "y2"]], ["a", "b"])


@pytest.mark.parametrize("seed", [1, 2, 3, 7])
@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_draw_is_dassls(shots, seed):
    split = interleaved_split()
    assert split["train"][0][1] == 3 and split["val"][0][1] == 3  # first appearance is not label order
    entries, labels, splits = as_arrays(split)
    draw = dassl_few_shot(labels, splits, shots, seed)
    expected = dassl_reference(split, shots, seed)
    assert [entries[i] for i in draw.train] == expected["train"]  # same files, same order
    assert [entries[i] for i in draw.val] == expected["val"]
    counts = np.bincount(labels[draw.train], minlength=5).tolist()
    assert counts == [min(shots, n) for n in [20, 3, 17, 9, 1]]  # short classes take all they have
    short_train = {(c, n) for s, c, n in draw.short if s == "train"}
    assert short_train == {(c, n) for c, n in enumerate([20, 3, 17, 9, 1]) if n < shots}
    short_val = {(c, n) for s, c, n in draw.short if s == "val"}
    assert short_val == {(c, n) for c, n in enumerate([6, 2, 5, 4, 1]) if n < min(shots, 4)}


def test_draw_continues_the_stream_into_val_and_skips_a_missing_val():
    split = interleaved_split()
    entries, labels, splits = as_arrays(split)
    draw = dassl_few_shot(labels, splits, 4, 1)
    rng = random.Random(1)  # val drawn from a fresh stream would differ: it continues after train
    fresh = [e for label, items in _by_label(split["val"]).items() for e in (rng.sample(items, 4) if len(items) >= 4 else items)]
    assert [entries[i] for i in draw.val] != fresh
    no_val = {"train": split["train"], "val": [], "test": split["test"]}  # ImageNet: CoOp draws train only
    entries, labels, splits = as_arrays(no_val)
    draw = dassl_few_shot(labels, splits, 4, 2)
    assert [entries[i] for i in draw.train] == dassl_reference(no_val, 4, 2)["train"] and len(draw.val) == 0
    with pytest.raises(FastpromptError, match=r"shots=0 must be a positive integer"):
        dassl_few_shot(labels, splits, 0, 1)
    with pytest.raises(FastpromptError, match=r"seed=-1 must be a non-negative integer"):
        dassl_few_shot(labels, splits, 1, -1)


def _by_label(items):
    out = defaultdict(list)
    for e in items:
        out[e[1]].append(e)
    return out


def test_order_restricts_the_draw_to_a_class_half_and_checks_empty_classes():
    split = interleaved_split()
    entries, labels, splits = as_arrays(split)
    names = ["w", "x", "y", "z", "v"]
    draw = dassl_few_shot(labels, splits, 8, 1)
    base = few_shot_order(labels, splits, names, "train", 8, draw, class_subset(5, "base"))
    assert base.tolist() == [i for i in draw.train if labels[i] < 3]  # CoCoOp: classes halved after the draw
    full_test = few_shot_order(labels, splits, names, "test", None, None, [0, 1, 2, 3, 4])
    assert full_test.tolist() == np.flatnonzero(splits == SPLIT_CODE["test"]).tolist()  # split-file order
    assert few_shot_order(labels, splits, names, "test", 8, draw, [0, 1, 2, 3, 4]).tolist() == full_test.tolist()
    empty = dict(split, train=[e for e in split["train"] if e[1] != 4])  # class 'v' left without train images
    entries, labels, splits = as_arrays(empty)
    draw = dassl_few_shot(labels, splits, 2, 1)
    with pytest.raises(FastpromptError, match=r"class 'v' has no train images"):
        few_shot_order(labels, splits, names, "train", 2, draw, [0, 1, 2, 3, 4])
    assert len(few_shot_order(labels, splits, names, "train", 2, draw, [0, 1])) == 4  # 'v' not kept: fine


def test_class_subsets_and_relabelling():
    assert class_subset(5, "all") == [0, 1, 2, 3, 4]
    assert class_subset(5, "base") == [0, 1, 2]  # ceil(5/2)
    assert class_subset(5, "new") == [3, 4]
    assert relabel_table(5, [3, 4]).tolist() == [-1, -1, -1, 0, 1]
    with pytest.raises(FastpromptError, match="unknown class subset"):
        class_subset(5, "novel")
    with pytest.raises(FastpromptError, match="'new' is empty"):
        class_subset(1, "new")


def test_read_coop_split_checks(tmp_path):
    (tmp_path / "a").mkdir()
    for k in range(3):
        (tmp_path / "a" / f"{k}.png").write_bytes(b"x")
    good = {"train": [["a/0.png", 0, "apple"]], "val": [["a/1.png", 1, "pear"]], "test": [["a/2.png", 0, "apple"]]}
    path = tmp_path / "split.json"
    path.write_text(json.dumps(good))
    samples, names = read_coop_split(path, tmp_path)
    assert names == ["apple", "pear"]
    assert [(s.path, s.label, s.split) for s in samples] == [("a/0.png", 0, "train"), ("a/1.png", 1, "val"), ("a/2.png", 0, "test")]
    bad_cases = {
        "missing": ({**good, "test": [["a/9.png", 0, "apple"]]}, "missing under .* a/9.png"),
        "label two names": ({**good, "test": [["a/2.png", 0, "apples"]]}, "label 0 is called both 'apple' and 'apples'"),
        "name two labels": ({**good, "test": [["a/2.png", 2, "apple"]]}, "class 'apple' has labels 0 and 2"),
        "gap": ({**good, "val": [["a/1.png", 2, "pear"]]}, r"val\[0\] has label 2, but the file names 2 classes, so labels must run 0..1"),
        "label 10**12": ({**good, "val": [["a/1.png", 10**12, "pear"]]}, r"val\[0\] has label 1000000000000, but the file "
                                                                        r"names 2 classes"),  # one line, no list of 10**12 labels
        "shape": ({**good, "val": [["a/1.png", 1]]}, r"val\[0\]"),
        "no test": ({"train": good["train"], "val": good["val"]}, "lists 'train', 'val' and 'test'"),
    }
    for _case, (data, pattern) in bad_cases.items():
        path.write_text(json.dumps(data))
        with pytest.raises(FastpromptError, match=pattern):
            read_coop_split(path, tmp_path)
