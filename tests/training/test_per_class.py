"""Per-class results (issue 25 §2, Dassl's TEST.PER_CLASS_RESULT): results.json and eval-*.json
hold `per_class` (class name -> accuracy), `confusion` (K x K counts, rows: true class) and
`mean_per_class_accuracy`; base-to-new runs hold them for base and new; `fastprompt plot
confusion RUN` draws them."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.training.runfiles import class_results

runner = CliRunner()
TINY = ["--clip", "fastprompt-tiny", "--pretrained", "none", "--workers", "1", "--shots", "2", "--batch-size", "10",
        "--epochs", "1", "--warmup-epochs", "0", "--lr", "0.05", "--coop.n-ctx", "4"]


def _train(data, out, *extra):
    result = runner.invoke(app, ["train", "--method", "coop", "--data", str(data), "--out", str(out), *TINY, *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text())


def _predicted_confusion(run, classes="all"):
    """The confusion matrix recomputed image by image: the run's model (fastprompt.load_run) on
    every test image of `classes`, one forward a batch, counted with numpy."""
    import torch

    import fastprompt
    from fastprompt.data import open_dataset
    from fastprompt.training.evaluate import model_for_classes

    data = open_dataset(json.loads((run / "config.json").read_text())["data"])
    model = fastprompt.load_run(str(run))
    if classes == "new":
        model = model_for_classes(model, data.classnames_for("new"))
    k = len(model.classnames)
    counts = np.zeros((k, k), dtype=np.int64)
    loader = data.loader("test", classes=classes, train=False, image_size=model.bundle.image_size, batch_size=7,
                         device="cpu", num_workers=1, drop_last=False)
    with torch.no_grad():
        for images, labels in loader:
            for true, predicted in zip(labels.tolist(), model(images).argmax(-1).tolist()):
                counts[true, predicted] += 1
    return counts.tolist()


def test_class_results_follow_dassl():
    """Accuracy over every image; per-class accuracy per row; their mean over the classes that have
    images (Dassl's evaluator averages the classes it saw); a class without images is null."""
    scores = class_results([[3, 1, 0], [2, 2, 0], [0, 0, 0]], ["a", "b", "c"])
    assert scores["per_class"] == {"a": 75.0, "b": 50.0, "c": None}
    assert scores["mean_per_class_accuracy"] == 62.5 and scores["accuracy"] == 62.5
    scores = class_results([[9, 1], [1, 1]], ["a", "b"])
    assert scores["accuracy"] == pytest.approx(100 * 10 / 12) and scores["mean_per_class_accuracy"] == 70.0


def test_results_and_eval_hold_per_class_accuracy_and_the_confusion_matrix(demo_beton, tmp_path):
    out = tmp_path / "run"
    results = _train(demo_beton, out)
    classnames = json.loads((out / "config.json").read_text())["classnames"]
    confusion = results["confusion"]
    assert confusion == _predicted_confusion(out)  # rows: true class, columns: predicted
    assert list(results["per_class"]) == classnames
    assert results["per_class"] == {name: 100.0 * row[k] / sum(row) for k, (name, row) in
                                    enumerate(zip(classnames, confusion))}
    assert results["mean_per_class_accuracy"] == pytest.approx(np.mean(list(results["per_class"].values())))
    assert results["test_accuracy"] == 100.0 * np.trace(confusion) / np.sum(confusion)

    result = runner.invoke(app, ["eval", str(out), "--data", str(demo_beton), "--workers", "1"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip())
    saved = json.loads((out / "eval-demo-all.json").read_text())
    assert "confusion" not in printed and printed == {k: v for k, v in saved.items() if k != "confusion"}
    assert {k: saved[k] for k in ("test_accuracy", "mean_per_class_accuracy", "per_class", "confusion")} == \
           {k: results[k] for k in ("test_accuracy", "mean_per_class_accuracy", "per_class", "confusion")}

    # the figure: one panel of 600 x 600 px at 100 dpi (and the title's strip), in RUN/figures
    from PIL import Image

    result = runner.invoke(app, ["plot", "confusion", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out / "figures" / "confusion.png")
    assert Image.open(out / "figures" / "confusion.png").size == (600, 660)


@pytest.mark.slow
def test_base_to_new_holds_per_class_results_for_base_and_new(demo_beton, tmp_path):
    from PIL import Image

    out = tmp_path / "b2n"
    results = _train(demo_beton, out, "--classes", "base")
    for half in ("base", "new"):
        assert len(results[f"{half}_per_class"]) == 5 and np.shape(results[f"{half}_confusion"]) == (5, 5)
        assert results[f"{half}_accuracy"] == class_results(results[f"{half}_confusion"],
                                                            list(results[f"{half}_per_class"]))["accuracy"]
        assert results[f"{half}_mean_per_class_accuracy"] == pytest.approx(np.mean(list(results[f"{half}_per_class"].values())))
    assert results["new_confusion"] == _predicted_confusion(out, "new")
    assert "per_class" not in results and "confusion" not in results
    result = runner.invoke(app, ["eval", str(out), "--data", str(demo_beton), "--classes", "new", "--workers", "1"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "eval-demo-new.json").read_text())
    assert saved["confusion"] == results["new_confusion"] and saved["per_class"] == results["new_per_class"]
    result = runner.invoke(app, ["plot", "confusion", str(out), "--format", "png", "--out", str(tmp_path / "figs")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "figs" / "confusion.png").size == (1200, 660)  # base and new side by side
