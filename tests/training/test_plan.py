"""Plan, then execute (issue 24 §1-2): one function resolves a run (`plan_run`), saying where each
value came from (a flag, the protocol, the dataset, a default); the engine executes plans and
resolves nothing; `train --seeds` is a list of plans, one run directory per seed."""

import json

import pytest
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.errors import FastpromptError
from fastprompt.training import TrainConfig, config as config_mod, engine as engine_mod, plan as plan_mod, \
    trainer as trainer_mod
from fastprompt.training.plan import RunPlan, plan_run

runner = CliRunner()
TINY = ["--clip", "fastprompt-tiny", "--pretrained", "none", "--workers", "1"]



@pytest.fixture
def planned(monkeypatch, tmp_path):
    """Runs `fastprompt train ARGS` up to its plans (the engine replaced by a recorder); returns them."""
    seen = []
    monkeypatch.chdir(tmp_path)  # default run folders: runs/ here

    def record(plans, console=None, **kw):
        seen.extend(plans)
        return [{} for _ in plans]

    monkeypatch.setattr(engine_mod, "execute", record)

    def run(args):
        result = runner.invoke(app, ["train", *args])
        assert result.exit_code == 0, result.output
        return seen

    return run


# (dataset name, train flags, {planned value: (value, source)}): every source of a value
SOURCES = {
    "defaults": ("demo", ["--method", "coop"], {  # n_ctx None: the built model derives it (16, or its init phrase's)
        "epochs": (200, "default"), "lr.text": (0.002, "default"), "warmup_epochs.text": (1, "default"),
        "template": ("a photo of a {}.", "dataset"), "options.n_ctx": (None, "default"), "batch_size": (32, "default"),
        "method": ("coop", "cli"), "out": (None, "default")}),
    "flags": ("demo", ["--method", "coop", "--epochs", "5", "--lr", "0.01", "--coop.n-ctx", "4", "--shots", "2",
                       "--template", "a {}."], {
        "epochs": (5, "cli"), "lr.text": (0.01, "cli"), "warmup_epochs.text": (1, "default"), "options.n_ctx": (4, "cli"),
        "shots": (2, "cli"), "template": ("a {}.", "cli"), "options.csc": (False, "default")}),
    "group flag over all-group flag": ("demo", ["--method", "vlp", "--lr", "0.03", "--lr.visual", "0.05",
                                                "--warmup-epochs", "2", "--epochs", "20"], {
        "lr.text": (0.03, "cli"), "lr.visual": (0.05, "cli"), "warmup_epochs.visual": (2, "cli")}),
    "the dataset's epochs and warm-up": ("imagenet", ["--method", "vpt-deep"], {
        "epochs": (50, "dataset"), "warmup_epochs.visual": (1, "dataset"), "lr.visual": (0.01, "default")}),
    "protocol": ("stanford_cars", ["--method", "cavpt", "--protocol", "cavpt"], {
        "epochs": (200, "protocol"), "lr.visual": (0.01, "protocol"), "warmup_epochs.cavpt": (10, "protocol"),
        "options.topk": (100, "protocol"), "clip": ("ViT-B-32", "protocol"), "method": ("cavpt", "cli"),
        "protocol": ("cavpt", "cli"), "eval_every": (0, "default")}),
    "flags over protocol": ("stanford_cars", ["--method", "cavpt", "--protocol", "cavpt", "--epochs", "12", "--lr.visual",
                                              "0.05", "--cavpt.topk", "3", "--batch-size", "8"], {
        "epochs": (12, "cli"), "lr.visual": (0.05, "cli"), "lr.cavpt": (0.01, "protocol"), "options.topk": (3, "cli"),
        "batch_size": (8, "cli"), "shots": (16, "protocol")}),
    "protocol's method and all-group recipe": ("dtd", ["--protocol", "maple-b2n"], {
        "method": ("maple", "protocol"), "lr.text": (0.0035, "protocol"), "warmup_epochs.visual": (1, "protocol"),
        "classes": ("base", "protocol"), "options.prompt_depth": (9, "protocol"), "epochs": (5, "protocol")}),
    "protocol under another method": ("dtd", ["--protocol", "cocoop-b2n", "--method", "coop", "--warmup-epochs", "0"], {
        "method": ("coop", "cli"), "lr.text": (0.002, "protocol"), "warmup_epochs.text": (0, "cli"),
        "options.ctx_init": ("a photo of a", "protocol"), "options.n_ctx": (4, "protocol")}),
}


@pytest.mark.parametrize("case", list(SOURCES))
def test_plan_says_where_every_value_came_from(case, named_beton, planned, tmp_path):
    dataset, args, expected = SOURCES[case]
    out = [] if "out" in expected else ["--out", str(tmp_path / "run")]
    plans = planned(["--data", str(named_beton(dataset)), *args, *out])
    assert len(plans) == 1
    plan = plans[0]
    values = {"epochs": plan.config.epochs, "template": plan.config.template}
    values.update({f"lr.{g}": v for g, v in plan.config.group_lr.items()})
    values.update({f"warmup_epochs.{g}": v for g, v in plan.config.group_warmup_epochs.items()})
    values.update({f"options.{k}": v for k, v in plan.config.options.items()})
    for key, (value, source) in expected.items():
        if key == "out":
            assert str(plan.out).startswith("runs/") and plan.identity_hash[:8] in str(plan.out)
        else:
            assert values.get(key, getattr(plan.config, key, None)) == value, key
        assert plan.sources[key] == source, key
    assert f"epochs = {plan.config.epochs!r} ({plan.sources['epochs']})" in plan.lines()


def test_a_library_callers_config_is_planned_as_the_command_line_plans_it(demo_beton, planned, tmp_path):
    """A TrainConfig without a record of its flags: the fields off their defaults count as given;
    its plan (settings, identity hash) is the command line's."""
    args = ["--method", "coop", "--data", str(demo_beton), "--out", str(tmp_path / "run"), "--epochs", "3", *TINY]
    cli = planned(args)[0]
    config = TrainConfig(method="coop", data=str(demo_beton), out=str(tmp_path / "run"), epochs=3, clip="fastprompt-tiny",
                         pretrained=None, num_workers=1)
    mine = plan_run(config)
    assert (mine.config, mine.identity_hash, mine.data_id, mine.classnames) == \
        (cli.config, cli.identity_hash, cli.data_id, cli.classnames)
    assert {k: mine.sources[k] for k in ("epochs", "clip", "lr.text", "batch_size", "template")} == \
        {"epochs": "cli", "clip": "cli", "lr.text": "default", "batch_size": "default", "template": "dataset"}
    # a plan crosses processes as plain data and comes back whole, resolving nothing
    assert RunPlan.from_dict(json.loads(json.dumps(mine.to_dict()))) == mine
    assert mine.with_(mode="restart", num_workers=4).config.num_workers == 4
    with pytest.raises(FastpromptError, match="lr decide what the run computes; plan the run again instead"):
        mine.with_(lr=0.1)


def test_seeds_are_one_plan_each_in_their_own_folder(demo_beton, planned, tmp_path):
    """--seeds with --out: OUT/seedS each; without: each seed's default folder; each plan the plan of
    that seed's solo command (same identity)."""
    base = ["--method", "coop", "--data", str(demo_beton), *TINY, "--epochs", "3"]
    plans = planned([*base, "--seeds", "3,1", "--out", str(tmp_path / "seeds")])
    assert [(p.config.seed, p.out) for p in plans] == [(3, tmp_path / "seeds" / "seed3"), (1, tmp_path / "seeds" / "seed1")]
    assert all(p.sources["seed"] == "cli" for p in plans)
    solo = planned([*base, "--seed", "3", "--out", str(tmp_path / "solo")])[-1]
    assert solo.identity_hash == plans[0].identity_hash and solo.identity_hash != plans[1].identity_hash
    defaults = planned([*base, "--seeds", "1,2"])[-2:]
    assert [p.out.name.split("-seed")[1].split("-")[0] for p in defaults] == ["1", "2"]
    assert all(p.identity_hash[:8] in p.out.name for p in defaults)


@pytest.mark.slow
def test_train_resolves_once_and_the_engine_never(demo_beton, tmp_path, monkeypatch):
    """`train --seeds 1,2`: the recipe resolved once per run, before the engine starts; the engine
    (Trainer) runs with planning disabled; each seed's folder is an ordinary run of that seed."""
    calls = []
    real = config_mod.resolve_recipe

    def counted(*args, **kw):
        calls.append(args[0].seed)
        return real(*args, **kw)

    monkeypatch.setattr(plan_mod, "resolve_recipe", counted)
    start = trainer_mod.Trainer.__init__

    def no_planning(self, *args, **kw):
        def refuse(*a, **k):
            raise AssertionError("the engine planned a run")

        with monkeypatch.context() as m:
            m.setattr(plan_mod, "resolve_recipe", refuse)
            m.setattr(trainer_mod, "plan_run", refuse)
            start(self, *args, **kw)

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", no_planning)
    out = tmp_path / "seeds"
    result = runner.invoke(app, ["train", "--method", "coop", "--data", str(demo_beton), "--out", str(out), *TINY,
                                 "--shots", "1", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "10",
                                 "--coop.n-ctx", "2", "--seeds", "1,2", "--compile", "off"])
    assert result.exit_code == 0, result.output
    assert calls == [1, 2]
    printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [p["seed"] for p in printed] == [1, 2]
    for seed in (1, 2):
        saved = json.loads((out / f"seed{seed}" / "config.json").read_text())
        solo = plan_run(TrainConfig(method="coop", data=str(demo_beton), out="x", clip="fastprompt-tiny", pretrained=None,
                                    shots=1, epochs=1, warmup_epochs=0, batch_size=10, seed=seed, options={"n_ctx": 2}))
        assert saved["seed"] == seed and saved["identity_hash"] == solo.identity_hash
        assert json.loads((out / f"seed{seed}" / "results.json").read_text())["identity_hash"] == solo.identity_hash
