"""The shipped tables (fastprompt/reproduce/tables/*.toml): each loads, each row maps to a method and
options of ours (or says it is not available), and its numbers agree with its source's own arithmetic:
a printed Average is the mean of the printed per-dataset numbers and a printed H the harmonic mean
of the printed base and new, within the printed rounding, unless the file records that the paper's
does not (`arithmetic_off`), which is then checked to be true."""

import statistics
from pathlib import Path

import pytest

from fastprompt.methods import METHODS
from fastprompt.reproduce.tables import AVERAGE, load_table, table_names, tables_markdown
from fastprompt.training.config import TrainConfig
from fastprompt.training.runfiles import harmonic_mean

TABLES = table_names()


def _tolerance(table) -> float:
    """A printed number is within half a unit of its last digit of the true one; a mean or H of such
    numbers is too, so a printed Average or H may differ from what its printed inputs give by up to
    one unit of the last printed digit."""
    return 10.0 ** -table.decimals + 1e-9


def test_the_required_tables_ship_and_docs_list_each_with_its_source():
    assert {"cavpt-table1", "cavpt-table2", "cavpt-table3"} <= set(TABLES)
    assert tables_markdown() in (Path(__file__).resolve().parents[2] / "docs" / "methods.md").read_text()


@pytest.mark.parametrize("name", TABLES)
def test_table_loads_with_its_source_and_every_row_maps_to_ours(name):
    table = load_table(name)
    assert table.name == name
    assert table.source.paper and table.source.table and table.source.read_from
    assert len(table.rows) >= 1 and set(table.columns) == set(table.datasets)
    for row in table.rows:
        assert row.available == (row.method in METHODS)
        if not row.available or not row.trains:
            continue
        for dataset in row.datasets(table):  # the run each cell would start: options and recipe valid
            config = TrainConfig.from_protocol(row.protocol or table.protocol, dataset=dataset, method=row.method,
                                               data=f"{dataset}.beton", out="-", shots=table.shots, classes=table.classes,
                                               options=dict(row.options), **{**table.train, **row.train})
            assert config.method == row.method and all(config.options[k] == v for k, v in row.options.items())


@pytest.mark.parametrize("name", TABLES)
def test_printed_averages_and_h_follow_from_the_printed_numbers(name):
    table = load_table(name)
    tol = _tolerance(table)
    for row in table.rows:
        per_dataset = [row.numbers[d] for d in table.datasets if d in row.numbers]
        agrees = True
        if table.classes == "base":
            agrees = all(abs(harmonic_mean(base, new) - h) <= tol for base, new, h in row.numbers.values())
        if AVERAGE in row.numbers and len(per_dataset) == len(table.datasets):
            printed = row.numbers[AVERAGE]
            if table.classes == "all":
                agrees = agrees and abs(statistics.fmean(per_dataset) - printed) <= tol
            else:
                agrees = agrees and all(abs(statistics.fmean(v[i] for v in per_dataset) - printed[i]) <= tol for i in (0, 1))
        assert agrees != bool(row.arithmetic_off), (name, row.label, "arithmetic_off must say exactly where the source's is off")

def test_cavpt_tables_agree_with_each_other():
    """Table 2's 'w/ loss' row is Table 1's VPT-CLIP-CAVPT, and each dataset's best K_N in Table 3 gives
    that row's number too (the K_N per dataset that --protocol cavpt sets), as printed."""
    t1, t2, t3 = (load_table(f"cavpt-table{k}") for k in (1, 2, 3))
    vpt_cavpt = t1.row("VPT-CLIP-CAVPT")
    assert t2.row("CAVPT(w/ loss)").numbers == vpt_cavpt.numbers
    for dataset in t1.datasets:
        best = max(r.numbers[dataset] for r in t3.rows if dataset in r.numbers)
        assert best == vpt_cavpt.numbers[dataset], dataset
    assert [r.options for r in t3.rows] == [{"topk": k} for k in (5, 10, 20, 50, 100, 1000)]
    assert t2.row("CAVPT(w/o loss)").options == {"alpha": 0.0}
    assert (t1.row("VLP-CLIP-CAVPT").method, t1.row("VLP-CLIP-CAVPT").options) == ("cavpt", {"text_prompt": True})
    assert [r.method for r in t1.rows] == ["zeroshot", "coop", "vpt-shallow", "vpt-deep", "cavpt", "vlp", "cavpt"]


def test_base_to_new_report_puts_the_printed_averages_beside_ours(tmp_path):
    """A README's row of averages alone: every dataset is run, our per-dataset base / new / H and
    their averages (H of the averaged base and new) are shown, the printed averages beside the
    averages; a row printed per dataset (MaPLe's, from the reprints) has a reference in each cell."""
    from sweep.conftest import _make_run

    from fastprompt.reproduce import build_table, make_plan
    from fastprompt.reproduce.plan import ROWS_DIR

    table = load_table("maple-b2n")
    ivlp = table.row("Independent V-L Prompting")
    assert set(ivlp.numbers) == {AVERAGE} and ivlp.datasets(table) == table.datasets  # averages alone: every dataset runs
    folder = tmp_path / ROWS_DIR / ivlp.slug
    base = {d: 80.0 + k for k, d in enumerate(table.datasets)}
    for d in table.datasets:
        _make_run(folder, d, "ivlp", 1, classes="base", base=base[d], new=70.0)
    built = build_table(make_plan(table, tmp_path, seeds=[1], report_only=True))
    label = ivlp.label
    mean_base = statistics.fmean(base.values())
    assert built.average[(label, "base")] == pytest.approx(mean_base)
    assert built.average[(label, "H")] == pytest.approx(harmonic_mean(mean_base, 70.0))
    assert built.cells[(label, "EuroSAT", "H")].mean == pytest.approx(harmonic_mean(base["eurosat"], 70.0))
    assert [built.reference[(label, f"Average {m}")] for m in ("base", "new", "H")] == ivlp.numbers[AVERAGE]
    assert (label, "EuroSAT H") not in built.reference
    maple = table.row("MaPLe")
    assert [built.reference[("MaPLe", f"EuroSAT {m}")] for m in ("base", "new", "H")] == maple.numbers["eurosat"]
    assert "CLIP (no runs)" not in built.rows and "CLIP" in built.no_runs  # no zero-shot evaluated yet


def _averages(name: str) -> dict:
    return {r.label: r.numbers[AVERAGE] for r in load_table(name).rows}


def test_base_to_new_tables_agree_where_they_share_rows():
    """CoCoOp's Table 1 (read from its reprints) gives the CLIP, CoOp and CoCoOp averages that
    MaPLe's, PromptSRC's and KgCoOp's READMEs print (KgCoOp's CoOp is its own re-run, not compared);
    MaPLe's average is the same in its README and PromptSRC's; each per-dataset row's printed
    average is the mean of its per-dataset numbers (test_printed_averages_and_h_follow_from_the_printed_numbers)."""
    cocoop = load_table("cocoop-b2n")
    assert [(r.label, r.method) for r in cocoop.rows] == [("CLIP", "zeroshot"), ("CoOp", "coop"), ("CoCoOp", "cocoop")]
    assert all(set(r.numbers) == set(cocoop.datasets) | {AVERAGE} for r in cocoop.rows)  # every cell printed
    assert cocoop.protocol == "cocoop-b2n" and cocoop.row("CoCoOp").protocol is None
    reference = _averages("cocoop-b2n")
    maple, promptsrc, kgcoop = _averages("maple-b2n"), _averages("promptsrc-b2n"), _averages("kgcoop-b2n")
    for label in ("CLIP", "CoOp", "CoCoOp"):
        assert maple[label] == promptsrc[label] == reference[label], label
    for label in ("CLIP", "CoCoOp"):
        assert kgcoop[label] == reference[label], label
    assert maple["MaPLe"] == promptsrc["MaPLe"]
    for name, label in (("maple-b2n", "MaPLe"), ("promptsrc-b2n", "PromptSRC")):
        table = load_table(name)
        assert set(table.row(label).numbers) == set(table.datasets) | {AVERAGE}, name
    # CoOp's row trains CoOp's own recipe on ViT-B/16 in every table that prints these numbers
    for name in ("cocoop-b2n", "maple-b2n", "promptsrc-b2n"):
        coop = load_table(name).row("CoOp")
        assert (coop.method, coop.protocol, coop.train) == ("coop", "coop", {"clip": "ViT-B-16"}), name
    from fastprompt.reproduce.plan import row_epochs

    epochs = {r.label: {d: row_epochs(cocoop, r, d) for d in cocoop.datasets} for r in cocoop.rows if r.trains}
    assert epochs["CoOp"] == {d: 50 if d == "imagenet" else 200 for d in cocoop.datasets}  # CoOp's 16-shot recipe
    assert set(epochs["CoCoOp"].values()) == {10}
