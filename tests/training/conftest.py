"""A small demo .beton shared by the trainer tests (10 classes x 40 images, 20 train each).

It is drawn under white light, `light=(1, 1, 1)` (the demo set before issue 16): the trainer
tests check the machinery and that training moves (`test_learning.py`), and E2MIM does not
learn on the warm-light demo at that test's recipe (measured 2026-12-01: training accuracy
37.5 % -> 25 % in 5 epochs; with mi_weight=0 it reaches 73 %). `test_demo_lift.py` pins the
warm-light demo that `scripts/demo.sh` shows."""

import json
import shutil

import pytest


@pytest.fixture(scope="session")
def demo_beton(build_once):
    from fastprompt.data import write_demo

    return build_once("demo.beton", lambda path: write_demo(str(path), images_per_class=40, seed=0, light=(1.0, 1.0, 1.0)))


@pytest.fixture
def named_beton(demo_beton, tmp_path):
    """The demo .beton under another dataset name (its sidecar's `name`), e.g. stanford_cars:
    `named_beton("imagenet")` is a path to it."""

    def make(name):
        beton = tmp_path / f"{name}.beton"
        shutil.copy(demo_beton, beton)
        meta = json.loads(demo_beton.with_suffix(".json").read_text())
        beton.with_suffix(".json").write_text(json.dumps({**meta, "name": name}))
        return beton

    return make
