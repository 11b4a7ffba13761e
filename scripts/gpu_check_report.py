"""Collects what `scripts/gpu-check.sh` left in its folder into gpu-check.json and gpu-check.md.

`machine FOLDER` writes machine.json first; `report FOLDER` reads (a missing input is
reported as not measured, never guessed):
- machine.json: GPU, torch, Triton, Python, date, command;
- steps.tsv: name, exit status, seconds, time limit, command of each step;
- tests*.log: `pytest -v` output of the test steps (one line per test and outcome; a step
  cut by its time limit still reports the tests it finished);
- bench-*.json: the records of `fastprompt bench --json` (one file per model);
- micro.json: pytest-benchmark's JSON of the kernel microbenchmarks (benchmarks/bench_*.py).

The markdown has the steps, the test outcome, the bench table (images/s, peak memory, useful
TFLOP/s, fraction of the GPU's bf16 peak), the microbenchmark table and the issue-15 goals
computed from those numbers. Exit status: 0, or 1 when a step failed or a test did not pass.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

TEST_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def read_json(path: Path, default):
    """A step's JSON output, or `default` when the step wrote none, an empty file or a cut one
    (a step killed at its time limit): the step's exit status already says it failed, and the
    report of every other step must still be written (a note on stderr names the file)."""
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(errors="replace"))
    except ValueError as err:
        print(f"gpu-check report: {path.name} is not JSON ({err}); reported as missing", file=sys.stderr)
        return default


def read_steps(folder: Path) -> list[dict]:
    steps = []
    path = folder / "steps.tsv"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, seconds, limit, command = line.split("\t", 4)
        rc = int(rc)
        status = "ok" if rc == 0 else ("timed out" if rc in (124, 137) else f"failed (exit {rc})")
        log = folder / f"{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else []
        steps.append(dict(name=name, rc=rc, status=status, seconds=int(seconds), limit_s=int(limit), command=command,
                          log=log.name, log_tail=tail))
    return steps


def read_tests(folder: Path) -> dict:
    outcomes: dict[str, str] = {}
    lines = [line for log in sorted(folder.glob("tests*.log")) for line in log.read_text(errors="replace").splitlines()]
    for line in lines:
        match = TEST_LINE.match(line)
        if match:
            outcomes[match.group(1)] = match.group(2)
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")}
    return dict(counts={k.lower(): v for k, v in counts.items()},
                not_passed=sorted(t for t, v in outcomes.items() if v in ("FAILED", "ERROR")))


def read_micro(folder: Path) -> list[dict]:
    rows = []
    for b in read_json(folder / "micro.json", {}).get("benchmarks", []):
        info = b.get("extra_info", {})
        rows.append(dict(op=b["name"].split("[")[0].removeprefix("test_"), name=b["name"], impl=info.get("impl"),
                         shape=info.get("shape"), dtype=info.get("dtype"), mode=info.get("mode"),
                         wgrad=info.get("wgrad"), median_ms=info.get("median_ms", b["stats"]["median"] * 1e3),
                         tflops=info.get("tflops")))
    return rows


def best_fast(records, clip, method):
    """The faster of fast and fast+compile, and the anchor, of one method on one model (solo
    steps: the records of `bench --pack` are the packing goal's)."""
    rows = [r for r in records if r.get("clip") == clip and r["method"] == method and not r.get("error")
            and "pack" not in r]
    fast = [r for r in rows if r["variant"] in ("fast", "fast+compile") and r.get("images_per_s")]
    anchor = next((r for r in rows if r["variant"] == "anchor" and r.get("images_per_s")), None)
    return (max(fast, key=lambda r: r["images_per_s"]) if fast else None), anchor


def goals(bench: list[dict], micro: list[dict]) -> list[dict]:
    """Issue 15's performance goals, from the numbers at hand ("not measured" otherwise)."""
    out = []
    for method in ("vpt-deep", "cavpt"):
        fast, anchor = best_fast(bench, "ViT-B-16", method)
        measured = fast is not None and anchor is not None
        ratio = fast["images_per_s"] / anchor["images_per_s"] if measured else None
        out.append(dict(goal=f"{method} step, ViT-B/16 batch 128 bf16: >= 3x anchor and >= 5000 images/s",
                        measured=f"{fast['images_per_s']:.0f} images/s ({fast['variant']}), {ratio:.2f}x anchor" if measured else None,
                        met=(ratio >= 3 and fast["images_per_s"] >= 5000) if measured else None))
    text = [r for r in bench if r["method"] == "coop-text" and r.get("classes") == 1000]
    clips = sorted({r["clip"] for r in text})
    fast, anchor = best_fast(text, clips[0], "coop-text") if clips else (None, None)
    measured = fast is not None and anchor is not None
    ratio = fast["images_per_s"] / anchor["images_per_s"] if measured else None
    out.append(dict(goal="CoOp text step at 1000 classes: >= 8x anchor",
                    measured=f"{ratio:.2f}x anchor ({fast['variant']}, {clips[0]})" if measured else None,
                    met=ratio >= 8 if measured else None))

    def speedups(op, baseline):
        ratios = []
        for r in (m for m in micro if m["op"] == op and m["impl"] == "triton"):
            same = [m for m in micro if m["op"] == op and m["impl"] != "triton" and baseline(m["impl"])
                    and (m["shape"], m["dtype"], m["mode"], m["wgrad"]) == (r["shape"], r["dtype"], r["mode"], r["wgrad"])]
            if same:
                best = min(same, key=lambda m: m["median_ms"])
                ratios.append((best["median_ms"] / r["median_ms"], f"{r['shape']} {r['dtype']} {r['mode']} vs {best['impl']}"))
        return ratios

    packed = {r["method"]: r for r in bench if r.get("pack") == 8 and r.get("clip") == "ViT-B-16"
              and r.get("batch_size") == 32 and r["variant"] == "fast" and r.get("speedup_vs_pack1") is not None}
    measured = all(m in packed for m in ("coop", "vpt-deep"))
    out.append(dict(goal="packed step, ViT-B/16 batch 32 a run: 8 runs >= 4x the total images/s of 1 (coop, vpt-deep)",
                    measured=", ".join(f"{m} {packed[m]['speedup_vs_pack1']:.2f}x ({packed[m]['images_per_s']:.0f} images/s)"
                                       for m in ("coop", "vpt-deep")) if measured else None,
                    met=all(packed[m]["speedup_vs_pack1"] >= 4 for m in ("coop", "vpt-deep")) if measured else None))

    for op, baseline, want, goal in (
        ("prefix_attention", lambda impl: impl.startswith("sdpa"), 1.3, "prefix attention >= 1.3x the fastest SDPA on the concatenation"),
        ("cosine_ce", lambda impl: impl == "eager", 2.0, "fused cosine CE >= 2x eager"),
    ):
        ratios = speedups(op, baseline)
        worst = min(ratios) if ratios else None
        out.append(dict(goal=goal, measured=f"worst {worst[0]:.2f}x ({worst[1]}), best {max(ratios)[0]:.2f}x" if worst else None,
                        met=worst[0] >= want if worst else None))
    return out


def variant(record: dict) -> str:
    """A record's variant, with its runs and batch for a `bench --pack` record (images/s: all runs')."""
    if "pack" not in record:
        return record["variant"]
    return f"{record['variant']}, {record['pack']} x batch {record.get('batch_size')}"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# gpu-check ({report['mode']})", "",
             f"{m.get('gpu', '?')}; torch {m.get('torch', '?')}, Triton {m.get('triton', '?')}, Python {m.get('python', '?')}; "
             f"{m.get('date', '?')}; `{m.get('command', '?')}`", "",
             "| step | status | seconds (limit) |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} ({s['limit_s']}) |" for s in report["steps"]]
    t = report["tests"]
    lines += ["", "Tests: " + ", ".join(f"{v} {k}" for k, v in t["counts"].items() if v)
              + ("; not passed: " + ", ".join(t["not_passed"]) if t["not_passed"] else ""), ""]
    if report["bench"]:
        lines += ["| model | method | variant | images/s | ×anchor | peak MiB | useful TFLOP/s | of bf16 peak |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["bench"]:
            if r.get("error"):
                lines.append(f"| {r.get('clip')} | {r['method']} | {variant(r)} | failed: {r['error'][:80]} | | | | |")
                continue
            frac = r.get("peak_fraction")
            frac = "-" if frac is None else (frac if isinstance(frac, str) else f"{100 * frac:.1f}%")
            tflops = r.get("useful_tflops_per_s")
            anchor = r.get("speedup_vs_anchor")
            lines.append(f"| {r.get('clip')} | {r['method']} | {variant(r)} | {r['images_per_s']:.1f} | "
                         f"{'-' if anchor is None else f'{anchor:.2f}'} | {r['peak_memory_bytes'] / 2**20:.0f} | "
                         f"{'-' if tflops is None else f'{tflops:.1f}'} | {frac} |")
        lines.append("")
    if report["micro"]:
        lines += ["| op | shape | dtype | mode | w grad | impl | median ms | TFLOP/s |", "|---|---|---|---|---|---|---|---|"]
        for r in report["micro"]:
            tflops = "-" if r["tflops"] is None else f"{r['tflops']:.2f}"
            lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['mode']} | {'' if r['wgrad'] is None else r['wgrad']} | "
                         f"{r['impl']} | {r['median_ms']:.3f} | {tflops} |")
        lines.append("")
    lines += ["| goal | measured | met |", "|---|---|---|"]
    for g in report["goals"]:
        met = "not measured" if g["met"] is None else ("yes" if g["met"] else "no")
        lines.append(f"| {g['goal']} | {g['measured'] or '-'} | {met} |")
    return "\n".join(lines) + "\n"


def write_machine(folder: Path, mode: str, command: str) -> None:
    """machine.json: what ran where (the GPU's name, or the CPU dry run)."""
    import platform
    import time

    import torch
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA; Triton interpreter)"
    machine = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                   python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   command=command, mode=mode)
    (folder / "machine.json").write_text(json.dumps(machine, indent=1))


def write_report(folder: Path, mode: str) -> int:
    bench = [r for path in sorted(folder.glob("bench-*.json")) for r in read_json(path, [])]
    micro = read_micro(folder)
    report = dict(mode=mode, machine=read_json(folder / "machine.json", {}), steps=read_steps(folder),
                  tests=read_tests(folder), bench=bench, micro=micro, goals=goals(bench, micro))
    (folder / "gpu-check.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (folder / "gpu-check.md").write_text(text)
    sys.stdout.write(text)
    bad = [s for s in report["steps"] if s["rc"] != 0] or report["tests"]["not_passed"]
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("machine", "report"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--mode", choices=("gpu", "cpu-dry-run"), required=True)
    parser.add_argument("--command", default="", help="machine: the command line to record")
    args = parser.parse_args(argv)
    if args.what == "machine":
        write_machine(args.folder, args.mode, args.command)
        return 0
    return write_report(args.folder, args.mode)


if __name__ == "__main__":
    sys.exit(main())
