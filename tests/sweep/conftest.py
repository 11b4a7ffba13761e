"""A small demo .beton for the sweep tests (10 classes x 20 images: 10 train, 4 val, 6 test each)."""

import pytest


@pytest.fixture(scope="session")
def demo_beton(tmp_path_factory):
    from fastprompt.data import write_demo

    path = tmp_path_factory.mktemp("sweep-demo") / "demo.beton"
    write_demo(str(path), images_per_class=20, image_size=64, seed=0)
    return path
