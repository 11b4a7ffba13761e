"""`fastprompt plot attention | tsne | curves`, `interpret` and `compare` on tiny finished runs."""

import json
import struct

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.viz.attention import PANEL_INCHES, attention_maps, draw_attention
from fastprompt.viz.curves import FIGSIZE as CURVES_SIZE
from fastprompt.viz.figures import DPI
from fastprompt.viz.interpret import nearest_words
from fastprompt.viz.runs import load_run
from fastprompt.viz.tsne import FIGSIZE as TSNE_SIZE

runner = CliRunner()
PANEL_PX = int(PANEL_INCHES * DPI)


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk; fails on anything else."""
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    return struct.unpack(">II", head[16:24])


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


# ------------------------------------------------------------------ attention
@pytest.mark.slow
def test_attention_maps_sum_to_one_and_text_only_equals_zero_shot(runs):
    for method in ("cavpt", "vpt-shallow", "coop"):
        run = load_run(str(runs[method]))
        maps = attention_maps(run, 4, num_workers=1)
        assert maps.zero_shot.shape == maps.trained.shape == (4, 4, 4)  # 64 px / 16 px patches
        np.testing.assert_allclose(maps.zero_shot.sum((1, 2)), 1.0, rtol=1e-5)
        np.testing.assert_allclose(maps.trained.sum((1, 2)), 1.0, rtol=1e-5)
        assert len(set(maps.labels.tolist())) == 4  # spread over the classes
        if method == "coop":
            np.testing.assert_array_equal(maps.trained, maps.zero_shot)
            fig = draw_attention(maps, list(run.model.classnames), "coop", run.changes_image_tower)
            assert "coop leaves the image tower unchanged" in fig._suptitle.get_text()
            assert len(fig.axes) == 4 * 2  # image | the one attention map
        else:
            assert not np.allclose(maps.trained, maps.zero_shot)  # the prompts change where the class token looks


@pytest.mark.parametrize("method, changes_tower, n", [("coop", False, 1), ("coop", False, 3), ("cavpt", True, 1),
                                                      ("vpt-shallow", True, 2)])
def test_attention_caption_and_titles_fit_the_figure(method, changes_tower, n):
    """A CoOp run's two-column figure clipped its caption at both edges (issue 25 §4): every text
    lies inside the figure, and the caption above the panel titles."""
    from fastprompt.viz.attention import AttentionMaps

    rng = np.random.default_rng(0)
    heat = rng.random((n, 4, 4))
    maps = AttentionMaps(images=rng.random((n, 64, 64, 3)), labels=np.arange(n), zero_shot=heat, trained=heat[::-1],
                         zero_shot_pred=np.arange(n), trained_pred=np.arange(n))
    fig = draw_attention(maps, ["annual crop land", "herbaceous vegetation land", "permanent crop land"], method,
                         changes_tower)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    caption = fig._suptitle.get_window_extent(renderer)
    titles = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    for box in [caption, *titles]:
        assert 0 <= box.x0 and box.x1 <= width and 0 <= box.y0 and box.y1 <= height, (box, width, height)
    assert all(caption.y0 >= t.y1 for t in titles)


@pytest.mark.slow
@pytest.mark.parametrize("method, cols", [("cavpt", 3), ("coop", 2)])
def test_plot_attention_writes_a_png_of_the_panel_grid(runs, method, cols, tmp_path):
    out = invoke("plot", "attention", runs[method], "--images", 3, "--workers", 1, "--out", tmp_path)
    path = tmp_path / f"attention-zeroshot-vs-{method}-3-test-images.png"
    assert out.strip() == str(path)
    assert png_size(path) == (cols * PANEL_PX, 3 * PANEL_PX)


@pytest.mark.slow
def test_plot_pdf_and_bad_format(runs, tmp_path):
    invoke("plot", "curves", runs["coop"], "--format", "pdf", "--out", tmp_path / "pdf")
    assert (tmp_path / "pdf" / "curves-loss-accuracy-lr.pdf").read_bytes()[:5] == b"%PDF-"
    result = runner.invoke(app, ["plot", "attention", str(runs["coop"]), "--format", "svg", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "'--format': 'svg' is not one of 'png', 'pdf'" in result.output
    assert not (tmp_path / "x").exists()
    result = runner.invoke(app, ["plot", "tsne", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not a finished run" in result.output


# ------------------------------------------------------------------ t-SNE, curves
@pytest.mark.slow
def test_plot_tsne(runs, tmp_path):
    invoke("plot", "tsne", runs["cavpt"], "--workers", 1, "--out", tmp_path)
    path = tmp_path / "tsne-test-features-zeroshot-vs-cavpt.png"
    assert png_size(path) == (int(TSNE_SIZE[0] * DPI), int(TSNE_SIZE[1] * DPI))


@pytest.mark.slow
def test_plot_curves_of_a_run_and_a_sweep_with_lr_per_group(runs, tmp_path):
    from fastprompt.viz.curves import draw_curves, find_runs

    invoke("plot", "curves", runs["cavpt"])
    size = (int(CURVES_SIZE[0] * DPI), int(CURVES_SIZE[1] * DPI))
    assert png_size(runs["cavpt"] / "figures" / "curves-loss-accuracy-lr.png") == size
    sweep = runs["cavpt"].parent  # the folder of all three runs
    invoke("plot", "curves", sweep, "--out", tmp_path)
    assert png_size(tmp_path / "curves-loss-accuracy-lr-3-runs.png") == size

    # lr per parameter group: every lr* key of a line is drawn
    run = tmp_path / "groups"
    run.mkdir()
    lines = [{"epoch": e, "loss": 2.0 / e, "train_accuracy": 10.0 * e, "lr/text": 0.01 / e, "lr/visual": 0.1 / e}
             for e in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    fig = draw_curves(find_runs(str(run)))
    lr_axis = fig.axes[2]
    assert sorted(line.get_label() for line in lr_axis.lines) == ["lr/text", "lr/visual"]
    np.testing.assert_allclose(lr_axis.lines[0].get_ydata(), [0.01, 0.005, 0.01 / 3])


def _finished(folder, **accuracies):
    folder.mkdir(parents=True)
    classes = "base" if "base_accuracy" in accuracies else "all"
    results = {"method": "coop", "dataset": "eurosat", "shots": 4, "seed": 1, "classes": classes, **accuracies}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_curves_draw_val_accuracy_where_logged_and_the_final_test_accuracy(tmp_path):
    """val_accuracy every E epochs (--eval-every) at those epochs only; results.json's test
    accuracy a star at the last epoch; base/new for a base-to-new run (issue 25 §4)."""
    from fastprompt.viz.curves import draw_curves, find_finals, find_runs

    run = _finished(tmp_path / "sweep" / "a", test_accuracy=71.5)
    lines = [{"epoch": e, "loss": 2.0 / e, "train_accuracy": 10.0 * e, "lr": 0.01, **({"val_accuracy": 5.0 * e} if e % 2 == 0 else {})}
             for e in (1, 2, 3, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    fig = draw_curves(find_runs(str(run)), find_finals(str(run)))
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[1].lines}
    assert drawn == {"train_accuracy": ([1, 2, 3, 4], [10.0, 20.0, 30.0, 40.0]), "val_accuracy": ([2, 4], [10.0, 20.0]),
                     "test_accuracy (final)": ([4], [71.5])}
    b2n = _finished(tmp_path / "sweep" / "b", base_accuracy=80.0, new_accuracy=60.0)
    (b2n / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines[:3]))
    fig = draw_curves(find_runs(str(tmp_path / "sweep")), find_finals(str(tmp_path / "sweep")))
    finals = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[1].lines
              if "final" in line.get_label()}
    assert finals == {"a: test_accuracy (final)": ([4], [71.5]), "b: base_accuracy (final)": ([3], [80.0]),
                      "b: new_accuracy (final)": ([3], [60.0])}


# ------------------------------------------------------------------ interpret, compare
def test_nearest_words_match_coop_interpret_prompt():
    """KaiyangZhou/CoOp interpret_prompt.py: torch.cdist to the token embeddings, argsort, top-k."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 8, generator=g)
    decoder = {i: f"tok{i}" for i in range(50)}
    context = torch.cat([table[[7, 3]] + 1e-3, torch.randn(2, 8, generator=g)])  # (4, 8)
    rows = nearest_words(context, table, decoder, topk=3)
    distance = torch.cdist(context, table)
    order = torch.argsort(distance, dim=1)[:, :3]
    for m, row in enumerate(rows):
        assert row.position == m + 1
        assert row.tokens == tuple(decoder[int(i)] for i in order[m])
        np.testing.assert_allclose(row.distances, distance[m, order[m]].numpy(), rtol=1e-6)
    assert rows[0].tokens[0] == "tok7" and rows[1].tokens[0] == "tok3"


@pytest.mark.slow
def test_interpret_reads_a_coop_run_and_refuses_a_visual_one(runs):
    from fastprompt.viz.interpret import interpret_run

    run = load_run(str(runs["coop"]))
    rows = interpret_run(str(runs["coop"]), topk=2)
    assert [r.position for r in rows] == list(range(1, run.model.text.context.shape[0] + 1))
    embedding = run.model.clip.token_embedding.weight
    first = torch.cdist(run.model.text.context[:1].detach().float(), embedding.float())[0]
    assert rows[0].tokens[0] == run.model.bundle.tokenizer.decoder[int(first.argmin())]
    out = invoke("interpret", runs["coop"], "--topk", 2)
    assert rows[0].tokens[0] in out
    result = runner.invoke(app, ["interpret", str(runs["vpt-shallow"])])
    assert result.exit_code == 2 and "learns no text context" in result.output


@pytest.mark.slow
def test_interpret_class_specific_context(csc_run):
    from fastprompt.viz.interpret import interpret_run

    run = load_run(str(csc_run))
    rows = interpret_run(str(csc_run), topk=2)
    assert [(r.classname, r.position) for r in rows] == [(c, m) for c in run.model.classnames for m in (1, 2)]
    embedding = run.model.clip.token_embedding.weight
    last = torch.cdist(run.model.text.context[-1, -1:].detach().float(), embedding.float())[0]  # last class, last position
    assert rows[-1].distances[0] == pytest.approx(float(last.min()), rel=1e-5)
    assert "class" in invoke("interpret", csc_run, "--topk", 1)


@pytest.mark.slow
def test_compare_rows(runs, viz_beton, tmp_path):
    from fastprompt.training import zeroshot_eval
    from fastprompt.viz.compare import compare_runs

    rows = compare_runs([str(runs["coop"]), str(runs["cavpt"])], num_workers=1)
    for row, method in zip(rows, ("coop", "cavpt")):
        results = json.loads((runs[method] / "results.json").read_text())
        metrics = [json.loads(line) for line in (runs[method] / "metrics.jsonl").read_text().splitlines()]
        seed = json.loads((runs[method] / "config.json").read_text())["seed"]
        zs = zeroshot_eval(str(viz_beton), clip="fastprompt-tiny", pretrained="none", seed=seed, device="cpu", num_workers=1)
        assert row.method == method
        assert row.zero_shot_accuracy == pytest.approx(zs["test_accuracy"])
        assert row.trained_accuracy == pytest.approx(results["test_accuracy"])
        assert row.gain == pytest.approx(row.trained_accuracy - row.zero_shot_accuracy)
        assert row.train_seconds == pytest.approx(sum(m["seconds"] for m in metrics))
    assert [row.label for row in rows] == ["coop", "cavpt"]  # one seed, one recipe: nothing else sets them apart
    out = invoke("compare", runs["coop"], "--workers", 1, "--json", tmp_path / "rows.json")
    assert "zero-shot" in out and "%" in out
    assert json.loads((tmp_path / "rows.json").read_text())[0]["method"] == "coop"


def test_compare_labels_each_row_by_what_sets_it_apart():
    """Two cavpt runs that differ in the variant are not look-alike rows (issue 25 §3): the label
    names the option (not what it decides itself, aux_target), and a setting that differs across
    all runs; an option counts only among the runs of its method."""
    from fastprompt.viz.compare import row_labels

    base = {"data": "/d/eurosat.beton", "lr": 0.002, "seed": 1, "shots": 16, "classes": "all", "pretrained": None,
            "weights_id": "params:1", "device": "cpu", "out": "a"}
    configs = [{**base, "method": "coop", "options": {}, "group_lr": {"text": 0.002}},
               {**base, "method": "cavpt", "options": {}, "group_lr": {"visual": 0.002}, "out": "b"},
               {**base, "method": "cavpt", "options": {"variant": "released"}, "group_lr": {"visual": 0.002}, "out": "c"}]
    assert row_labels(configs) == ["coop", "cavpt (variant=paper)", "cavpt (variant=released)"]
    configs[2]["options"]["topk"] = 3
    configs[0].update(lr=0.01, seed=2, weights_id="params:2", data="/d/dtd.beton")
    assert row_labels(configs) == ["coop (data=dtd.beton, lr=0.01, seed=2)",
                                   "cavpt (variant=paper, data=eurosat.beton, lr=0.002, seed=1)",  # topk 5: the default
                                   "cavpt (variant=released, topk=3, data=eurosat.beton, lr=0.002, seed=1)"]


@pytest.mark.slow
def test_compare_a_base_to_new_run_shows_base_new_and_h(b2n_run, runs, viz_beton, tmp_path):
    from fastprompt.training import zeroshot_eval
    from fastprompt.training.runfiles import harmonic_mean
    from fastprompt.viz.compare import compare_runs

    (row,) = compare_runs([str(b2n_run)], num_workers=1)
    results = json.loads((b2n_run / "results.json").read_text())
    seed = json.loads((b2n_run / "config.json").read_text())["seed"]
    zs = {cls: zeroshot_eval(str(viz_beton), clip="fastprompt-tiny", pretrained="none", seed=seed, classes=cls,
                             device="cpu", num_workers=1)["test_accuracy"] for cls in ("base", "new")}
    assert row.classes == "base" and row.trained_accuracy is None
    assert row.trained == pytest.approx({"base": results["base_accuracy"], "new": results["new_accuracy"],
                                         "H": results["harmonic_mean"]})
    assert row.zero_shot == pytest.approx({**zs, "H": harmonic_mean(zs["base"], zs["new"])})
    assert row.gain == pytest.approx(row.trained["H"] - row.zero_shot["H"])
    out = invoke("compare", runs["coop"], b2n_run, "--workers", 1, "--json", tmp_path / "rows.json")
    assert "base-to-new" in out and "zero-shot new" in out and "trained H" in out
    coop, b2n = json.loads((tmp_path / "rows.json").read_text())
    assert coop["label"] == "coop (classes=all)" and b2n["label"] == "coop (classes=base)"
    assert b2n["trained_new"] == pytest.approx(results["new_accuracy"]) and "trained_accuracy" not in b2n


def test_compare_reports_the_first_epoch_apart_from_the_steady_rate():
    """The demo table counted CoOp's cold first epoch (22.6 of 24.2 s) in its images/s: the
    first epoch's seconds are a column of their own and images/s is over epochs 2..N (issue 25 §8)."""
    from rich.console import Console

    from fastprompt.viz.compare import Comparison, comparison_tables, training_speed

    lines = [{"epoch": 1, "images": 160, "seconds": 22.6}, {"epoch": 2, "images": 160, "seconds": 0.1},
             {"epoch": 3, "images": 160, "seconds": 0.3}]
    speed = training_speed(lines)
    assert speed == pytest.approx({"train_seconds": 23.0, "images_per_s": 480 / 23.0, "first_epoch_seconds": 22.6,
                                   "steady_images_per_s": 320 / 0.4})
    assert training_speed(lines[:1])["steady_images_per_s"] is None  # one epoch: no steady rate to report
    rows = [Comparison(run="r", method="coop", label="coop", classes="all", zero_shot={"acc": 42.0}, trained={"acc": 76.0},
                       **speed),
            Comparison(run="s", method="cavpt", label="cavpt", classes="all", zero_shot={"acc": 42.0},
                       trained={"acc": 70.0}, **training_speed(lines[:1]))]
    console = Console(width=120, record=True)
    (table,) = comparison_tables(rows)
    console.print(table)
    text = console.export_text()
    assert "first epoch" in text and "epochs 2..N" in text
    coop = next(line for line in text.splitlines() if "coop" in line).split("│")
    assert [c.strip() for c in coop[5:8]] == ["23.0 s", "22.6 s", "800"]
    cavpt = next(line for line in text.splitlines() if "cavpt" in line).split("│")
    assert [c.strip() for c in cavpt[5:8]] == ["22.6 s", "22.6 s", "-"]
    assert rows[0].to_dict()["steady_images_per_s"] == pytest.approx(800.0)
