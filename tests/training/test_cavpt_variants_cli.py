"""`fastprompt train --method cavpt --cavpt.variant paper|released` on the demo set, both backends."""

import json

import pytest
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.methods.cavpt import Cavpt

runner = CliRunner()
TINY = ["--clip", "fastprompt-tiny", "--pretrained", "none", "--workers", "1"]


def _train(data, out, *extra):
    return runner.invoke(app, ["train", "--method", "cavpt", "--data", str(data), "--out", str(out), *TINY,
                               "--epochs", "2", "--batch-size", "32", "--lr", "0.05", "--cavpt.topk", "3", *extra])


@pytest.mark.parametrize("variant, backend, extra", [
    ("paper", "fast", []),
    ("released", "fast", ["--cavpt.text-prompt", "--coop.n-ctx", "4", "--cavpt.guidance-epochs", "1"]),
    ("released", "reference", []),
])
def test_train_then_eval_each_variant(variant, backend, extra, demo_beton, tmp_path, monkeypatch):
    epochs_told = []
    original = Cavpt.set_epoch
    monkeypatch.setattr(Cavpt, "set_epoch", lambda self, e: (epochs_told.append(e), original(self, e))[1])
    out = tmp_path / "run"
    result = _train(demo_beton, out, "--cavpt.variant", variant, "--backend", backend, *extra)
    assert result.exit_code == 0, result.output
    assert epochs_told == [0, 1]  # the trainer tells the model each epoch (released guidance)
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["variant"] == variant
    results = json.loads((out / "results.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["loss"] == m["loss"] for m in metrics)  # finite (not NaN)
    # the run directory alone rebuilds the same model: eval gives the same accuracy
    result = runner.invoke(app, ["eval", str(out), "--data", str(demo_beton), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["test_accuracy"] == pytest.approx(results["test_accuracy"])


@pytest.mark.parametrize("extra, message", [
    (["--cavpt.variant", "released", "--cavpt.topk-source", "cached"], "topk_source='cached' belongs to variant='paper'"),
    (["--cavpt.variant", "released", "--cavpt.guidance-epochs", "2"], "guidance_epochs=2 needs text_prompt=True"),
    (["--cavpt.guidance-epochs", "2"], "guidance_epochs=2 is part of variant='released'"),
    (["--cavpt.variant", "dpt"], "variant='dpt' must be one of paper, released"),
])
def test_bad_variant_options_exit_2(extra, message, demo_beton, tmp_path):
    out = tmp_path / "bad"
    result = _train(demo_beton, out, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()
