"""The sweep's grid and plan: cell names, shared settings, method options, and what each cell's
folder asks for (skip / evaluate / resume / start, or a conflict that stops the sweep)."""

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.errors import FastpromptError
from fastprompt.sweep import SweepConfig, expand, plan
from fastprompt.training.identity import first_difference, identity

runner = CliRunner()
# no warm-up: the groups' defaults (text 1, visual 10 epochs) leave no cosine epochs in 2 (refused when planned)
TINY = {"clip": "fastprompt-tiny", "pretrained": "none", "epochs": 2, "batch_size": 8, "warmup_epochs": 0}


def sweep(demo_beton, out, **kw):
    args = dict(methods=["coop", "vpt-deep"], data=[str(demo_beton)], seeds=[1, 2], shots=[2, None], out=str(out),
                train=dict(TINY), options={"n_ctx": 4})
    args.update(kw)
    return SweepConfig(**args)


def test_cells_are_named_and_configured_from_the_grid(demo_beton, tmp_path):
    cells = expand(sweep(demo_beton, tmp_path / "s"))
    assert [c.name for c in cells] == [f"demo/{m}/shots{k}/seed{s}" for m in ("coop", "vpt-deep")
                                       for k in (2, "all") for s in (1, 2)]
    coop, vpt = cells[0].config, cells[-1].config
    assert coop.out == str(tmp_path / "s" / "demo" / "coop" / "shots2" / "seed1")
    assert coop.data == str(Path(demo_beton).resolve()) and coop.template == "a photo of a {}."
    assert (coop.shots, coop.seed, coop.epochs, coop.clip, coop.pretrained) == (2, 1, 2, "fastprompt-tiny", None)
    assert coop.options == {"n_ctx": 4} and vpt.options == {}  # n_ctx goes to the methods that have it
    assert vpt.shots is None and vpt.seed == 2


def test_bad_grids_fail_before_anything_is_written(demo_beton, tmp_path):
    out = tmp_path / "s"
    with pytest.raises(FastpromptError, match="no method of coop,vpt-deep has option 'topk'"):
        expand(sweep(demo_beton, out, options={"topk": 3}))
    with pytest.raises(FastpromptError, match="are both dataset 'demo'"):
        expand(sweep(demo_beton, out, data=[str(demo_beton), str(demo_beton.with_suffix(".json"))]))
    with pytest.raises(FastpromptError, match="seeds=\\[1, 1\\] lists a value twice"):
        sweep(demo_beton, out, seeds=[1, 1])
    with pytest.raises(FastpromptError, match="unknown train setting\\(s\\) lrr"):
        sweep(demo_beton, out, train={"lrr": 0.1})
    with pytest.raises(FastpromptError, match="unknown method 'cop'"):
        expand(sweep(demo_beton, out, methods=["cop"]))
    with pytest.raises(FastpromptError, match="lr=-1"):
        expand(sweep(demo_beton, out, train={**TINY, "lr": -1.0}))
    assert not out.exists()


def test_eval_on_takes_each_dataset_name_once(demo_beton, tmp_path):
    """Two --eval-on files of one dataset name would share eval-NAME-all.json (the second was never
    evaluated, exit 0): refused naming both files; a target that is a --data file is skipped by
    that dataset's cells only."""
    import shutil

    copy = tmp_path / "copy" / "demo.beton"  # another file of dataset 'demo'
    copy.parent.mkdir()
    shutil.copy(demo_beton, copy)
    shutil.copy(demo_beton.with_suffix(".json"), copy.with_suffix(".json"))
    other = tmp_path / "other" / "demo.beton"
    shutil.copytree(copy.parent, other.parent)
    source = tmp_path / "src" / "src.beton"  # dataset 'src'
    shutil.copytree(copy.parent, source.parent)
    (source.parent / "demo.beton").rename(source)
    meta = json.loads((source.parent / "demo.json").read_text())
    source.with_suffix(".json").write_text(json.dumps({**meta, "name": "src"}))
    out = tmp_path / "s"
    with pytest.raises(FastpromptError, match=f"--eval-on {other} and --eval-on {copy.resolve()} are both dataset 'demo' but "
                                              "different files; a sweep evaluates each dataset once: drop one, or give one "
                                              "a distinct \"name\" in its sidecar"):
        expand(sweep(demo_beton, out, data=[str(source)], eval_on=[str(copy), str(other)]))
    with pytest.raises(FastpromptError, match=f"--eval-on {other} and --data {Path(demo_beton).resolve()} are both "
                                              "dataset 'demo' but different files"):
        expand(sweep(demo_beton, out, eval_on=[str(other)]))
    assert not out.exists()
    assert all(c.eval_on == () for c in expand(sweep(demo_beton, out, eval_on=[str(demo_beton), str(demo_beton)])))


def _fake_run(cell, *files, **changes):
    """A run folder as the trainer leaves it: the cell's config resolved (epochs, every group's lr
    and warm-up, every option, the template, absolute paths), run facts, then `changes`."""
    cell.dir.mkdir(parents=True, exist_ok=True)
    saved = {**cell.plan.config.to_dict(), "classnames": ["a"], "weights_id": "params:x", **changes}
    (cell.dir / "config.json").write_text(json.dumps(saved))
    for name in files:
        (cell.dir / name).write_text("{}")


def test_plan_reads_each_cells_folder(demo_beton, tmp_path):
    config = sweep(demo_beton, tmp_path / "s", eval_on=[])
    cells = expand(config)
    _fake_run(cells[0], "results.json")
    _fake_run(cells[1], device="cuda", num_workers=7, compile="default")  # execution only
    (cells[1].dir / "checkpoint.json").write_text(json.dumps({"format": 2, "epoch": 1, "tensors": "checkpoint-0001-x"}))
    _fake_run(cells[2])  # killed before its first checkpoint
    _fake_run(cells[3], "checkpoint.pt")  # an older fastprompt's checkpoint: the trainer refuses it, naming the fix
    actions = [(p.action, p.why) for p in plan(cells)]
    assert actions[:5] == [("skip", "finished"), ("resume", "a checkpoint after epoch 1/2"),
                           ("start", "stopped before its first checkpoint"),
                           ("resume", "a checkpoint without a readable epoch (training names the fix)"), ("start", "new")]
    assert [p.from_epoch() for p in plan(cells)][:5] == ["-", "2/2", "1/2", "1/2", "1/2"]
    (cells[1].dir / "checkpoint.json").write_text("{")  # damaged: the plan does not guess an epoch
    assert plan(cells)[1].why == "a checkpoint without a readable epoch (training names the fix)"

    # a finished cell that lacks an evaluation asked for later is only evaluated
    later = dataclasses.replace(cells[0], eval_on=(("other", "/data/other.beton"),))
    assert [(p.action, p.why) for p in plan([later])] == [("evaluate", "finished; to evaluate on other")]
    # what evaluate_run wrote for another data file of that name does not count: only this file's result
    (later.dir / "eval-other-all.json").write_text(json.dumps({"data": "/elsewhere/other.beton"}))
    assert plan([later])[0].action == "evaluate"
    (later.dir / "eval-other-all.json").write_text(json.dumps({"data": "/data/other.beton"}))
    assert plan([later])[0].action == "skip"

    config = sweep(demo_beton, tmp_path / "s", eval_on=[str(demo_beton)])
    cells = expand(config)
    assert all(c.eval_on == () for c in cells)  # a dataset is not its own cross-dataset target


def test_a_cell_holding_another_run_stops_the_sweep(demo_beton, tmp_path):
    cells = expand(sweep(demo_beton, tmp_path / "s"))
    _fake_run(cells[3], "results.json", group_lr={"text": 0.5})
    with pytest.raises(FastpromptError, match=r"cell demo/coop/shotsall/seed2 holds a run with group_lr.text=0.5, "
                                              r"this sweep has group_lr.text=0.002"):
        plan(cells)
    # the planned cell is compared resolved: an unresolved config.json (epochs None) is another setting
    _fake_run(cells[3], "results.json", epochs=None)
    with pytest.raises(FastpromptError, match=r"holds a run with epochs=None, this sweep has epochs=2"):
        plan(cells)
    # the data prepared again at the same path (another checksum): a finished cell is not skipped as this one
    _fake_run(cells[3], "results.json", data_id="sha256:" + "0" * 64)
    with pytest.raises(FastpromptError, match=r"holds a run with data_id='sha256:0000.*, this sweep has data_id='sha256:"):
        plan(cells)
    _fake_run(cells[3], "results.json")  # a run directory of a version that did not record data_id: not refused
    assert plan([cells[3]])[0].action == "skip"


def test_identity_leaves_out_execution_settings():
    a = {"method": "coop", "lr": 0.002, "device": "cpu", "num_workers": 2, "compile": "off", "out": "x", "backend": "fast"}
    b = {**a, "device": "cuda", "num_workers": 8, "compile": "default", "out": "y", "backend": "reference"}
    assert identity(a) == {"method": "coop", "lr": 0.002}
    assert first_difference(a, b) is None
    assert first_difference(a, {**b, "lr": 0.01}) == ("lr", 0.002, 0.01)
    assert first_difference({"options": (1, 2)}, {"options": [1, 2]}) is None  # compared as JSON
    assert first_difference({"lr": 1}, {}) == ("lr", 1, "<missing>")
    # method options compare resolved: a default left out equals the default written out
    assert first_difference({"method": "coop", "options": {"n_ctx": 4}},
                            {"method": "coop", "options": {"n_ctx": 4, "csc": False, "ctx_init": None}}) is None
    assert first_difference({"method": "coop", "options": {"n_ctx": 4}}, {"method": "coop", "options": {}}) == \
        ("options.n_ctx", 4, None)
    assert first_difference({}, {"extra": 1}) is None and first_difference({}, {"extra": 1}, both=True) == ("extra", "<missing>", 1)


def test_cli_dry_run_prints_the_plan_and_writes_nothing(demo_beton, tmp_path, monkeypatch):
    out = tmp_path / "s"
    cells = expand(sweep(demo_beton, out, methods=["coop"], seeds=[1], shots=[2, 4]))
    _fake_run(cells[0], "results.json")
    _fake_run(cells[1])
    (cells[1].dir / "checkpoint.json").write_text(json.dumps({"format": 2, "epoch": 1}))  # killed after epoch 1
    args = ["sweep", "--methods", "coop", "--data", str(demo_beton), "--seeds", "1", "--shots", "2,4", "--out", str(out),
            "--clip", "fastprompt-tiny", "--pretrained", "none", "--epochs", "2", "--batch-size", "8", "--warmup-epochs", "0",
            "--set", "n_ctx=4", "--dry-run"]
    monkeypatch.setenv("COLUMNS", "160")  # the table's width (rich reads it): no cell cut
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 cells: 1 skip, 0 evaluate, 1 resume, 0 start; 1 job" in result.output
    rows = {line.split()[1]: line.split("│")[2:-1] for line in result.output.splitlines() if "demo/coop" in line}
    assert [c.strip() for c in rows["demo/coop/shots4/seed1"]] == ["resume", "2/2", "a checkpoint after epoch 1/2", "1"]
    assert [c.strip() for c in rows["demo/coop/shots2/seed1"]] == ["skip", "-", "finished", "-"]
    assert sorted(p.name for p in out.iterdir()) == ["demo"]
    assert sorted(p.name for p in cells[1].dir.iterdir()) == ["checkpoint.json", "config.json"]  # nothing written


@pytest.mark.parametrize("extra,match", [
    (["--seeds", "1,x"], "--seeds '1,x' must be comma-separated integers"),
    (["--set", "n_ctx"], "--set 'n_ctx' is not key=value"),
    (["--methods", "coop,nope"], "unknown method 'nope'"),
    (["--launcher", "pbs"], "Invalid value for '--launcher': 'pbs' is not one of 'local', 'slurm', 'submitit-local'"),
])
def test_cli_bad_input_exits_2(demo_beton, tmp_path, extra, match):
    out = tmp_path / "s"
    args = ["sweep", "--methods", "coop", "--data", str(demo_beton), "--seeds", "1", "--out", str(out),
            "--clip", "fastprompt-tiny", "--pretrained", "none", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert match in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_slurm_launcher_needs_slurm_and_passes_partition_gpus_and_time(demo_beton, tmp_path, monkeypatch):
    from fastprompt.sweep.runner import SubmititLauncher

    out = tmp_path / "s"
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no srun
    result = runner.invoke(app, ["sweep", "--methods", "coop", "--data", str(demo_beton), "--seeds", "1", "--out", str(out),
                                 "--clip", "fastprompt-tiny", "--pretrained", "none", "--launcher", "slurm"])
    assert result.exit_code == 2 and "--launcher slurm needs a slurm cluster" in result.output, result.output
    assert not out.exists()

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    config = sweep(demo_beton, out, launcher="slurm", slurm_partition="gpu", slurm_gpus=2, slurm_time=90)
    from submitit.slurm.slurm import _make_sbatch_string

    params = SubmititLauncher(config).executor._executor.parameters
    script = _make_sbatch_string(command="true", folder=str(out / ".submitit" / "%j"), **params)
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90"):
        assert line in script, script


def test_generated_train_flags_reach_the_cells_that_have_them(demo_beton, tmp_path):
    """`sweep` takes `train`'s generated flags: a method option goes to the grid's methods with that
    option, a group's lr / warm-up to the methods that train that group."""
    cells = expand(sweep(demo_beton, tmp_path / "s", options={"n_ctx": 4, "n_prompts": 3},
                         train={**TINY, "group_lr": {"visual": 0.02}, "group_warmup_epochs": {"text": 0}}))
    coop = next(c.config for c in cells if c.config.method == "coop")
    vpt = next(c.config for c in cells if c.config.method == "vpt-deep")
    assert coop.options == {"n_ctx": 4} and coop.group_lr == {} and coop.group_warmup_epochs == {"text": 0}
    assert vpt.options == {"n_prompts": 3} and vpt.group_lr == {"visual": 0.02} and vpt.group_warmup_epochs == {}
    with pytest.raises(FastpromptError, match="--lr.cavpt: no method of coop,vpt-deep trains a 'cavpt' group"):
        expand(sweep(demo_beton, tmp_path / "s", train={**TINY, "group_lr": {"cavpt": 0.1}}))
    result = runner.invoke(app, ["sweep", "--methods", "coop,vpt-deep", "--data", str(demo_beton), "--out",
                                 str(tmp_path / "cli"), "--seeds", "1", "--shots", "2", "--clip", "fastprompt-tiny",
                                 "--pretrained", "none", "--epochs", "2", "--warmup-epochs", "0", "--coop.n-ctx", "4",
                                 "--vpt.n-prompts", "3", "--lr.visual", "0.02", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "demo/coop/shots2/seed1" in result.output and "demo/vpt-deep/shots2/seed1" in result.output
    assert not (tmp_path / "cli").exists()


def test_cells_are_packed_into_jobs_by_setting(demo_beton, tiny_weights, tmp_path):
    """--pack: the cells of one dataset, method, shots and setting (pretrained weights) are one job,
    at most N cells a job; random weights, --pack off and a cell only to evaluate are jobs of one."""
    from fastprompt.sweep.runner import jobs_of

    def jobs(**kw):
        config = sweep(demo_beton, tmp_path / "s", seeds=[1, 2, 3], shots=[2], **kw)
        return [[p.cell.name.split("/", 1)[1] for p in job] for job in jobs_of(plan(expand(config)), config.pack)]

    weights = {**TINY, "pretrained": str(tiny_weights)}
    assert jobs(train=weights) == [[f"coop/shots2/seed{s}" for s in (1, 2, 3)], [f"vpt-deep/shots2/seed{s}" for s in (1, 2, 3)]]
    assert jobs(train=weights, pack="2") == [["coop/shots2/seed1", "coop/shots2/seed2"], ["coop/shots2/seed3"],
                                            ["vpt-deep/shots2/seed1", "vpt-deep/shots2/seed2"], ["vpt-deep/shots2/seed3"]]
    assert jobs(train=weights, pack="off") == [[f"{m}/shots2/seed{s}"] for m in ("coop", "vpt-deep") for s in (1, 2, 3)]
    assert jobs() == [[f"{m}/shots2/seed{s}"] for m in ("coop", "vpt-deep") for s in (1, 2, 3)]  # random weights: each its own
    config = sweep(demo_beton, tmp_path / "s", seeds=[1, 2, 3], shots=[2], methods=["coop"], train=weights)
    assert [[p.cell.name[-1] for p in job] for job in jobs_of(plan(expand(config)), "auto", slots=2)] == [["1", "3"], ["2"]]
    cells = expand(sweep(demo_beton, tmp_path / "s", seeds=[1, 2, 3], shots=[2], train=weights))
    _fake_run(cells[1], "results.json")  # finished: skipped, the others of its setting still pack
    assert [[p.cell.name for p in job] for job in jobs_of(plan(cells), "auto")][0] == [cells[0].name, cells[2].name]
    with pytest.raises(FastpromptError, match="--pack 'some' must be off, auto or a number of runs >= 1"):
        sweep(demo_beton, tmp_path / "s", pack="some")


@pytest.mark.parametrize("pack, jobs", [
    ("auto", ["1: a pack of up to 3"] * 3 + ["2", "3", "4"]),
    ("2", ["1: a pack of 2"] * 2 + ["2", "3", "4", "5"]),
    ("off", ["1", "2", "3", "4", "5", "6"]),
])
def test_cli_dry_run_shows_the_packs_the_sweep_would_run(demo_beton, tiny_weights, tmp_path, monkeypatch, pack, jobs):
    """`sweep --dry-run` names each cell's job: the cells of one setting packed (pretrained weights:
    runs of several seeds share one CLIP), a method that does not pack (cocoop) alone."""
    args = ["sweep", "--methods", "coop,cocoop", "--data", str(demo_beton), "--seeds", "1,2,3", "--out", str(tmp_path / "s"),
            "--clip", "fastprompt-tiny", "--pretrained", str(tiny_weights), "--epochs", "2", "--batch-size", "8",
            "--warmup-epochs", "0", "--pack", pack, "--dry-run"]
    monkeypatch.setenv("COLUMNS", "250")  # the table's width (rich reads it): no cell cut
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1:-1] for line in result.output.splitlines() if "demo/" in line]
    assert [r[0].strip() for r in rows] == [f"demo/{m}/shots16/seed{s}" for m in ("coop", "cocoop") for s in (1, 2, 3)]
    assert [r[-1].strip() for r in rows] == jobs
    assert not (tmp_path / "s").exists()
