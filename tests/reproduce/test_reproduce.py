"""`fastprompt reproduce`: the plan of a shipped table on a miniature $DATA (CoOp's layout, empty
files: the plan reads no image), --list's grid sizes and estimated times, the sweep settings passed
through as SweepConfig's fields, and a miniature table on the demo set run end to end (slow)."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from data.test_data_coop import BUILDERS, touch
from fastprompt.cli import app
from fastprompt.data.datasets import find_known_dataset
from fastprompt.reproduce import load_table, make_plan
from fastprompt.reproduce.plan import GRID_FIELDS, row_epochs, sweep_fields
from fastprompt.sweep import SweepConfig

runner = CliRunner()
TABLE1 = ["eurosat", "caltech101", "oxford_flowers", "food101", "fgvc_aircraft", "dtd", "oxford_pets", "stanford_cars"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """$DATA with Table 1's 8 datasets laid out as CoOp's DATASETS.md says (files empty)."""
    root = tmp_path_factory.mktemp("coop-data")
    for name in TABLE1:
        BUILDERS[name](root, touch)
    return root


def _tree(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_dry_run_plans_table1_rows_datasets_seeds_and_writes_nothing(data_root, tmp_path):
    out = tmp_path / "t1"
    before = _tree(data_root)
    result = runner.invoke(app, ["reproduce", "cavpt-table1", "--data-root", str(data_root), "--out", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("cavpt-table1: 7 rows x 8 datasets x 3 seeds (seeds 1,2,3)")
    prepared = [l.split()[1] for l in lines if l.startswith("  prepare ")]
    assert prepared == TABLE1
    header = re.compile(r"^(.+?): (\S+?)(?: \((.*)\))?, (\d+) (?:cells \(one sweep\)|zero-shot evaluations) in (\S+)$")
    rows = {m[1]: (m[2], m[3], int(m[4]), m[5]) for m in map(header.match, lines) if m}
    table = load_table("cavpt-table1")
    assert list(rows) == [r.label for r in table.rows]
    assert [(m, n) for m, _, n, _ in rows.values()] == [("zeroshot", 8)] + [(r.method, 24) for r in table.rows[1:]]
    assert rows["VLP-CLIP-CAVPT"][1] == "text_prompt=True" and rows["VPT-CLIP-CAVPT"][1] is None
    assert len({folder for *_, folder in rows.values()}) == 7
    cells = [l.split()[1] for l in lines if l.startswith("  start ")]
    trained = [c for c in cells if c.count("/") == 3]
    expected = {f"{d}/{r.method}/shots16/seed{s}" for r in table.rows if r.trains for d in TABLE1 for s in (1, 2, 3)}
    assert set(trained) == expected and len(trained) == 6 * 8 * 3  # two cavpt rows: the same names, two folders
    assert [c for c in cells if "/" not in c] == TABLE1  # zero-shot CLIP: once per dataset (pretrained weights)
    assert "152 cells: 0 skip, 0 evaluate, 0 resume, 152 start" in result.stdout
    assert not out.exists() and _tree(data_root) == before


def test_cocoop_b2n_plans_clip_once_per_dataset_and_a_sweep_per_trained_row(tmp_path):
    """CoCoOp's Table 1 on a miniature $DATA of its 11 datasets: CLIP evaluated once per dataset,
    CoOp on CoOp's own recipe with ViT-B/16 and CoCoOp on cocoop-b2n, both on the base classes."""
    table = load_table("cocoop-b2n")
    for name in table.datasets:
        BUILDERS[name](tmp_path / "data", touch)
    plan = make_plan(table, tmp_path / "out", tmp_path / "data", seeds=[1, 2, 3])
    steps = {s.row.label: s for s in plan.rows}
    assert steps["CLIP"].sweep is None and len(steps["CLIP"].zeroshot) == 11
    coop, cocoop = steps["CoOp"].sweep, steps["CoCoOp"].sweep
    assert (coop.methods, coop.train) == (["coop"], {"clip": "ViT-B-16", "protocol": "coop", "classes": "base"})
    assert (cocoop.methods, cocoop.train) == (["cocoop"], {"protocol": "cocoop-b2n", "classes": "base"})
    assert coop.shots == cocoop.shots == [16] and len(coop.data) == len(cocoop.data) == 11


def test_plan_passes_sweep_settings_and_the_rows_recipe(data_root, tmp_path):
    table = load_table("cavpt-table1")
    plan = make_plan(table, tmp_path / "t1", data_root, seeds=[4, 5], run={"device": "cpu"},
                     sweep={"jobs": 3, "launcher": "submitit-local"})
    steps = {s.row.label: s for s in plan.rows}
    vlp_cavpt = steps["VLP-CLIP-CAVPT"].sweep
    assert isinstance(vlp_cavpt, SweepConfig)
    assert (vlp_cavpt.jobs, vlp_cavpt.launcher, vlp_cavpt.seeds, vlp_cavpt.shots) == (3, "submitit-local", [4, 5], [16])
    assert vlp_cavpt.methods == ["cavpt"] and vlp_cavpt.options == {"text_prompt": True}
    assert vlp_cavpt.train == {"device": "cpu", "protocol": "cavpt"}
    assert vlp_cavpt.data == [str(tmp_path / "t1" / "data" / f"{d}.beton") for d in TABLE1]
    assert steps["VPT-CLIP-CAVPT"].sweep.out != vlp_cavpt.out  # one sweep folder per row
    assert steps["Zero-Shot CLIP"].sweep is None and len(steps["Zero-Shot CLIP"].zeroshot) == 8


def test_every_sweep_setting_is_a_reproduce_flag():
    """The flags come from SweepConfig's fields: a field the sweep gains is a flag here, unedited."""
    from fastprompt.cli import ReproduceCommand

    names = {p.name for p in _extra(ReproduceCommand)}
    fields = {f.name for f in dataclasses.fields(SweepConfig)} - set(GRID_FIELDS)
    assert fields and set(sweep_fields()) == fields
    assert {f"sweep__{f}" for f in fields} <= names


def _extra(cls):
    from fastprompt.cli import _click_params

    return _click_params(cls.extra_flags(cls.__new__(cls)))


def _hours(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}h{minutes % 60:02d}m"


def test_list_prints_grid_sizes_and_the_bench_estimate(tmp_path):
    table = load_table("cavpt-table1")
    trained = [r for r in table.rows if r.trains]
    runs = sum(len(r.datasets(table)) * 3 for r in trained)
    epochs = sum(row_epochs(table, r, d) * 3 for r in trained for d in r.datasets(table))
    result = runner.invoke(app, ["reproduce", "--list"])
    assert result.exit_code == 0, result.output
    assert f"cavpt-table1: {table.title}" in result.stdout
    assert f"{runs} training runs, {epochs} epochs in all, 8 zero-shot evaluations" in result.stdout
    assert (runs, epochs) == (144, 144 * 200)  # the protocol's 200 epochs
    assert "estimated time: no bench figures" in result.stdout

    rates = {"coop": 400.0, "vpt-shallow": 200.0, "vpt-deep": 150.0, "cavpt": 100.0, "vlp": 120.0}
    records = [{"method": m, "variant": "fast", "clip": "ViT-B-32", "images_per_s": ips} for m, ips in rates.items()]
    records.append({"method": "coop", "variant": "reference", "clip": "ViT-B-32", "images_per_s": 1.0})  # not the fast one
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(records))
    seconds = sum(3 * row_epochs(table, r, d) * 16 * find_known_dataset(d).num_classes / rates[r.method]
                  for r in trained for d in r.datasets(table))
    result = runner.invoke(app, ["reproduce", "--list", "--bench", str(bench)])
    assert result.exit_code == 0, result.output
    block = result.stdout.split("cavpt-table2:")[0]
    assert f"estimated time: {_hours(seconds)} of training steps" in block
    bench.write_text(json.dumps(records[:1]))  # coop only
    result = runner.invoke(app, ["reproduce", "--list", "--bench", str(bench)])
    assert "no bench figure for vpt-shallow at ViT-B-32" in result.stdout.split("cavpt-table2:")[0]


DEMO_TABLE = """
name = "demo-table"
title = "A miniature table on the demo set"
datasets = ["demo"]
shots = 2
seeds = [1]
train = {{ clip = "fastprompt-tiny", pretrained = "none", epochs = 1, warmup_epochs = 0, batch_size = 8 }}
[source]
paper = "the test's own"
arxiv = ""
table = "Table 0"
setting = "tiny CLIP, 1 epoch"
read_from = "tests/reproduce/test_reproduce.py"
[columns]
demo = "Demo"
[[rows]]
label = "Zero-Shot CLIP"
method = "zeroshot"
numbers = {{ demo = 10.0, average = 10.0 }}
[[rows]]
label = "CoOp-Tiny"
method = "coop"
options = {{ n_ctx = 2 }}
numbers = {{ demo = {coop}, average = {coop} }}
[[rows]]
label = "Someday"
method = "not-yet-a-method"
numbers = {{ demo = 30.0 }}
"""


@pytest.mark.slow
def test_demo_table_runs_end_to_end_beside_the_paper(tmp_path):
    from fastprompt.data import write_demo

    table = tmp_path / "demo-table.toml"
    table.write_text(DEMO_TABLE.format(coop=20.0))
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    write_demo(str(out / "data" / "demo.beton"), images_per_class=10, image_size=32, seed=0, workers=1)
    args = ["reproduce", str(table), "--out", str(out), "--device", "cpu", "--workers", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "rows" / "coop-tiny" / "demo" / "coop" / "shots2" / "seed1" / "results.json").read_text())
    zero = json.loads((out / "rows" / "zero-shot-clip" / "demo" / "seed1" / "zeroshot.json").read_text())
    ours = run["test_accuracy"]
    row = next(l for l in result.stdout.splitlines() if l.startswith("| CoOp-Tiny |"))
    assert f"{ours:.2f} ± 0.00 (n=1) [ref 20.00, {ours - 20.0:+.2f}]" in row  # ours, the paper's, the difference
    row = next(l for l in result.stdout.splitlines() if l.startswith("| Zero-Shot CLIP |"))
    assert f"{zero['accuracy']['acc']:.2f} ± 0.00 (n=1) [ref 10.00" in row
    assert "| Someday [not-yet-a-method: not available] (no runs) | no runs [ref 30.00] |" in result.stdout
    assert "2 done, 0 skipped, 0 failed" in result.stdout
    csv = (out / "report.csv").read_text().splitlines()
    assert csv[0] == "table,shots,classes,method,Demo,Demo std,Demo n,Demo ref,Average"
    assert csv[2].startswith(f"demo-table,2,all,CoOp-Tiny,{ours:.4f},0.0000,1,20.0000,")
    assert (out / "report.md").read_text() in result.stdout and "\\begin{tabular}" in (out / "report.tex").read_text()

    again = runner.invoke(app, args)  # resumable: everything is done
    assert again.exit_code == 0 and "0 done, 2 skipped, 0 failed" in again.stdout
    shown = runner.invoke(app, ["report", str(out), "--table", str(table)])
    assert shown.exit_code == 0 and shown.stdout == (out / "report.md").read_text()
