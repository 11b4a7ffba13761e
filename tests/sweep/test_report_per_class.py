"""`fastprompt report --metric per-class-acc` (issue 25 §2): each cell averages the runs' mean
per-class accuracy (results.json's `mean_per_class_accuracy`; base's and new's for base-to-new,
H from their means; cross-dataset targets from eval-*.json) in the layout of the accuracy table."""

import json

from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.sweep.report import report

runner = CliRunner()


def _add(run, name="results.json", **values):
    """Per-class numbers written into a hand-made run's results.json (or one of its eval files)."""
    path = run / name
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def test_per_class_accuracy_takes_the_place_of_accuracy(tmp_path, make_run):
    root = tmp_path / "sweep"
    for seed, acc, per_class in ((1, 80.0, 70.0), (2, 90.0, 76.0)):
        run = make_run(root, "eurosat", "coop", seed, acc=acc, evals={"dtd": 40.0})
        _add(run, mean_per_class_accuracy=per_class)
        _add(run, "eval-dtd-all.json", mean_per_class_accuracy=per_class - 40)
    text = report(root, "md", metric="per-class-acc")
    assert "| coop | 73.00 ± 3.00 (n=2) | 33.00 ± 3.00 (n=2) | 33.00 |" in text  # source, target, Average (targets)
    assert "**shots=16, classes=all, source=eurosat; mean per-class accuracy**" in text
    assert "| coop | 85.00 ± 5.00 (n=2) | 40.00 ± 0.00 (n=2) | 40.00 |" in report(root, "md")  # acc: unchanged

    result = runner.invoke(app, ["report", str(root), "--metric", "per-class-acc", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert "eurosat (source),eurosat (source) std" in result.stdout and "73.0000,3.0000,2" in result.stdout


def test_base_to_new_per_class_accuracy_and_its_harmonic_mean(tmp_path, make_run):
    root = tmp_path / "b2n"
    run = make_run(root, "eurosat", "coop", 1, classes="base", base=80.0, new=60.0)
    _add(run, base_mean_per_class_accuracy=75.0, new_mean_per_class_accuracy=50.0)
    text = report(root, "md", metric="per-class-acc")
    assert "| coop | 75.00 ± 0.00 (n=1) | 50.00 ± 0.00 (n=1) | 60.00 (n=1) |" in text  # H = 2·75·50 / 125


def test_a_run_without_per_class_results_names_the_fix(tmp_path, make_run):
    root = tmp_path / "old"
    run = make_run(root, "eurosat", "coop", 1, acc=80.0)  # results.json of a version before per-class results
    result = runner.invoke(app, ["report", str(root), "--metric", "per-class-acc"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {run / 'results.json'} lacks mean_per_class_accuracy (written before fastprompt kept per-class "
        "results); evaluate that run again (its train command with --force-eval), or report --metric acc")
    assert runner.invoke(app, ["report", str(root)]).exit_code == 0
