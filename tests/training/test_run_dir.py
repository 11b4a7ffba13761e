"""A run directory that rebuilds itself: config.json with every resolved value, load_run,
checkpoints as a safetensors + JSON pair committed atomically, --verbose logging."""

import json
import logging
import random
import re
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
from fastprompt.methods.registry import method_spec
from fastprompt.methods.vpt import VptDeepConfig
from fastprompt.runtime import rng_state, set_rng_state
from fastprompt.training import checkpoint, rundir

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

    monkeypatch.setattr(method_spec("vpt-deep"), "options", FewerPrompts)  # the declaration every reader asks
    model = fastprompt.load_run(str(out))
    saved = load_file(str(out / "prompts.safetensors"))
    assert model.visual.prompts.shape[1] == 10 and torch.equal(model.visual.prompts, saved["visual.prompts"])
    assert not model.training and model.classnames == tuple(config["classnames"])
    assert fastprompt.create_model("vpt-deep", ["a", "b"], clip="fastprompt-tiny", pretrained=None).config.n_prompts == 3


@pytest.mark.slow
def test_coop_records_its_derived_context_length(demo_beton, tmp_path):
    config = _train(demo_beton, tmp_path / "coop", "coop", "--coop.ctx-init", "a photo of a")
    assert config["options"] == {"n_ctx": 4, "csc": False, "ctx_init": "a photo of a", "text_depth": 1, "class_position": "end"}
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


def test_a_checkpoint_record_is_one_json_line_with_every_rng(tmp_path):
    """checkpoint.json is written compact (the json module's C encoder: it is rewritten every epoch of
    every run) and reads back every RNG state bit for bit."""
    state = rng_state()
    checkpoint.save(tmp_path, {"epoch": 1, "rng": checkpoint.rng_to_json(state)}, _state(1))
    text = (tmp_path / checkpoint.RECORD).read_text()
    assert text.count("\n") == 1 and text.endswith("}\n")
    back = checkpoint.rng_from_json(checkpoint.load(tmp_path)[0]["rng"])
    set_rng_state(back)
    assert torch.equal(torch.get_rng_state(), state["torch"]) and random.getstate() == state["python"]


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
    # without a config.json of fastprompt beside it, nothing tells it is a run's: not read, not removed
    assert result.exit_code == 2 and "is not empty (checkpoint.pt) and holds no fastprompt run" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


# ------------------------------------------------------------------ what --out may be (issue 21)
_CONFIG = json.dumps({k: None for k in rundir.CONFIG_KEYS})  # the keys of a config.json that fastprompt wrote
_RECORD = json.dumps({k: 1 for k in rundir.CHECKPOINT_KEYS})  # ... and of a checkpoint.json
OUT_LAYOUTS = {  # name: (files in --out; None when a run may use it, else a piece of the refusal)
    "empty": ({}, None),
    "killed before its config.json": ({".lock": "", ".config.json.ab12_x9z.tmp": "{"}, None),
    "a sweep cell that failed before its config.json": ({"error.json": '{"cell": "c", "error": "e"}'}, None),
    "a run beside a file of the user's": ({"config.json": _CONFIG, "results.json": "{}", "notes.txt": ""}, None),
    "a run whose config.json is lost": ({"checkpoint.json": _RECORD, "metrics.jsonl": ""}, None),
    "a run whose config.json is damaged": ({"checkpoint.json": _RECORD, "config.json": "{garb"}, None),
    "run file names, no config.json": ({"results.json": "{}", "metrics.jsonl": "", "tensorboard/x": ""},
                                       "is not empty (metrics.jsonl, results.json, tensorboard) and holds no fastprompt run"),
    "more than four names": ({f"{c}.txt": "" for c in "abcde"}, "is not empty (a.txt, b.txt, c.txt, d.txt and 1 more)"),
    "an error.json of another program": ({"error.json": "{}"}, "is not empty (error.json)"),
    "a temporary of another file": ({".notes.txt.ab12_x9z.tmp": ""}, "is not empty (.notes.txt.ab12_x9z.tmp)"),
    "another program's config.json": ({"config.json": '{"name": "x"}'}, "holds a config.json that is not a fastprompt run's"),
    "an unreadable config.json": ({"config.json": "{garbage", "fewshot.json": "{}"}, "holds a config.json that is not"),
    "another program's checkpoint.json": ({"checkpoint.json": "{}"}, "is not empty (checkpoint.json)"),
}


@pytest.mark.parametrize("layout", list(OUT_LAYOUTS))
def test_only_a_run_or_nothing_may_be_in_out(layout, tmp_path):
    files, refusal = OUT_LAYOUTS[layout]
    out = tmp_path / "out"
    out.mkdir()
    for name, text in files.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(text)
    if refusal is None:
        rundir.check_out(out)
    else:
        with pytest.raises(FastpromptError, match=re.escape(f"--out {out} {refusal}")) as err:
            rundir.check_out(out)
        assert "--restart" not in str(err.value) and "nothing was changed" in str(err.value)


def test_out_is_never_a_shared_folder(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    home.mkdir()
    (tmp_path / "link").symlink_to("/")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    rundir.check_out(tmp_path / "absent")
    for out, what in (("", "''"), (" ", "' '")):
        with pytest.raises(FastpromptError, match=f"--out {re.escape(what)} names no folder"):
            rundir.check_out(out)
    for out, what in (("/", "the filesystem root"), (tmp_path / "link", "the filesystem root"), (home, "your home folder"),
                      (".", "the current folder"), (work, "the current folder")):
        with pytest.raises(FastpromptError, match=f"--out {re.escape(str(out))} is {what}; a run needs a folder of its own"):
            rundir.check_out(out)


def test_clearing_a_run_removes_only_its_files(tmp_path):
    names = ["config.json", "fewshot.json", "metrics.jsonl", "checkpoint.json", "checkpoint-0001-abc.safetensors",
             "prompts.safetensors", "results.json", "eval-demo-all.json", "error.json", ".results.json.ab12_x9z.tmp",
             "tensorboard/events"]
    mine = ["notes.txt", "config.json.bak", ".notes.txt.ab12_x9z.tmp", ".hidden.tmp", "results.json.old", "runs/x"]
    for name in names + mine + [".lock"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    rundir.clean_temporaries(tmp_path)
    assert not (tmp_path / ".results.json.ab12_x9z.tmp").exists() and (tmp_path / ".notes.txt.ab12_x9z.tmp").exists()
    rundir.clear(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == sorted([".lock", "runs", *mine])


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
