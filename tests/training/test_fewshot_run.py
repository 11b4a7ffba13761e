"""What a run trains on: Dassl's draw recorded in fewshot.json, and a subset smaller than a batch."""

import json

import pytest
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.data import open_dataset

runner = CliRunner()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--feature-cache", "1"]], ids=["images", "feature-cache"])
def test_one_shot_run_trains_one_smaller_batch_and_records_its_files(demo_beton, tmp_path, extra):
    out = tmp_path / "run"
    args = ["train", "--method", "coop", "--data", str(demo_beton), "--out", str(out), "--clip", "fastprompt-tiny",
            "--pretrained", "none", "--workers", "1", "--epochs", "2", "--shots", "1", "--seed", "3",
            "--batch-size", "32", "--coop.n-ctx", "2", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["images"] for m in metrics] == [10, 10]  # 10 classes x 1 shot < 32: one batch of 10 per epoch
    record = json.loads((out / "fewshot.json").read_text())
    ds = open_dataset(demo_beton)
    assert [e[0] for e in record["train"]] == ds.files("train", shots=1, seed=3)
    assert [e[0] for e in record["val"]] == ds.files("val", shots=1, seed=3)
    assert [e[1] for e in record["train"]] == list(range(10))  # one per class, labels in first-appearance order
    assert [e[2] for e in record["train"]] == ds.classnames
    assert (record["shots"], record["seed"], record["classes"], record["sampler"]) == (1, 3, "all", "dassl")
