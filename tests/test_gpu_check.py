"""scripts/gpu-check.sh: its CPU dry run (the same steps at tiny shapes) end to end, and the
report it writes, from made-up step outputs (failed steps, failed tests, goals met or not)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"

_spec = importlib.util.spec_from_file_location("gpu_check_report", ROOT / "scripts" / "gpu_check_report.py")
report_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report_module)


def run_script(*args, timeout=1500, python=sys.executable):
    # the script's pytest steps are runs of their own, not part of this one (under pytest-xdist a
    # worker's PYTEST_XDIST_* variables would turn pytest-benchmark off in them)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "PYTHON"}
    if python is not None:
        env["PYTHON"] = python
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_usage_errors_exit_2(tmp_path):
    assert run_script(timeout=60).returncode == 2
    proc = run_script("--cpu-dry-run", "--fast", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr
    assert not (tmp_path / "steps.tsv").exists()


def _gpu_step_limits() -> dict[str, int]:
    """Each GPU-mode step's name and time limit, as the script calls `step NAME LIMIT ...`."""
    text = SCRIPT.read_text()
    gpu = text[text.index('if [ "$MODE" = gpu ]; then\n    # The gpu-marked'):text.index("\nelse\n    step tests 300")]
    limits = {"machine": int(re.search(r"^step machine (\d+)", text, re.M).group(1))}
    for name, limit in re.findall(r'^\s*step "?([\w$-]+)"? (\d+)', gpu, re.M):
        for clip in (["ViT-B-32", "ViT-B-16"] if "$clip" in name else [None]):
            limits[name.replace("$clip", clip) if clip else name] = int(limit)
    return limits


def test_the_gpu_steps_fit_the_device_calls_the_header_names():
    """One device call runs at most 600 s: the header states the steps' sum and two --only calls
    that cover every step, each within 600 s (with `machine` in both); --only knows the same steps."""
    limits = _gpu_step_limits()
    header = SCRIPT.read_text().split("set -uo pipefail")[0]
    assert f"sum to\n# {sum(limits.values())} s" in header
    calls = [m.split(",") for m in re.findall(r"--only ([\w,-]+) \(", header)]
    assert len(calls) == 2 and sorted(sum(calls, [])) == sorted(n for n in limits if n != "machine")
    for call in calls:
        total = limits["machine"] + sum(limits[n] for n in call)
        assert total <= 600 and f"({total} s" in header, (call, total)
    known = re.search(r'STEPS="([^"]+)"', SCRIPT.read_text()).group(1).split()
    assert sorted(known) == sorted(n for n in limits if n != "machine")


def test_only_refuses_an_unknown_step_and_writes_nothing(tmp_path):
    proc = run_script("--cpu-dry-run", "--only", "bench-pack,nope", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 2 and "no step 'nope'" in proc.stderr and "bench-pack" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_only_runs_its_steps_and_keeps_the_other_records(tmp_path):
    """A second call into the same FOLDER replaces its steps' records and keeps the others'."""
    (tmp_path / "steps.tsv").write_text("micro\t0\t5\t300\tpytest\nbench-pack\t1\t9\t120\told\n")
    proc = run_script("--cpu-dry-run", "--only", "bench-pack", str(tmp_path), timeout=600)
    rows = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == ["micro", "machine", "bench-pack"], proc.stdout + proc.stderr
    assert rows[2][1] == "0" and "--pack 1,2" in rows[2][4]
    assert not (tmp_path / "tests.log").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would run the whole check")
def test_gpu_mode_without_cuda_exits_2_and_writes_nothing(tmp_path):
    """Also: without PYTHON the script runs the checkout's .venv (it once ran the system python3,
    which has no torch, and ended in a traceback; issue 25 §13)."""
    proc = run_script(str(tmp_path / "out"), timeout=300, python=None)
    assert proc.returncode == 2 and "torch sees no CUDA device; run with --cpu-dry-run" in proc.stderr
    assert not (tmp_path / "out").exists()
    venv = ROOT / ".venv" / "bin" / "python"
    assert f"[gpu-check] python: {venv if venv.exists() else 'python3'}\n" in proc.stdout, proc.stdout


def test_report_survives_empty_and_cut_step_outputs(tmp_path, capsys):
    """A step killed at its limit leaves an empty or cut JSON file: the report names it and is
    written all the same, the failed step failing the check (issue 25 §13)."""
    (tmp_path / "steps.tsv").write_text("machine\t0\t1\t60\tpython machine\nbench-ViT-B-32\t124\t90\t90\tbench\n"
                                        "micro\t124\t80\t80\tpytest\n")
    (tmp_path / "bench-ViT-B-32.json").write_text("")
    (tmp_path / "micro.json").write_text('{"benchmarks": [{"name": "test_prefix')
    assert report_module.main(["report", str(tmp_path), "--mode", "gpu"]) == 1
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["bench"] == [] and report["micro"] == []
    assert [s["status"] for s in report["steps"]] == ["ok", "timed out", "timed out"]
    err = capsys.readouterr().err
    assert "bench-ViT-B-32.json is not JSON" in err and "micro.json is not JSON" in err


def bench_record(clip, method, variant, images_per_s, classes=1000):
    return dict(clip=clip, method=method, variant=variant, images_per_s=images_per_s, classes=classes,
                peak_memory_bytes=2**30, speedup_vs_anchor=None, useful_tflops_per_s=100.0, peak_fraction=0.1)


def test_report_counts_failures_and_computes_goals(tmp_path):
    (tmp_path / "steps.tsv").write_text("machine\t0\t1\t60\tpython machine\ntests\t1\t90\t200\tpytest\nmicro\t124\t100\t100\tpytest b\n")
    (tmp_path / "tests.log").write_text(
        "tests/kernels/test_a.py::test_x[bf16] PASSED [ 33%]\n"
        "tests/kernels/test_a.py::test_y FAILED [ 66%]\n"
        "tests/methods/test_b.py::test_z[coop] SKIPPED (needs CUDA) [100%]\n"
    )
    bench = [bench_record("ViT-B-16", "vpt-deep", "fast", 6000.0), bench_record("ViT-B-16", "vpt-deep", "fast+compile", 7000.0),
             bench_record("ViT-B-16", "vpt-deep", "anchor", 2000.0),
             bench_record("ViT-B-16", "cavpt", "fast", 4000.0), bench_record("ViT-B-16", "cavpt", "anchor", 1000.0),
             bench_record("ViT-B-32", "coop-text", "fast", 900.0), bench_record("ViT-B-32", "coop-text", "anchor", 100.0)]
    (tmp_path / "bench-ViT-B-16.json").write_text(json.dumps(bench))
    # bench --pack 1,8: coop 5x, vpt-deep 3.5x the solo step's total images/s (a packed row of 9000 images/s is
    # not the vpt-deep solo goal's fast step)
    pack = [dict(bench_record("ViT-B-16", m, "fast", solo * ratio), pack=runs, batch_size=32, speedup_vs_pack1=ratio)
            for m, solo, speedup in (("coop", 1000.0, 5.0), ("vpt-deep", 2600.0, 3.5))
            for runs, ratio in ((1, 1.0), (8, speedup))]
    (tmp_path / "bench-pack.json").write_text(json.dumps(pack))

    def micro(name, impl, ms, shape):
        return dict(name=f"test_{name}[{impl}]", stats=dict(median=ms / 1e3),
                    extra_info=dict(impl=impl, shape=shape, dtype="bf16", mode="fwd_bwd", median_ms=ms, tflops=1.0))

    (tmp_path / "micro.json").write_text(json.dumps(dict(benchmarks=[
        micro("prefix_attention", "triton", 1.0, [1]), micro("prefix_attention", "sdpa-flash", 1.5, [1]),
        micro("prefix_attention", "sdpa-efficient", 1.2, [1]),
        micro("cosine_ce", "triton", 1.0, [2]), micro("cosine_ce", "eager", 1.5, [2]),
    ])))
    assert report_module.main(["report", str(tmp_path), "--mode", "gpu"]) == 1
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["ok", "failed (exit 1)", "timed out"]
    assert report["tests"]["counts"]["passed"] == 1 and report["tests"]["not_passed"] == ["tests/kernels/test_a.py::test_y"]
    met = {g["goal"].split(" ")[0]: g["met"] for g in report["goals"]}
    # vpt-deep: 7000/s, 3.5x; cavpt: 4x but 4000/s; coop-text 9x; attention 1.2x the best SDPA; CE 1.5x
    assert met == {"vpt-deep": True, "cavpt": False, "CoOp": True, "packed": False, "prefix": False, "fused": False}
    assert next(g for g in report["goals"] if g["goal"].startswith("packed"))["measured"] == \
        "coop 5.00x (5000 images/s), vpt-deep 3.50x (9100 images/s)"
    assert report["goals"][0]["measured"].startswith("7000 images/s (fast+compile)")  # not the pack's 9100
    text = (tmp_path / "gpu-check.md").read_text()
    assert "| micro | timed out | 100 (100) |" in text
    assert "worst 1.20x ([1] bf16 fwd_bwd vs sdpa-efficient)" in text
    assert "| ViT-B-16 | vpt-deep | fast+compile | 7000.0 |" in text
    assert "| ViT-B-16 | coop | fast, 8 x batch 32 | 5000.0 |" in text

    # nothing measured: every goal says so instead of guessing
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "steps.tsv").write_text("machine\t0\t1\t60\tpython machine\n")
    assert report_module.main(["report", str(empty), "--mode", "cpu-dry-run"]) == 0
    assert all(g["met"] is None for g in json.loads((empty / "gpu-check.json").read_text())["goals"])


@pytest.mark.slow
def test_cpu_dry_run_writes_json_and_markdown(tmp_path):
    proc = run_script("--cpu-dry-run", str(tmp_path / "out"))
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["mode"] == "cpu-dry-run" and report["machine"]["gpu"].startswith("cpu")
    assert [(s["name"], s["status"]) for s in report["steps"]] == [
        ("machine", "ok"), ("tests", "ok"), ("bench-fastprompt-tiny", "ok"), ("bench-pack", "ok"), ("micro", "ok")]
    assert report["tests"]["counts"]["passed"] >= 3 and report["tests"]["not_passed"] == []
    packed = {(r["method"], r["variant"], r["pack"]) for r in report["bench"] if "pack" in r and r["images_per_s"] > 0}
    assert packed == {(m, "fast", n) for m in ("coop", "vpt-deep") for n in (1, 2)}
    variants = {(r["method"], r["variant"]) for r in report["bench"] if r["images_per_s"] > 0 and "pack" not in r}
    assert variants == {(m, v) for m in ("vpt-deep", "coop-text", "maple", "prograd") for v in ("reference", "fast", "anchor")}
    impls = {(r["op"], r["impl"]) for r in report["micro"] if r["median_ms"] > 0}
    assert impls == {("prefix_attention", "triton"), ("prefix_attention", "sdpa-math"), ("cosine_ce", "triton"), ("cosine_ce", "eager")}
    text = (out / "gpu-check.md").read_text()
    assert text.startswith("# gpu-check (cpu-dry-run)") and "| fastprompt-tiny | coop-text | fast |" in text
    assert "| prefix_attention | [2, 2, 50, 10, 64, 1, False] | fp32 | fwd_bwd |  | triton |" in text
