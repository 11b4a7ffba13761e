"""A run directory that rebuilds itself: config.json with every resolved value, load_run,
checkpoints as a safetensors + JSON pair committed atomically, --verbose logging."""

import json
import logging
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import fastprompt
from fastprompt.cli import app
from fastprompt.errors import FastpromptError
from fastprompt.files import atomic_write
from fastprompt.methods.vpt import VptDeep, VptDeepConfig
from fastprompt.runtime import rng_state, set_rng_state
from fastprompt.training import checkpoint

runner = CliRunner()
TINY = ["--clip", "fastprompt-tiny", "--pretrained", "none", "--workers", "1", "--shots", "2", "--batch-size", "10",
        "--epochs", "2", "--warmup-epochs", "0"]


def _train(demo_beton, out, method, *extra):
    result = runner.invoke(app, ["train", "--method", method, "--data", str(demo_beton), "--out", str(out), *TINY, *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "config.json").read_text())


@pytest.mark.slow
def test_config_holds_every_resolved_value_and_rebuilds_the_model(demo_beton, tmp_path, monkeypatch):
    out = tmp_path / "vpt"
    config = _train(demo_beton, out, "vpt-deep")
    # the defaults, written out although not typed; the depth as the tower resolved it
    assert config["options"] == {"placement": "after-ln-pre", "n_prompts": 10, "vision_depth": 3}
    assert config["group_lr"] == {"visual": 0.01} and config["group_warmup_epochs"] == {"visual": 0}
    assert config["epochs"] == 2 and config["dataset"] == "demo" and len(config["classnames"]) == 10

    # a later default does not change the model an old run directory rebuilds
    @dataclass
    class FewerPrompts(VptDeepConfig):
        n_prompts: int = 3

    monkeypatch.setattr(VptDeep, "options", FewerPrompts)
    model = fastprompt.load_run(str(out))
    saved = load_file(str(out / "prompts.safetensors"))
    assert model.visual.prompts.shape[1] == 10 and torch.equal(model.visual.prompts, saved["visual.prompts"])
    assert not model.training and model.classnames == tuple(config["classnames"])
    assert fastprompt.create_model("vpt-deep", ["a", "b"], clip="fastprompt-tiny", pretrained=None).config.n_prompts == 3


@pytest.mark.slow
def test_coop_records_its_derived_context_length(demo_beton, tmp_path):
    config = _train(demo_beton, tmp_path / "coop", "coop", "--coop.ctx-init", "a photo of a")
    assert config["options"] == {"n_ctx": 4, "csc": False, "ctx_init": "a photo of a", "text_depth": 1}
    assert fastprompt.load_run(str(tmp_path / "coop")).text.n_ctx == 4


def _state(value):
    return {"prompts.a": torch.full((2, 3), float(value))}


def test_checkpoint_pair_survives_a_crash_between_its_writes(tmp_path):
    checkpoint.save(tmp_path, {"epoch": 1, "note": "first"}, _state(1))
    record, tensors = checkpoint.load(tmp_path)
    assert record["epoch"] == 1 and torch.equal(tensors["prompts.a"], _state(1)["prompts.a"])
    # the next save dies after writing its tensors, before committing checkpoint.json
    atomic_write(tmp_path / "checkpoint-0002-deadbeef0000.safetensors",
                 lambda tmp: save_file(_state(2), tmp, metadata={"checkpoint_id": "x"}))
    record, tensors = checkpoint.load(tmp_path)
    assert record["epoch"] == 1 and torch.equal(tensors["prompts.a"], _state(1)["prompts.a"])
    checkpoint.save(tmp_path, {"epoch": 2}, _state(2))  # the next good save removes the orphan
    assert [p.name for p in tmp_path.glob("checkpoint-*.safetensors")] == [checkpoint.read_record(tmp_path)["tensors"]]
    assert checkpoint.load(tmp_path)[0]["epoch"] == 2


def test_checkpoint_pair_mismatch_and_old_format_are_refused(tmp_path):
    checkpoint.save(tmp_path, {"epoch": 1}, _state(1))
    name = checkpoint.read_record(tmp_path)["tensors"]
    save_file(_state(5), str(tmp_path / name), metadata={"checkpoint_id": "another"})
    with pytest.raises(FastpromptError, match="does not belong to checkpoint.json"):
        checkpoint.load(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(FastpromptError, match="unreadable"):
        checkpoint.load(tmp_path)
    old = tmp_path / "old"
    old.mkdir()
    (old / "checkpoint.pt").write_bytes(b"pickle")
    with pytest.raises(FastpromptError, match="checkpoint.pt from an older fastprompt.*never unpickled.*--restart"):
        checkpoint.load(old)


def test_rng_states_round_trip_through_json():
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # leave cached Gaussians in both states
    saved = json.loads(json.dumps(checkpoint.rng_to_json(rng_state())))
    want = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist())
    set_rng_state(checkpoint.rng_from_json(saved))
    assert (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist()) == want


def test_optimizer_state_round_trips_through_the_pair(tmp_path):
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([{"params": [w], "name": "text", "lr": 0.1}])
    (w ** 2).sum().backward()
    opt.step()
    tensors = {}
    parts = checkpoint.optimizer_to_parts(opt.state_dict(), tensors)
    checkpoint.save(tmp_path, {"epoch": 1, "optimizer": parts}, tensors)
    record, loaded = checkpoint.load(tmp_path)
    other = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.ones(3))], "name": "text", "lr": 0.1}])
    other.load_state_dict(checkpoint.optimizer_from_parts(record["optimizer"], loaded))
    a, b = opt.state_dict(), other.state_dict()
    assert a["param_groups"][0]["name"] == b["param_groups"][0]["name"] == "text"
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(a["state"][0][key], b["state"][0][key]), key


def test_old_checkpoint_in_out_is_refused_through_the_cli(demo_beton, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"pickle")
    result = runner.invoke(app, ["train", "--method", "coop", "--data", str(demo_beton), "--out", str(out), *TINY])
    assert result.exit_code == 2 and "checkpoint.pt from an older fastprompt" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


@pytest.mark.slow
def test_verbose_shows_info_and_warnings_always_show(demo_beton, capsys):
    args = ["zeroshot", "--data", str(demo_beton), "--clip", "fastprompt-tiny", "--pretrained", "none",
            "--workers", "99"]
    quiet = runner.invoke(app, args)
    loud = runner.invoke(app, [*args, "-v"])
    assert quiet.exit_code == loud.exit_code == 0, loud.output
    message = "workers=99 clamped to the"
    assert message not in quiet.output and message in " ".join(loud.output.split())

    assert runner.invoke(app, ["methods"]).exit_code == 0  # quiet: warnings only
    capsys.readouterr()
    logging.getLogger("fastprompt.test").info("an info line stays hidden")
    logging.getLogger("fastprompt.test").warning("a warning reaches stderr")
    err = capsys.readouterr().err
    assert "a warning reaches stderr" in err and "an info line" not in err
