"""Sweep tests: a small demo .beton (10 classes x 20 images: 10 train, 4 val, 6 test each) and
hand-written run folders (config.json, results.json, eval-*.json) for the report tests."""

import json

import pytest


@pytest.fixture(scope="session")
def demo_beton(tmp_path_factory):
    from fastprompt.data import write_demo

    path = tmp_path_factory.mktemp("sweep-demo") / "demo.beton"
    write_demo(str(path), images_per_class=20, image_size=64, seed=0)
    return path


def _make_run(root, dataset, method, seed, acc=None, shots=16, classes="all", base=None, new=None, evals=None, **config):
    run = root / dataset / method / f"shots{shots}" / f"seed{seed}"
    run.mkdir(parents=True)
    cfg = {"method": method, "data": f"/data/{dataset}.beton", "out": str(run), "shots": shots, "seed": seed,
           "classes": classes, "lr": 0.002, "pretrained": None, "weights_id": f"params:{seed}", "device": "cpu",
           "num_workers": seed, **config}
    (run / "config.json").write_text(json.dumps(cfg))
    results = {"method": method, "dataset": dataset, "shots": shots, "seed": seed, "classes": classes}
    results.update({"test_accuracy": acc} if classes == "all" else
                   {"base_accuracy": base, "new_accuracy": new, "harmonic_mean": 0.0})
    (run / "results.json").write_text(json.dumps(results))
    for target, value in (evals or {}).items():
        (run / f"eval-{target}-all.json").write_text(json.dumps({"dataset": target, "classes": "all", "test_accuracy": value}))
    return run


@pytest.fixture
def make_run():
    """`make_run(root, dataset, method, seed, acc, ...)`: a finished run folder with chosen numbers."""
    return _make_run
