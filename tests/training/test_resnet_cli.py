"""`fastprompt zeroshot` and `train --method coop` on a ResNet CLIP (random RN50), and the
refusal of a prompted-tower method there, through the CLI."""

import json

import pytest

from typer.testing import CliRunner

from fastprompt.cli import app


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """The demo set with 4 images per class (2 train, 1 val, 1 test): RN50 runs at 224 px on CPU
    (an image through RN50 costs ~0.14 s of CPU: 40 images in all, not 60 with 2 test images)."""
    from fastprompt.data import write_demo

    path = tmp_path_factory.mktemp("small-demo") / "demo.beton"
    write_demo(str(path), images_per_class=4, seed=0)
    return path


@pytest.mark.slow
def test_cli_zeroshot_and_coop_on_rn50(small_demo, tmp_path):
    demo_beton = small_demo
    runner = CliRunner()
    common = ["--clip", "RN50", "--pretrained", "none", "--workers", "1", "--device", "cpu"]
    result = runner.invoke(app, ["zeroshot", "--data", str(demo_beton), *common])
    assert result.exit_code == 0, result.output
    assert "test_accuracy" in json.loads(result.stdout.strip().splitlines()[-1])
    out = tmp_path / "coop-rn50"
    result = runner.invoke(app, ["train", "--method", "coop", "--data", str(demo_beton), "--out", str(out), *common,
                                 "--epochs", "1", "--warmup-epochs", "0", "--shots", "2", "--batch-size", "8",
                                 "--coop.n-ctx", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["clip"] == "RN50"
    result = runner.invoke(app, ["train", "--method", "vpt-deep", "--data", str(demo_beton), "--out", str(tmp_path / "v"),
                                 *common, "--epochs", "1", "--warmup-epochs", "0"])
    assert result.exit_code == 2 and "visual prompts need a ViT" in result.output
    assert not (tmp_path / "v").exists()
