"""A small demo .beton shared by the trainer tests (10 classes x 40 images, 20 train each)."""

import pytest


@pytest.fixture(scope="session")
def demo_beton(tmp_path_factory):
    from fastprompt.data import write_demo

    path = tmp_path_factory.mktemp("demo") / "demo.beton"
    write_demo(str(path), images_per_class=40, seed=0)
    return path


@pytest.fixture(scope="session")
def demo_clip(tmp_path_factory):
    """fastprompt-tiny pretrained on the synthetic colour-shape captions (never the demo's
    classes), shortened to 300 steps (~30 s) for the suite; `fastprompt prepare demo-clip` runs 600."""
    from fastprompt.training.pretrain import PretrainConfig, pretrain_clip

    path = tmp_path_factory.mktemp("demo-clip") / "demo-clip.pt"
    pretrain_clip(str(path), PretrainConfig(steps=300))  # warm-up: 30 steps
    return path
