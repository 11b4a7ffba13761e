"""`fastprompt bench` on the tiny config: records, their keys and numbers; bad input exits 2."""

import json

import pytest
import torch
from typer.testing import CliRunner

from fastprompt.cli import app

runner = CliRunner()
KEYS = {"method", "variant", "images_per_s", "peak_memory_bytes", "device", "clip", "batch_size",
        "cpu", "gpu", "torch", "triton", "date", "commit"}
TINY = ["bench", "--clip", "fastprompt-tiny", "--device", "cpu", "--batch-size", "4", "--classes", "5",
        "--steps", "1", "--warmup", "0"]


def test_bench_writes_records(tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(app, [*TINY, "--methods", "vpt-deep,coop-text", "--variants", "reference,fast,anchor",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())
    assert [(r["method"], r["variant"]) for r in records] == [
        (m, v) for m in ("vpt-deep", "coop-text") for v in ("reference", "fast", "anchor")]
    for r in records:
        assert KEYS <= r.keys(), r
        assert r["device"] == "cpu" and r["clip"] == "fastprompt-tiny" and r["batch_size"] == 4 and r["classes"] == 5
        assert r["images_per_s"] > 0 and r["step_ms"] > 0
        assert isinstance(r["peak_memory_bytes"], int) and r["peak_memory_bytes"] >= r["state_bytes"] > 0
        assert r["peak_memory_bytes"] == r["state_bytes"] + r["step_memory_bytes"]
        assert r["step"] == "forward+backward+sgd"
        assert r["images_per_s"] == pytest.approx(4 / (r["step_ms"] / 1e3))
        ref = next(x for x in records if x["method"] == r["method"] and x["variant"] == "reference")
        assert r["speedup_vs_reference"] == pytest.approx(r["images_per_s"] / ref["images_per_s"])
        assert r["torch"] == torch.__version__ and r["gpu"] is None and r["cpu"] and r["date"].startswith("20")
    lines = result.stdout.splitlines()  # a title, the header, one line per record, in the order measured
    assert len(lines) == 2 + len(records) and max(map(len, lines)) <= 80
    assert [line.split()[:2] for line in lines[2:]] == [[r["method"], r["variant"]] for r in records]


def test_bench_pack_reports_images_per_s_in_all_and_per_run(tmp_path):
    """--pack 1,2: a packing method's fast step with 1 (solo) and 2 runs: images/s of all runs and
    of one, each against the solo step; a method that does not pack keeps its solo row."""
    out = tmp_path / "bench.json"
    result = runner.invoke(app, [*TINY, "--methods", "coop,cocoop", "--variants", "fast", "--pack", "1,2",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())
    assert [(r["method"], r["pack"]) for r in records] == [("coop", 1), ("coop", 2), ("cocoop", 1)]
    solo, packed = records[0], records[1]
    assert packed["execution"].startswith("2 runs of coop packed, eager")
    for r in records:
        runs = r["pack"]
        assert r["images_per_s"] == pytest.approx(runs * 4 / (r["step_ms"] / 1e3))
        assert r["images_per_s_per_run"] == pytest.approx(4 / (r["step_ms"] / 1e3))
    assert packed["speedup_vs_pack1"] == pytest.approx(packed["images_per_s"] / solo["images_per_s"])
    assert packed["state_bytes"] > solo["state_bytes"]  # two runs' prompts, optimiser states and batches
    lines = result.stdout.splitlines()
    assert lines[1].split()[:5] == ["method", "variant", "runs", "images/s", "per"] and max(map(len, lines)) <= 80
    assert [line.split()[:3] for line in lines[2:]] == [["coop", "fast", "1"], ["coop", "fast", "2"], ["cocoop", "fast", "1"]]


def test_bench_json_is_valid_after_every_method(tmp_path, monkeypatch):
    """--json is rewritten as each method's records come in: a reader sees valid JSON throughout."""
    import fastprompt.bench.report as report

    out = tmp_path / "bench.json"
    seen = []
    write = report.write_records
    monkeypatch.setattr(report, "write_records", lambda records, path: (write(records, path),
                                                                       seen.append(json.loads(out.read_text()))))
    monkeypatch.setattr("fastprompt.bench.write_records", report.write_records)
    result = runner.invoke(app, [*TINY, "--methods", "coop-text,vpt-shallow", "--variants", "fast", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert [[(r["method"], r["variant"]) for r in records] for records in seen] == [
        [("coop-text", "fast")], [("coop-text", "fast"), ("vpt-shallow", "fast")]]


def test_a_log_file_gets_each_step_as_it_happens():
    """Not on a terminal (a log file): each variant's build, each timed round and each method's
    records are lines in the order they happen, not 140 s of silence (issue 25 §9)."""
    result = runner.invoke(app, [*TINY, "--methods", "coop-text,vpt-shallow", "--variants", "reference,fast"])
    assert result.exit_code == 0, result.output
    lines = [line.split(": ", 1)[1] if line.startswith("bench ") else " ".join(line.split()[:2])
             for line in result.output.splitlines()]  # stdout and stderr, interleaved as written
    assert lines == ["fastprompt bench:", "method variant",
                     "coop-text / reference: build and warm up", "coop-text / fast: build and warm up",
                     "coop-text: timed round 1/1", "coop-text reference", "coop-text fast",
                     "vpt-shallow / reference: build and warm up", "vpt-shallow / fast: build and warm up",
                     "vpt-shallow: timed round 1/1", "vpt-shallow reference", "vpt-shallow fast"], result.output
    assert all(line.startswith("bench 0m") for line in result.stderr.splitlines())  # the time so far
    assert len(result.stdout.splitlines()) == 2 + 4  # the table alone on stdout


def test_the_spinner_is_cleared_before_each_line_of_the_table(monkeypatch):
    """On a terminal the spinner's text is erased before the table's lines are printed
    (`timed round 2/2fastprompt bench:` was glued), and the table reads as on a file."""
    from rich.console import Console

    import fastprompt.cli as cli

    monkeypatch.setattr(cli, "_console", lambda: Console(stderr=True, force_terminal=True, width=100))
    result = runner.invoke(app, [*TINY, "--methods", "coop-text", "--variants", "fast"])
    assert result.exit_code == 0, result.output
    output = result.output  # what the terminal received, both streams in order
    assert "bench: coop-text" in output and "\nbench " not in output  # the spinner, no log lines
    for line in result.stdout.splitlines():  # the title, the header, the record
        before = output[:output.index(line)]
        assert before == "" or before.endswith(("\n", "\x1b[2K")), repr(before[-40:])  # a new or erased line
    assert result.stdout.splitlines()[0] == "fastprompt bench: fastprompt-tiny, batch 4, 5 classes, cpu"


def test_default_grid_and_all():
    from fastprompt.bench import VARIANTS, BenchConfig, bench_methods

    assert BenchConfig().methods == ("coop-text", "vpt-deep")
    assert BenchConfig().variants == ("reference", "fast")
    assert set(bench_methods()) > set(BenchConfig().methods) and set(VARIANTS) > set(BenchConfig().variants)


@pytest.mark.parametrize("args, message", [
    (["--methods", "vpt-deep,coop-txt"], "unknown method 'coop-txt'"),
    (["--variants", "fast,slow"], "unknown variant 'slow'"),
    (["--classes", "0"], "classes=0 must be an integer >= 1"),
    (["--device", "tpu"], "device='tpu' is not known"),
    (["--clip", "ViT-Q-99"], "unknown CLIP model 'ViT-Q-99'"),
])
def test_bad_input_exits_2(args, message):
    result = runner.invoke(app, [*TINY, *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_exits_2():
    result = runner.invoke(app, [*TINY, "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device" in result.output
