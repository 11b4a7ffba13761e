"""The image-feature cache of frozen towers: the same features and batch order as the loader."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fastprompt
from fastprompt.cli import app
from fastprompt.data import open_dataset
from fastprompt.training.feature_cache import FeatureCache


@pytest.mark.slow
def test_cached_views_and_order_equal_the_loader(demo_beton, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPROMPT_CACHE", str(tmp_path))
    ds = open_dataset(demo_beton)
    torch.manual_seed(0)
    model = fastprompt.create_model("coop", ds.classnames, clip="fastprompt-tiny", pretrained=None, n_ctx=2)
    cache = FeatureCache.build(model, ds, views=2, aug_seed=0, device="cpu", batch_size=64, num_workers=1,
                               autocast=lambda: torch.no_grad())
    assert cache.features.shape == (2, 200, 64) and len(list(tmp_path.glob("features-*.safetensors"))) == 1

    loader = ds.loader("train", train=True, image_size=64, batch_size=50, num_workers=1, order_seed=0,
                       shuffle=False, drop_last=False, return_indices=True)
    loader.set_epoch(1)
    images, _, idx = next(iter(loader))
    with torch.no_grad():
        want = model.image_features(images)
    got = cache.features[1][torch.from_numpy(cache.row_of[idx.numpy()])]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # batch order: the training loader's order for the same seed and epoch
    subset = ds.indices("train", shots=4, seed=3)
    train_loader = ds.loader("train", shots=4, seed=3, train=True, image_size=64, batch_size=8, num_workers=1,
                             order_seed=3, return_indices=True)
    train_loader.set_epoch(2)
    order = np.concatenate([i.numpy() for _, _, i in train_loader])
    labels = torch.cat([l for _, l in cache.batches(ds, subset, "all", seed=3, epoch=2, batch_size=8)])
    assert torch.equal(labels, torch.from_numpy(ds.labels[order]))

    # from disk the second time
    again = FeatureCache.build(model, ds, views=2, aug_seed=0, device="cpu", batch_size=64, num_workers=1,
                               autocast=lambda: torch.no_grad())
    assert torch.equal(again.features, cache.features)


@pytest.mark.slow
def test_train_with_feature_cache(demo_beton, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPROMPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--method", "e2mim", "--data", str(demo_beton), "--out", str(out),
                                      "--clip", "fastprompt-tiny", "--pretrained", "none", "--epochs", "3",
                                      "--feature-cache", "2", "--workers", "1", "--coop.n-ctx", "2"])
    assert result.exit_code == 0, result.output
    assert "deliberate approximation" in " ".join(result.output.split())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert "test_accuracy" in json.loads((out / "results.json").read_text())
    bad = CliRunner().invoke(app, ["train", "--method", "vpt-deep", "--data", str(demo_beton), "--out", str(tmp_path / "x"),
                                   "--feature-cache", "2"])
    assert bad.exit_code == 2 and "feature_cache needs a frozen image tower" in bad.output


@pytest.mark.slow
def test_feature_cache_builds_no_view_the_run_cannot_read(demo_beton, tmp_path, monkeypatch, caplog):
    """Epoch e reads view e: --feature-cache beyond the epochs is capped at them, said once (issue 21)."""
    from safetensors.torch import load_file

    monkeypatch.setenv("FASTPROMPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="fastprompt"):
        result = CliRunner().invoke(app, ["train", "--method", "coop", "--data", str(demo_beton), "--out", str(out),
                                          "--clip", "fastprompt-tiny", "--pretrained", "none", "--epochs", "2",
                                          "--warmup-epochs", "0", "--feature-cache", "40", "--workers", "1",
                                          "--coop.n-ctx", "2"])
    assert result.exit_code == 0, result.output
    said = [r.getMessage() for r in caplog.records if "feature_cache" in r.getMessage()]
    assert said == ["feature_cache=40 is more views than the 2 epochs of this run read (epoch e reads view e): capped at 2"]
    (cache,) = (tmp_path / "cache").glob("features-*.safetensors")
    assert load_file(str(cache))["features"].shape[0] == 2
    assert json.loads((out / "config.json").read_text())["feature_cache"] == 40  # the setting asked for
