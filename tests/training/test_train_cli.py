"""`fastprompt train / eval / zeroshot` end to end on the demo set with the tiny config."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import fastprompt
from fastprompt.cli import app
from fastprompt.training import checkpoint
from fastprompt.data import open_dataset
from fastprompt.runtime import seed_everything

runner = CliRunner()
TINY = ["--clip", "fastprompt-tiny", "--pretrained", "none", "--workers", "1"]


def _whole_count(accuracy, n):
    """An accuracy over n images is a whole number of hits."""
    hits = accuracy / 100 * n
    return abs(hits - round(hits)) < 1e-6


def train_args(data, out, method, *extra):
    # no warm-up: the visual groups' default of 10 epochs does not fit in 2
    return ["train", "--method", method, "--data", str(data), "--out", str(out), *TINY,
            "--epochs", "2", "--batch-size", "32", "--lr", "0.05", "--warmup-epochs", "0", *extra]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# coop stays in the quick loop (-m "not slow"): its one train-and-eval through the CLI; the rest are slow
@pytest.mark.parametrize("method", [m if m == "coop" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in fastprompt.list_methods() if m != "zeroshot"])
def test_train_then_eval_every_method(method, demo_beton, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, train_args(demo_beton, out, method))
    assert result.exit_code == 0, result.output
    for name in ("config.json", "metrics.jsonl", "prompts.safetensors", "results.json", "checkpoint.json"):
        assert (out / name).is_file(), name
    assert "train loader: decoded once: 160 training images" in result.output  # --decoded-cache auto
    metrics = _lines(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2] and all(m["images"] == 160 for m in metrics)
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == method
    assert _whole_count(results["test_accuracy"], open_dataset(demo_beton).split_sizes["test"])
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and len(config["classnames"]) == 10
    prompts = load_file(str(out / "prompts.safetensors"))
    model = fastprompt.create_model(method, config["classnames"], clip="fastprompt-tiny", pretrained=None)
    assert set(prompts) == set(model.prompt_state_dict())

    # the same run evaluated again gives the same accuracy; base classes only is another number
    result = runner.invoke(app, ["eval", str(out), "--data", str(demo_beton), "--workers", "1"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout.strip())  # stdout: the JSON alone; the human line on stderr (issue 25 §12)
    assert evaluated["test_accuracy"] == pytest.approx(results["test_accuracy"])
    assert f"test accuracy {evaluated['test_accuracy']:.2f}% (demo, classes all)" in result.stderr


@pytest.mark.slow
def test_decoded_cache_trains_the_same_prompts(demo_beton, tmp_path):
    """--decoded-cache auto (decode once) and off (decode every epoch) train the same prompts, bit for bit."""
    prompts = {}
    for setting in ("auto", "off"):
        out = tmp_path / setting
        result = runner.invoke(app, train_args(demo_beton, out, "vpt-deep", "--decoded-cache", setting))
        assert result.exit_code == 0, result.output
        said = "decoded once: 160 training images" if setting == "auto" else "decoding every epoch: 160 training images"
        assert f"train loader: {said}" in result.output
        prompts[setting] = load_file(str(out / "prompts.safetensors"))
    assert prompts["auto"].keys() == prompts["off"].keys()
    assert all(torch.equal(prompts["auto"][k], prompts["off"][k]) for k in prompts["auto"])


@pytest.mark.slow
def test_base_to_new_reports_harmonic_mean(demo_beton, tmp_path):
    out = tmp_path / "b2n"
    result = runner.invoke(app, train_args(demo_beton, out, "coop", "--classes", "base", "--coop.n-ctx", "4"))
    assert result.exit_code == 0, result.output
    r = json.loads((out / "results.json").read_text())
    b, n = r["base_accuracy"], r["new_accuracy"]
    assert r["harmonic_mean"] == pytest.approx(0 if b + n == 0 else 2 * b * n / (b + n))
    assert len(json.loads((out / "config.json").read_text())["classnames"]) == 5
    result = runner.invoke(app, ["eval", str(out), "--data", str(demo_beton), "--classes", "new", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["test_accuracy"] == pytest.approx(n)


@pytest.mark.slow
def test_zeroshot_command(demo_beton):
    result = runner.invoke(app, ["zeroshot", "--data", str(demo_beton), *TINY, "--seed", "3"])
    assert result.exit_code == 0, result.output
    acc = json.loads(result.stdout.strip().splitlines()[-1])["test_accuracy"]
    # the same count by hand: the command's CLIP (random weights from --seed), the dataset's
    # template, every test image once, in batches of another size
    ds = open_dataset(demo_beton)
    seed_everything(3)
    model = fastprompt.create_model("zeroshot", ds.classnames, clip="fastprompt-tiny", pretrained=None,
                                    template=ds.template).eval()
    correct = seen = 0
    with torch.no_grad():
        for images, labels in ds.loader("test", train=False, image_size=64, batch_size=7, num_workers=1):
            correct += int((model(images).argmax(-1) == labels).sum())
            seen += len(labels)
    assert seen == ds.split_sizes["test"]
    assert acc == pytest.approx(100.0 * correct / seen)


# ---------------------------------------------------------------------- bad input
def _fails(args, match):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert match in result.output, result.output
    assert "Traceback" not in result.output
    return result


def test_bad_method_and_option(demo_beton, tmp_path):
    out = tmp_path / "bad"
    _fails(train_args(demo_beton, out, "cop"), "Invalid value for '--method': 'cop' is not one of 'coop'")
    _fails(train_args(demo_beton, out, "coop", "--cavpt.topk", "3"), "--cavpt.topk is an option of cavpt, not of coop")
    _fails(train_args(demo_beton, out, "cavpt", "--cavpt.aux-target", "x"), "Invalid value for '--cavpt.aux-target': 'x'")
    result = runner.invoke(app, train_args(demo_beton, out, "coop", "--no-such-flag"))
    assert result.exit_code == 2 and "No such option" in result.output
    assert not out.exists()


def test_missing_and_corrupt_data(tmp_path):
    _fails(train_args(tmp_path / "nope.beton", tmp_path / "o", "coop"), "does not exist")
    bad = tmp_path / "bad.beton"
    bad.write_bytes(b"not a beton")
    _fails(train_args(bad, tmp_path / "o", "coop"), "bad.beton")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_checkpoint_of_another_method_or_classes(demo_beton, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, train_args(demo_beton, out, "coop", "--coop.n-ctx", "2")).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    _fails(train_args(demo_beton, out, "vpt-deep"), "holds a run with method='coop'")
    _fails(train_args(demo_beton, out, "coop", "--coop.n-ctx", "2", "--classes", "base"), "holds a run with classes='all'")
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_unwritable_out_as_user(demo_beton, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    _fails(train_args(demo_beton, locked / "run", "coop"), "cannot write to --out")


def test_out_that_is_a_file(demo_beton, tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    _fails(train_args(demo_beton, afile / "run", "coop"), "cannot write to --out")


def test_non_finite_loss_stops_and_keeps_the_checkpoint(demo_beton, tmp_path):
    out = tmp_path / "nan"
    args = train_args(demo_beton, out, "vpt-deep") + ["--warmup-epochs", "1", "--warmup-lr", "0.01", "--lr", "1e38",
                                                      "--epochs", "3", "--vpt.n-prompts", "2"]
    result = _fails(args, "loss became")
    assert "epoch 2 step" in result.output and "after epoch 1" in result.output
    record, tensors = checkpoint.load(out)
    assert record["epoch"] == 1 and all(torch.isfinite(v).all() for v in tensors.values())
    assert not (out / "results.json").exists()
