"""Tiny trained runs shared by the figure tests: fastprompt-tiny with random weights, a small
demo set, two epochs (seconds each). Figures need a finished run, not a good one."""

import pytest

from fastprompt.training import TrainConfig, train


@pytest.fixture(scope="session")
def viz_beton(tmp_path_factory):
    from fastprompt.data import write_demo

    path = tmp_path_factory.mktemp("viz-demo") / "demo.beton"
    write_demo(str(path), images_per_class=10, seed=0, workers=1)  # split 5/2/3 per class: 30 test images
    return path


def _train(root, method, beton, name=None, classes="all", **options):
    out = root / (name or method)
    train(TrainConfig(method=method, data=str(beton), out=str(out), clip="fastprompt-tiny", pretrained="none",
                      shots=4, epochs=2, warmup_epochs=0, batch_size=8, optimizer="adamw", lr=0.01, weight_decay=0.0,
                      num_workers=1, device="cpu", compile="off", classes=classes, options=options))
    return out


@pytest.fixture(scope="session")
def runs(tmp_path_factory, viz_beton):
    """{method: run directory} of one finished run per method drawn by the tests."""
    root = tmp_path_factory.mktemp("viz-runs")
    return {m: _train(root, m, viz_beton) for m in ("cavpt", "vpt-shallow", "coop")}


@pytest.fixture(scope="session")
def csc_run(tmp_path_factory, viz_beton):
    """A CoOp run with class-specific context (one context per class)."""
    return _train(tmp_path_factory.mktemp("viz-csc"), "coop", viz_beton, name="coop-csc", csc=True, n_ctx=2)


@pytest.fixture(scope="session")
def b2n_run(tmp_path_factory, viz_beton):
    """A base-to-new CoOp run (trained on the base half of the classes)."""
    return _train(tmp_path_factory.mktemp("viz-b2n"), "coop", viz_beton, name="coop-b2n", classes="base")
