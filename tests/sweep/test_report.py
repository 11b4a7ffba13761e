"""`fastprompt report`: hand-written runs against hand-written expected tables in every format."""

import json
import re

import pytest
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.errors import FastpromptError
from fastprompt.sweep.report import build_tables, report

runner = CliRunner()


@pytest.fixture
def table1(tmp_path, make_run):
    """coop / cavpt x eurosat / dtd x seeds 1-3; coop on dtd lacks seed 3."""
    root = tmp_path / "table1"
    for seed, acc in zip((1, 2, 3), (70, 72, 74)):
        make_run(root, "eurosat", "coop", seed, acc)
    for seed, acc in zip((1, 2), (50, 52)):
        make_run(root, "dtd", "coop", seed, acc)
    for seed, acc in zip((1, 2, 3), (80, 80, 83)):
        make_run(root, "eurosat", "cavpt", seed, acc)
    for seed, acc in zip((1, 2, 3), (60, 61, 62)):
        make_run(root, "dtd", "cavpt", seed, acc)
    grid = {"datasets": ["eurosat", "dtd"], "methods": ["coop", "cavpt"], "shots": [16], "seeds": [1, 2, 3]}
    (root / "sweep.json").write_text(json.dumps({"grid": grid}))
    return root


MD = """\
**shots=16, classes=all**

| method | eurosat | dtd | Average |
|---|---:|---:|---:|
| coop | 72.00 ± 1.63 (n=3) | 51.00 ± 1.00 (n=2; seed 3 missing) | 61.50 |
| cavpt | 81.00 ± 1.41 (n=3) | 61.00 ± 0.82 (n=3) | 71.00 |

_± is the population standard deviation over seeds (ddof=0, as Dassl's tools/parse_test_res.py); n: seeds per cell._
"""

CSV = """\
shots,classes,method,eurosat,eurosat std,eurosat n,dtd,dtd std,dtd n,Average
16,all,coop,72.0000,1.6330,3,51.0000,1.0000,2,61.5000
16,all,cavpt,81.0000,1.4142,3,61.0000,0.8165,3,71.0000
"""

POP = "_± is the population standard deviation over seeds (ddof=0, as Dassl's tools/parse_test_res.py); n: seeds per cell._"

LATEX = r"""% shots=16, classes=all
\begin{tabular}{lccc}
\toprule
method & eurosat & dtd & Average \\
\midrule
coop & 72.00 $\pm$ 1.63 (n=3) & 51.00 $\pm$ 1.00 (n=2; seed 3 missing) & 61.50 \\
cavpt & 81.00 $\pm$ 1.41 (n=3) & 61.00 $\pm$ 0.82 (n=3) & 71.00 \\
\bottomrule
\multicolumn{4}{l}{\footnotesize $\pm$ is the population standard deviation over seeds (ddof=0, as Dassl's tools/parse\_test\_res.py); n: seeds per cell.} \\
\end{tabular}
"""


def test_markdown_csv_latex(table1):
    assert report(table1, "md") == MD
    assert report(table1, "csv") == CSV
    assert report(table1, "latex") == LATEX


def test_json(table1):
    got = json.loads(report(table1, "json"))
    cell = lambda m, d, mean, std, n, missing: {"method": m, "dataset": d, "metric": "acc", "mean": mean, "std": std,
                                                "n": n, "missing_seeds": missing}
    want = [{
        "keys": {"shots": "16", "classes": "all"}, "rows": "method", "cols": "dataset", "targets": [],
        "cells": [cell("coop", "eurosat", 72.0, (8 / 3) ** 0.5, 3, []), cell("coop", "dtd", 51.0, 1.0, 2, [3]),
                  cell("cavpt", "eurosat", 81.0, 2 ** 0.5, 3, []), cell("cavpt", "dtd", 61.0, (2 / 3) ** 0.5, 3, [])],
        "average": [{"method": "coop", "metric": "acc", "mean": 61.5}, {"method": "cavpt", "metric": "acc", "mean": 71.0}],
        "spread": "± is the population standard deviation over seeds (ddof=0, as Dassl's tools/parse_test_res.py); "
                  "n: seeds per cell",
    }]
    assert _approx_equal(got, want)


def _approx_equal(a, b) -> bool:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (a, b)
        return all(_approx_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (a, b)
        return all(_approx_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-12), (a, b)
        return True
    assert a == b, (a, b)
    return True


def test_std_is_population_std_as_dassl_parse_test_res(table1):
    """Dassl's tools/parse_test_res.py prints np.std(accs) (ddof=0): 70, 72, 74 -> 1.63, not 2.00."""
    (table,) = build_tables(table1)
    assert table.cells[("coop", "eurosat", "acc")].std == pytest.approx((8 / 3) ** 0.5)


def test_rows_and_cols_swap(table1):
    text = report(table1, "md", rows="dataset", cols="method")
    assert "| dataset | coop | cavpt | Average |" in text
    assert "| eurosat | 72.00 ± 1.63 (n=3) | 81.00 ± 1.41 (n=3) | 76.50 |" in text


def test_base_to_new_prints_base_new_and_harmonic_mean(tmp_path, make_run):
    root = tmp_path / "b2n"
    make_run(root, "eurosat", "coop", 1, classes="base", base=90.0, new=60.0)
    make_run(root, "eurosat", "coop", 2, classes="base", base=92.0, new=64.0)
    h = 2 * 91 * 62 / (91 + 62)  # H of the mean base and mean new accuracy, as CoCoOp's tables
    assert report(root, "md") == f"""\
**shots=16, classes=base**

| method | eurosat base | eurosat new | eurosat H | Average base | Average new | Average H |
|---|---:|---:|---:|---:|---:|---:|
| coop | 91.00 ± 1.00 (n=2) | 62.00 ± 2.00 (n=2) | {h:.2f} (n=2) | 91.00 | 62.00 | {h:.2f} |

{POP}
"""


def test_cross_dataset_prints_source_then_targets(tmp_path, make_run):
    root = tmp_path / "xd"
    make_run(root, "imagenet", "coop", 1, 70.0, evals={"eurosat": 30.0, "dtd": 40.0})
    make_run(root, "imagenet", "coop", 2, 72.0, evals={"eurosat": 34.0, "dtd": 42.0})
    assert report(root, "md") == """\
**shots=16, classes=all, source=imagenet**

| method | imagenet (source) | dtd | eurosat | Average (targets) |
|---|---:|---:|---:|---:|
| coop | 71.00 ± 1.00 (n=2) | 41.00 ± 1.00 (n=2) | 32.00 ± 2.00 (n=2) | 36.50 |

_± is the population standard deviation over seeds (ddof=0, as Dassl's tools/parse_test_res.py); n: seeds per cell._
"""


def test_base_to_new_source_with_cross_dataset_targets(tmp_path, make_run):
    root = tmp_path / "b2n-xd"
    make_run(root, "imagenet", "coop", 1, classes="base", base=80.0, new=70.0, evals={"dtd": 40.0})
    text = report(root, "md")
    assert "**shots=16, classes=base, source=imagenet**" in text and "| coop | 80.00 ± 0.00 (n=1) | 70.00 ± 0.00 (n=1) |" in text
    assert "**shots=16, classes=all, source=imagenet**" in text and "| coop | 40.00 ± 0.00 (n=1) | 40.00 |" in text


def test_refuses_runs_that_differ_in_more_than_the_seed(tmp_path, make_run):
    root = tmp_path / "mixed"
    make_run(root, "eurosat", "coop", 1, 70.0)
    make_run(root, "eurosat", "coop", 2, 72.0, lr=0.01)
    with pytest.raises(FastpromptError, match=r"seed1 and .*seed2 differ in lr \(0.002 vs 0.01\): one report holds one "
                                              r"recipe, its runs may differ only in the seed and in what the method, "
                                              r"dataset, shots and classes set .*; report them from separate folders"):
        report(root)
    result = runner.invoke(app, ["report", str(root)])
    assert result.exit_code == 2 and "differ in lr" in result.output and "Traceback" not in result.output


def test_bf16_and_fp32_runs_are_not_seeds_of_one_experiment(tmp_path, make_run):
    """--precision auto computes in bf16 on cuda and fp32 on cpu: the runs record which
    (`autocast`); a run directory of an earlier version, without it, is not refused for that."""
    root = tmp_path / "precision"
    make_run(root, "eurosat", "coop", 1, 70.0, precision="auto", autocast="bf16")
    make_run(root, "eurosat", "coop", 2, 72.0, precision="auto", autocast="fp32")
    with pytest.raises(FastpromptError, match=r"differ in autocast \('bf16' vs 'fp32'\)"):
        report(root)
    make_run(root, "eurosat", "coop", 3, 71.0, precision="auto", autocast="bf16")
    (root / "eurosat/coop/shots16/seed2/config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((root / "eurosat/coop/shots16/seed2/config.json").read_text()).items()
         if k != "autocast"}))  # as an earlier version wrote it
    assert json.loads(report(root, "json"))[0]["cells"][0]["n"] == 3


def test_weights_drawn_from_the_seed_are_not_a_difference_but_pretrained_ones_are(tmp_path, make_run):
    root = tmp_path / "weights"
    make_run(root, "eurosat", "coop", 1, 70.0)  # pretrained None: weights_id follows the seed
    make_run(root, "eurosat", "coop", 2, 72.0)
    assert "71.00 ± 1.00 (n=2)" in report(root)
    root = tmp_path / "pretrained"
    make_run(root, "eurosat", "coop", 1, 70.0, pretrained="openai")
    make_run(root, "eurosat", "coop", 2, 72.0, pretrained="openai")
    with pytest.raises(FastpromptError, match="differ in weights_id"):
        report(root)


def test_execution_settings_do_not_split_seeds(tmp_path, make_run):
    root = tmp_path / "exec"
    make_run(root, "eurosat", "coop", 1, 70.0, device="cuda", compile="default")
    make_run(root, "eurosat", "coop", 2, 72.0, device="cpu", compile="off")
    assert "71.00 ± 1.00 (n=2)" in report(root)


def test_compare_with_a_typed_csv_and_with_another_folder(table1, tmp_path, make_run):
    ref = tmp_path / "paper.csv"
    ref.write_text("method,eurosat,dtd,Average\ncoop,70.5,50,60.25\n")
    text = report(table1, "md", compare=str(ref))
    assert "| coop | 72.00 ± 1.63 (n=3) [ref 70.50, +1.50] | 51.00 ± 1.00 (n=2; seed 3 missing) [ref 50.00, +1.00] " \
           "| 61.50 [ref 60.25, +1.25] |" in text
    assert "| cavpt | 81.00 ± 1.41 (n=3) | 61.00 ± 0.82 (n=3) | 71.00 |" in text

    other = tmp_path / "other"
    for seed in (1, 2, 3):
        make_run(other, "eurosat", "coop", seed, 71.0)
    text = report(table1, "md", compare=str(other))
    assert "| coop | 72.00 ± 1.63 (n=3) [ref 71.00, +1.00] | 51.00 ± 1.00 (n=2; seed 3 missing) |" in text

    # our own csv output is a valid reference (std and n columns are ignored): every difference is 0
    ours = tmp_path / "ours.csv"
    ours.write_text(report(table1, "csv"))
    csv_text = report(table1, "csv", compare=str(ours))
    assert "eurosat ref" in csv_text.splitlines()[0]
    assert "[ref 72.00, +0.00]" in report(table1, "md", compare=str(ours))


def test_bad_input(tmp_path, table1):
    with pytest.raises(FastpromptError, match="no results.json"):
        report(_empty(tmp_path))
    with pytest.raises(FastpromptError, match="format='html' must be one of md, csv, json, latex"):
        report(table1, "html")
    with pytest.raises(FastpromptError, match="rows and cols are both"):
        report(table1, rows="dataset", cols="dataset")
    with pytest.raises(FastpromptError, match="needs a 'method' column"):
        bad = tmp_path / "bad.csv"
        bad.write_text("name,eurosat\ncoop,1\n")
        report(table1, compare=str(bad))


def _empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


# ------------------------------------------------------------------ one recipe per report (issue 21 §3)
def _as_trained(dataset, method, shots=16, protocol=None, **given):
    """The identity fields of a config.json as the trainer writes it for `dataset` (its name;
    no file is read): `TrainConfig.from_protocol` or the defaults, resolved on the dataset."""
    from fastprompt.data.datasets import default_template
    from fastprompt.methods import method_class, method_config
    from fastprompt.training import TrainConfig

    base = {"method": method, "data": f"/data/{dataset}.beton", "out": "o", "clip": "fastprompt-tiny", "pretrained": None,
            "shots": shots, **given}
    config = TrainConfig.from_protocol(protocol, dataset=dataset, **base) if protocol else TrainConfig(**base)
    options = method_config(method, **config.options)
    resolved = config.resolve(dataset, method_class(method).trained_groups(options), options.to_dict())
    saved = {**resolved.to_dict(), "template": resolved.template or default_template(dataset)}
    return {k: v for k, v in saved.items() if k not in ("method", "shots", "seed", "classes", "out")}


def _runs(root, make_run, cells):
    """make_run for each (dataset, method, seed, shots, config) with configs as the trainer writes them."""
    for dataset, method, seed, shots, config in cells:
        make_run(root, dataset, method, seed, 70.0 + seed, shots=shots, **config)
    return root


def test_two_runs_of_other_datasets_weights_and_lr_are_not_one_row(tmp_path, make_run):
    """The probe's case: one row and an Average over two runs of other recipes, without a word."""
    root = tmp_path / "mixed"
    make_run(root, "eurosat", "coop", 1, 70.0, **_as_trained("eurosat", "coop", pretrained="openai"), weights_id="tag:openai")
    make_run(root, "dtd", "coop", 1, 50.0, **_as_trained("dtd", "coop", pretrained="/w/mine.pt", lr=0.01),
             weights_id="file:abc")
    result = runner.invoke(app, ["report", str(root)])
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert re.fullmatch(rf"error: runs {root}/dtd/coop/shots16/seed1 and {root}/eurosat/coop/shots16/seed1 differ in "
                        r"(pretrained \('/w/mine.pt' vs 'openai'\)|lr \(0.01 vs None\)): one report holds one recipe, .*; "
                        "report them from separate folders", line), line  # the first of the two in config.json's order


@pytest.mark.parametrize("field, a, b", [
    ("clip", "fastprompt-tiny", "ViT-B-16"),
    ("weights_id", "tag:openai", "tag:laion"),
    ("lr", None, 0.01),
    ("batch_size", 32, 8),
    ("optimizer", "sgd", "adamw"),
    ("momentum", 0.9, 0.0),
    ("weight_decay", 5e-4, 0.0),
    ("warmup_lr", 1e-5, 1e-4),
    ("precision", "auto", "fp32"),
    ("autocast", "bf16", "fp32"),
    ("feature_cache", 0, 4),
    ("protocol", None, "coop"),
    ("epochs", 200, 100),  # given to one dataset: not what resolution gives there
    ("template", "a centered satellite photo of {}.", "a photo of a {}."),  # dtd's own is "{} texture."
    ("options.n_ctx", 16, 4),
    ("group_lr.text", 0.002, 0.01),
    ("group_warmup_epochs.text", 1, 0),
])
def test_a_setting_that_is_not_the_axes_is_one_value_across_columns(tmp_path, make_run, field, a, b):
    """Two columns (eurosat, dtd) of one row may not differ in anything the table does not show;
    the error names the field, both runs and each run's value."""
    root = tmp_path / "cols"
    head, _, sub = field.partition(".")
    runs = {}
    for dataset, value in (("eurosat", a), ("dtd", b)):
        config = {**_as_trained(dataset, "coop", pretrained="openai"), "weights_id": "tag:openai"}
        if sub:
            config[head] = {**config[head], sub: value}
        else:
            config[field] = value
        runs[str(make_run(root, dataset, "coop", 1, 70.0, **config))] = repr(value)
    with pytest.raises(FastpromptError) as err:
        report(root)
    said = re.fullmatch(rf"runs (\S+) and (\S+) differ in {re.escape(field)} \((.+?) vs (.+?)\): one report .*", str(err.value))
    assert said is not None, str(err.value)
    assert {said[1]: said[3], said[2]: said[4]} == runs


def test_what_resolution_sets_per_dataset_and_shots_may_differ(tmp_path, make_run):
    """ImageNet's 50 epochs beside EuroSAT's 200 and its 1-epoch warm-up of the visual group, each
    dataset's template, file and classes, each method's options, epochs by shots, and a protocol's
    per-dataset option (CAVPT's K_N): one table, no refusal."""
    root = tmp_path / "resolved"
    cells = []
    for dataset in ("eurosat", "imagenet", "dtd"):
        for method in ("coop", "vpt-deep"):
            for shots in (1, 16):
                config = {**_as_trained(dataset, method, shots, pretrained="openai"), "weights_id": "tag:openai",
                          "classnames": [f"{dataset} class {i}" for i in range(3)]}
                cells.append((dataset, method, 1, shots, config))
    _runs(root, make_run, cells)
    epochs = {(c[0], c[3]): c[4]["epochs"] for c in cells}
    assert epochs == {("eurosat", 1): 50, ("eurosat", 16): 200, ("imagenet", 1): 50, ("imagenet", 16): 50,
                      ("dtd", 1): 50, ("dtd", 16): 200}
    warmups = {c[0]: c[4]["group_warmup_epochs"]["visual"] for c in cells if c[1] == "vpt-deep"}
    assert warmups == {"eurosat": 10, "imagenet": 1, "dtd": 10}
    text = report(root)
    assert "| coop | 71.00 ± 0.00 (n=1) | 71.00 ± 0.00 (n=1) | 71.00 ± 0.00 (n=1) | 71.00 |" in text

    root = tmp_path / "protocol"
    cells = [(d, "cavpt", 1, 16, {**_as_trained(d, "cavpt", protocol="cavpt", clip="fastprompt-tiny", pretrained="openai"),
                                  "weights_id": "tag:openai"}) for d in ("eurosat", "caltech101")]
    assert [c[4]["options"]["topk"] for c in cells] == [5, 50]
    _runs(root, make_run, cells)
    assert "| cavpt | 71.00 ± 0.00 (n=1) | 71.00 ± 0.00 (n=1) | 71.00 |" in report(root)
    # the same K_N given on both datasets is one value too; given on one only, it is not what the protocol says there
    cells[1][4]["options"]["topk"] = 5
    _runs(tmp_path / "given", make_run, cells)
    assert "| cavpt |" in report(tmp_path / "given")
    cells[1][4]["options"]["topk"] = 20
    _runs(tmp_path / "mixed", make_run, cells)
    with pytest.raises(FastpromptError, match=r"differ in options.topk \(20 vs 5\)"):
        report(tmp_path / "mixed")


def test_a_dataset_file_is_one_file_in_every_column(tmp_path, make_run):
    """Each dataset's file and content (`data_id`) may differ between columns, not within one dataset."""
    root = tmp_path / "content"
    make_run(root, "eurosat", "coop", 1, 70.0, data_id="sha256:aa")
    make_run(root, "dtd", "coop", 1, 50.0, data_id="sha256:bb")
    assert "| coop | 50.00 ± 0.00 (n=1) | 70.00 ± 0.00 (n=1) | 60.00 |" in report(root)
    make_run(root, "eurosat", "coop", 2, 72.0, data_id="sha256:cc")  # the same path prepared again with other content
    with pytest.raises(FastpromptError, match=r"seed1 and \S+seed2 differ in data_id \('sha256:aa' vs 'sha256:cc'\)"):
        report(root)

    root = tmp_path / "files"
    make_run(root, "eurosat", "coop", 1, 70.0, data="/data/eurosat.beton")
    make_run(root, "eurosat", "cavpt", 1, 80.0, data="/other/eurosat.beton")
    with pytest.raises(FastpromptError, match=r"cavpt\S+ and \S+coop\S+ differ in data \('/other/eurosat.beton' vs "
                                              r"'/data/eurosat.beton'\)"):
        report(root)


# ------------------------------------------------------------------ ablation tables (issue 25 §3)
@pytest.fixture
def variants(tmp_path, make_run):
    """coop, and cavpt in both variants (the released one with what it resolves: aux_target gt-only), seeds 1-2."""
    root = tmp_path / "variants"
    released = {"variant": "released", "aux_target": "gt-only", "topk_source": "online"}
    for seed, (c, p, r) in zip((1, 2), ((60, 70, 74), (62, 72, 78))):
        make_run(root, "eurosat", "coop", seed, c, options={})
        make_run(root, "eurosat", "cavpt", seed, p, options={})
        make_run(root / "released", "eurosat", "cavpt", seed, r, options=released)
    return root


def test_rows_may_name_a_method_option(variants):
    with pytest.raises(FastpromptError, match=r"differ in options.variant \('released' vs 'paper'\).* report them from "
                                              r"separate folders, or give each value its own row: "
                                              r"--rows method,cavpt.variant$"):
        report(variants)
    text = report(variants, rows="method,cavpt.variant")
    assert "| method | eurosat | Average |" in text
    assert "| coop | 61.00 ± 1.00 (n=2) | 61.00 |" in text
    assert "| cavpt (variant=paper) | 71.00 ± 1.00 (n=2) | 71.00 |" in text
    assert "| cavpt (variant=released) | 76.00 ± 2.00 (n=2) | 76.00 |" in text
    (table,) = json.loads(report(variants, "json", rows="method,cavpt.variant"))
    assert table["row_options"] == ["cavpt.variant"]
    assert [c["method"] for c in table["cells"]] == ["cavpt (variant=paper)", "cavpt (variant=released)", "coop"]
    result = runner.invoke(app, ["report", str(variants), "--rows", "method,cavpt.variant", "--format", "csv"])
    assert result.exit_code == 0 and "16,all,cavpt (variant=released),76.0000,1.0000" not in result.output
    assert "16,all,cavpt (variant=released),76.0000,2.0000,2,76.0000" in result.output


def test_rows_naming_an_option_still_refuse_a_mix_they_do_not_name(variants, make_run):
    """The variant may differ, and what it resolves (aux_target); another option may not."""
    make_run(variants / "topk", "eurosat", "cavpt", 3, 75.0, options={"variant": "released", "topk": 3})
    with pytest.raises(FastpromptError, match=r"differ in options.topk \(3 vs 5\).*--rows method,cavpt.variant,cavpt.topk$"):
        report(variants, rows="method,cavpt.variant")
    assert "| cavpt (variant=released, topk=3) | 75.00 ± 0.00 (n=1; seeds 1, 2 missing) |" in report(
        variants, rows="method,cavpt.variant,cavpt.topk")


def test_student_t_quantile():
    """Values of scipy.stats.t.ppf(0.975, df), and the CDF against scipy where it is installed."""
    from fastprompt.sweep.report import t_quantile

    for df, want in ((1, 12.706204736174698), (2, 4.302652729749464), (4, 2.7764451051977934), (9, 2.2621571628540993)):
        assert t_quantile(0.975, df) == pytest.approx(want, rel=1e-9)
    stats = pytest.importorskip("scipy.stats")
    for p in (0.6, 0.9, 0.95, 0.995):
        for df in (1, 2, 3, 7, 30, 200):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_ci_is_a_student_t_interval_of_the_mean(table1):
    """70, 72, 74: mean 72, sample std 2, 95 %: t(0.975, 2) * 2 / sqrt(3) = 4.97 (the ± std would be 1.63)."""
    text = report(table1, "md", ci=95)
    assert "| coop | 72.00 ± 4.97 (n=3) | 51.00 ± 12.71 (n=2; seed 3 missing) | 61.50 |" in text
    assert text.endswith("_± is the half-width of the 95% confidence interval of the mean over seeds (Student's t with "
                         "n-1 degrees of freedom and the sample standard deviation, ddof=1; — for one seed); "
                         "n: seeds per cell._\n")
    (table,) = json.loads(report(table1, "json", ci=95))
    assert table["ci"] == 95 and table["cells"][0]["ci_half_width"] == pytest.approx(4.302652729749464 * 2 / 3 ** 0.5)
    assert table["cells"][0]["std"] == pytest.approx((8 / 3) ** 0.5)  # the population std stays in the JSON
    assert report(table1, "csv", ci=90).splitlines()[0].startswith("shots,classes,method,eurosat,eurosat std,eurosat n,"
                                                                   "eurosat ci90,dtd,")
    result = runner.invoke(app, ["report", str(table1), "--ci", "95"])
    assert result.exit_code == 0 and "72.00 ± 4.97 (n=3)" in result.output
    one = report(table1, "md", ci=95, rows="dataset", cols="method")
    assert "± 0.82" not in one  # the std is not shown as the interval


def test_ci_of_one_seed_is_a_dash(tmp_path, make_run):
    make_run(tmp_path / "one", "eurosat", "coop", 1, 70.0)
    assert "| coop | 70.00 ± — (n=1) | 70.00 |" in report(tmp_path / "one", ci=95)


def test_a_reference_row_without_runs_is_shown_marked(table1, tmp_path):
    ref = tmp_path / "paper.csv"
    ref.write_text("method,eurosat,dtd,Average\ncoop,70.5,50,60.25\nkgcoop,75.0,55.5,65.25\n")
    text = report(table1, "md", compare=str(ref))
    assert "| kgcoop (no runs) | no runs [ref 75.00] | no runs [ref 55.50] | — [ref 65.25] |" in text
    (table,) = json.loads(report(table1, "json", compare=str(ref)))
    assert table["no_runs"] == ["kgcoop"]
    assert [c["reference"] for c in table["cells"] if c["method"] == "kgcoop"] == [75.0, 55.5]
    assert "16,all,kgcoop (no runs),,,,75.0000,,,,55.5000," in report(table1, "csv", compare=str(ref))


@pytest.mark.parametrize("rows, ci, message", [
    ("variant", None, "rows='variant' must start with one of method, dataset, shots, optionally followed by method "
                      "options (e.g. method,cavpt.variant)"),
    ("method,cavpt.variantt", None, "rows='method,cavpt.variantt': 'cavpt.variantt' is not a method option; name one "
                                    "as its flag without the dashes"),
    ("method,cavpt.topk,cavpt.topk", None, "names 'cavpt.topk' twice"),
    ("method", 100, "ci=100 must be a confidence level in percent between 0 and 100, e.g. 95"),
    ("method", 0, "ci=0 must be a confidence level"),
])
def test_bad_rows_and_ci(table1, rows, ci, message):
    with pytest.raises(FastpromptError, match=re.escape(message)):
        report(table1, rows=rows, ci=ci)
