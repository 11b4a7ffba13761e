"""A run directory means one setting (issue 17 §1): the identity rule, --resume / --restart /
--force-eval, a finished run not evaluated again, default names, results.json provenance, and
a directory validated as a whole (stale files, garbage config.json, hand-edited checkpoints)."""

import dataclasses
import json
import os

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.training import TrainConfig, Trainer
from fastprompt.runtime import effective_precision
from fastprompt.training.identity import EXECUTION_FIELDS, first_difference, identity, identity_hash
from fastprompt.training.plan import plan_run

runner = CliRunner()
TINY = ["--clip", "fastprompt-tiny", "--pretrained", "none", "--workers", "1", "--shots", "2", "--batch-size", "10",
        "--epochs", "2", "--warmup-epochs", "0", "--coop.n-ctx", "4"]


def _train(demo_beton, out, *extra, code=0):
    result = runner.invoke(app, ["train", "--method", "coop", "--data", str(demo_beton), "--out", str(out), *TINY, *extra])
    assert result.exit_code == code, result.output
    return " ".join(result.output.split())


def _config(demo_beton, out, **changes):
    base = dict(method="coop", data=str(demo_beton), out=str(out), clip="fastprompt-tiny", pretrained=None, shots=2,
                batch_size=10, epochs=2, warmup_epochs=0, num_workers=1, options={"n_ctx": 4})
    return TrainConfig(**{**base, **changes})


def test_the_identity_fields_are_listed_once():
    """Every TrainConfig field is either part of the identity or named in EXECUTION_FIELDS: a new
    field must be sorted into one of them here."""
    result_fields = {"method", "data", "clip", "pretrained", "template", "shots", "seed", "classes", "epochs",
                     "batch_size", "optimizer", "lr", "warmup_epochs", "group_lr", "group_warmup_epochs", "warmup_lr",
                     "momentum", "weight_decay", "precision", "feature_cache", "options", "protocol"}
    # the reported model (identity, left out at "last", every earlier run's) and validation's epochs (identity
    # only where they choose the reported model: --final-model best-val)
    selection = {"final_model", "eval_every"}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields - EXECUTION_FIELDS == result_fields | selection
    config = dict.fromkeys(fields, 1) | {"method": "nope", "options": {}}
    assert set(identity(config | {"final_model": "best-val"})) == result_fields | selection
    assert set(identity(config | {"final_model": "last"})) == result_fields


def test_every_identity_field_has_its_report_rule():
    """`fastprompt report` lets a field differ between runs only as the table's axes set it
    (`FOLLOWS`, `RESOLVED`); every other identity field is the recipe, one value in every run.
    A new field or run fact is sorted here on purpose (a data checksum follows the dataset)."""
    from fastprompt.training.identity import DERIVED_FIELDS, FOLLOWS, RESOLVED
    from fastprompt.training.runfiles import RUN_FACTS

    recipe = {"protocol", "clip", "pretrained", "batch_size", "optimizer", "lr", "warmup_epochs", "warmup_lr", "momentum",
              "weight_decay", "precision", "feature_cache", "weights_id", "image_size", "autocast", "final_model",
              "eval_every"}
    fields = ({f.name for f in dataclasses.fields(TrainConfig)} | set(RUN_FACTS)) - EXECUTION_FIELDS - set(DERIVED_FIELDS)
    assert fields - {"seed"} - set(FOLLOWS) - set(RESOLVED) == recipe


def test_autocast_is_a_fact_compared_where_both_runs_record_it():
    """--precision auto is bf16 on cuda and fp32 on cpu: a run records what it computed in."""
    import torch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [effective_precision(p, d) for p in ("auto", "bf16", "fp32") for d in (cpu, cuda)] == \
        ["fp32", "bf16", "bf16", "bf16", "fp32", "fp32"]
    run = {"method": "coop", "precision": "auto", "seed": 1}
    assert first_difference({**run, "autocast": "fp32"}, {**run, "autocast": "bf16"}, both=True) == ("autocast", "fp32", "bf16")
    assert first_difference({**run, "autocast": "fp32"}, run, both=True) is None  # an earlier version's run directory


@pytest.mark.slow
def test_a_run_of_precision_auto_on_cuda_does_not_continue_in_fp32(demo_beton, tmp_path):
    out = tmp_path / "run"
    _train(demo_beton, out, "--epochs", "1")
    config = json.loads((out / "config.json").read_text())
    assert config["precision"] == "auto" and config["autocast"] == "fp32"  # on this CPU
    (out / "results.json").unlink()
    (out / "config.json").write_text(json.dumps({**config, "autocast": "bf16"}))  # as a CUDA machine writes it
    said = _train(demo_beton, out, "--epochs", "1", code=2)
    assert f"--out {out} holds a run with autocast='bf16', this command has autocast='fp32'; continue it on a cuda " \
           "device (--precision auto is bf16 on cuda, fp32 on cpu), or pass --restart" in said


@pytest.mark.slow
def test_a_different_setting_is_refused_and_a_finished_run_is_not_evaluated_again(demo_beton, tmp_path):
    out = tmp_path / "run"
    _train(demo_beton, out)
    results = (out / "results.json").read_text()
    saved = json.loads(results)
    assert saved["identity"]["pretrained"] is None and saved["identity"]["options"] == {"n_ctx": 4, "csc": False,
                                                                                       "ctx_init": None, "text_depth": 1}
    assert saved["identity"]["template"] == "a photo of a {}." and saved["identity"]["weights_id"].startswith("params:")
    assert set(saved["versions"]) == {"fastprompt", "torch", "open_clip", "triton"} and saved["wall_seconds"] > 0
    assert len(saved.get("git_commit", "0" * 40)) == 40  # a git checkout here; absent for an installed wheel
    config = json.loads((out / "config.json").read_text())
    assert config["identity_hash"] == saved["identity_hash"] == identity_hash(plan_run(_config(demo_beton, out)).config.to_dict())

    # any resolved setting that changes the result: refused, naming the field and both values; nothing written
    said = _train(demo_beton, out, "--lr", "0.5", code=2)
    assert "holds a run with lr=None, this command has lr=0.5; pass --restart" in said
    said = _train(demo_beton, out, "--weight-decay", "0", code=2)
    assert "holds a run with weight_decay=0.0005, this command has weight_decay=0.0" in said
    assert (out / "results.json").read_text() == results

    # execution settings are not: the same run, finished: not evaluated again
    said = _train(demo_beton, out, "--checkpoint-every", "3", "--device", "cpu")
    assert f"done, results in {out / 'results.json'}" in said
    assert (out / "results.json").read_text() == results
    # --force-eval evaluates again (results.json written anew: this command's wall time)
    _train(demo_beton, out, "--force-eval")
    again = json.loads((out / "results.json").read_text())
    assert again["test_accuracy"] == saved["test_accuracy"] and again["wall_seconds"] != saved["wall_seconds"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2

    # --restart replaces the run whatever it was
    _train(demo_beton, out, "--lr", "0.5", "--restart")
    config = json.loads((out / "config.json").read_text())
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert config["lr"] == 0.5 and [l["lr"]["text"] for l in lines] == [0.5, 0.25]
    assert _train(demo_beton, out, "--resume", "--restart", code=2).startswith("error: --resume and --restart contradict")


def default_run_dir(config):
    return str(plan_run(config).out)


def test_default_run_names_hold_the_weights_and_a_hash(demo_beton, tmp_path):
    a = default_run_dir(_config(demo_beton, ""))
    b = default_run_dir(_config(demo_beton, "", pretrained="openai", clip="ViT-B-32"))
    c = default_run_dir(_config(demo_beton, "", lr=0.5))
    assert a.startswith(os.path.join("runs", "coop-demo-2shot-seed1-fastprompt-tiny-random-"))
    assert b.startswith(os.path.join("runs", "coop-demo-2shot-seed1-ViT-B-32-openai-"))
    assert len({a, b, c}) == 3 and a == default_run_dir(_config(demo_beton, "", device="cpu", num_workers=3))


@pytest.mark.slow
def test_a_directory_is_taken_whole(demo_beton, tmp_path):
    """What a run stopped before its config.json leaves (the lock, temporaries of its writes) goes
    before a new run starts; --resume needs a checkpoint; a folder is a run's by a config.json or
    checkpoint.json that fastprompt wrote, and no file of another is ever removed, --restart included."""
    out = tmp_path / "run"
    out.mkdir()
    for name in (".lock", ".config.json.ab12_x9z.tmp", ".checkpoint.json.x1.tmp"):  # killed before its config.json
        (out / name).write_text("{}")
    said = _train(demo_beton, out, "--resume", code=2)
    assert "--resume: " in said and "holds no checkpoint to resume" in said
    trainer = Trainer(_config(demo_beton, out))
    try:
        assert sorted(p.name for p in out.iterdir()) == [".lock", "config.json", "fewshot.json", "metrics.jsonl"]
    finally:
        trainer.close()
    assert not (out / ".lock").exists()  # released and removed

    # a config.json that fastprompt cannot read is not taken for a run's, in any mode: nothing is removed
    (out / "config.json").write_text("{garbage")
    for mode in ((), ("--restart",)):
        said = _train(demo_beton, out, *mode, code=2)
        assert "holds a config.json that is not a fastprompt run's" in said and "--restart" not in said
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "fewshot.json", "metrics.jsonl"]

    # a run's folder: --restart removes the run's files, never a file of the user's beside them
    out = tmp_path / "run2"
    _train(demo_beton, out)
    (out / "notes.txt").write_text("mine")
    _train(demo_beton, out, "--lr", "0.5", "--restart")
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "config.json").read_text())["lr"] == 0.5

    # a garbage config.json beside a checkpoint of this run: rebuilt from it, and eval works again
    (out / "config.json").write_text("{garbage")
    (out / "results.json").unlink()
    _train(demo_beton, out, "--lr", "0.5", "--resume")
    assert json.loads((out / "config.json").read_text())["method"] == "coop"
    said = " ".join(runner.invoke(app, ["eval", str(out), "--data", str(demo_beton)]).output.split())
    assert '"test_accuracy"' in said
    (out / "config.json").write_text("[1]")
    result = runner.invoke(app, ["eval", str(out), "--data", str(demo_beton)])
    assert result.exit_code == 2 and "--restart" in result.output


@pytest.mark.slow
def test_a_run_follows_the_content_of_its_weights_and_data(tmp_path, tiny_clip):
    """config.json and every checkpoint record the CLIP weights id and the data's checksum (issue 21):
    a .beton prepared again or a weights file changed at the same path is not continued, whether
    config.json is there or lost; a run directory of an earlier version, without them, is."""
    from fastprompt.data import write_demo

    data, weights, out = tmp_path / "d.beton", tmp_path / "w.safetensors", tmp_path / "run"
    write_demo(str(data), images_per_class=4, image_size=32, seed=0, workers=1)
    original = data.read_bytes(), data.with_suffix(".json").read_bytes()
    state = {k: v.contiguous() for k, v in tiny_clip.state_dict().items()}
    save_file(state, str(weights))
    args = ("--epochs", "1", "--pretrained", str(weights))
    _train(data, out, *args)
    config, record = (json.loads((out / name).read_text()) for name in ("config.json", "checkpoint.json"))
    assert config["data_id"] == record["facts"]["data_id"] == json.loads(original[1])["checksum"]
    assert config["weights_id"] == record["facts"]["weights_id"] and config["weights_id"].startswith("file:")

    # the data prepared again with other content: a finished run is not taken for this one
    write_demo(str(data), images_per_class=4, image_size=32, seed=1, workers=1, overwrite=True)
    said = _train(data, out, *args, code=2)
    assert f"holds a run with data_id={config['data_id']!r}, this command has data_id='sha256:" in said
    assert f"the content of {data} changed since that run (prepared again, or replaced): point --data at the data it " \
           "trained on, or pass --restart" in said
    # stopped with config.json lost: its checkpoint says so
    (out / "results.json").unlink()
    (out / "config.json").unlink()
    said = _train(data, out, *args, code=2)
    assert f"checkpoint.json is a checkpoint of a run with data_id={config['data_id']!r}" in said and "--restart" in said

    # the original data, the weights file changed at its path: refused by the checkpoint too
    data.write_bytes(original[0])
    data.with_suffix(".json").write_bytes(original[1])
    stat = os.stat(weights)
    save_file({k: v + 1 for k, v in state.items()}, str(weights))
    said = _train(data, out, *args, code=2)
    assert f"checkpoint.json is a checkpoint of a run with weights_id={config['weights_id']!r}" in said
    assert "the CLIP weights differ from those it trained with" in said

    # the original weights (same bytes and time), a checkpoint of an earlier version (no facts): it resumes
    save_file(state, str(weights))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    record.pop("facts")
    (out / "checkpoint.json").write_text(json.dumps(record))
    assert "resuming" in _train(data, out, *args)
    assert json.loads((out / "config.json").read_text())["data_id"] == config["data_id"]


@pytest.mark.slow
@pytest.mark.parametrize("edit,match", [
    (lambda r: r.update(epoch=999), "says epoch 999, which this run of 1 epochs cannot have reached"),
    (lambda r: r.pop("rng"), "lacks rng"),
    (lambda r: r.update(metrics=r["metrics"][:0]), "holds metrics that are not those of epochs 1..1"),
    (lambda r: r["config"].update(seed=7), "is a checkpoint of a run with seed=7, this command has seed=1"),
    (lambda r: r["optimizer"]["param_groups"].append(r["optimizer"]["param_groups"][0]), "does not fit this run"),
])
def test_a_hand_edited_checkpoint_is_refused(demo_beton, tmp_path, edit, match):
    out = tmp_path / "run"
    _train(demo_beton, out, "--epochs", "1")
    (out / "results.json").unlink()
    record = json.loads((out / "checkpoint.json").read_text())
    edit(record)
    (out / "checkpoint.json").write_text(json.dumps(record))
    result = runner.invoke(app, ["train", "--method", "coop", "--data", str(demo_beton), "--out", str(out), *TINY,
                                 "--epochs", "1"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output  # one line
    assert match in result.output and "pass --restart" in result.output


def test_an_option_added_later_leaves_earlier_runs_the_same_run():
    """coop's class_position (issue 25 §5) at its default 'end' is what every earlier coop run
    was: left out of the identity (`NEUTRAL_OPTIONS`), so their hashes and run names stay, and an
    earlier config.json without it is this setting; another position is another setting."""
    old = {"method": "coop", "options": {"n_ctx": 4, "csc": False, "ctx_init": None, "text_depth": 1}}
    new = {**old, "options": {**old["options"], "class_position": "end"}}
    assert identity(new) == identity(old) and "class_position" not in identity(new)["options"]
    assert identity_hash(new) == identity_hash(old) and first_difference(new, old) is None
    middle = {**old, "options": {**old["options"], "class_position": "middle"}}
    assert identity(middle)["options"]["class_position"] == "middle"
    assert first_difference(middle, old) == ("options.class_position", "middle", "end")
