"""A small demo .beton shared by the trainer tests (10 classes x 40 images, 20 train each)."""

import pytest


@pytest.fixture(scope="session")
def demo_beton(tmp_path_factory):
    from fastprompt.data import write_demo

    path = tmp_path_factory.mktemp("demo") / "demo.beton"
    write_demo(str(path), images_per_class=40, seed=0)
    return path
