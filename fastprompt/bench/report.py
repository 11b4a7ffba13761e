"""Reporting of bench records: speed-ups and FLOP rates added to each record, the line per
record the CLI prints as it is measured, and the JSON list `--json` rewrites after each method."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from fastprompt.bench.flops import peak_flops
from fastprompt.errors import FastpromptError
from fastprompt.files import write_json


def add_ratios(records: list[dict], device: torch.device) -> None:
    """Speed-ups against the reference and the anchor of the same method; useful FLOP rates on CUDA."""
    by = {(r["method"], r["variant"], r.get("pack", 1)): r for r in records}
    ok = lambda r: r is not None and not r.get("error")  # noqa: E731
    peak = peak_flops(device) if device.type == "cuda" else None
    for r in records:
        if r.get("error"):
            continue
        runs = r.get("pack", 1)
        if "pack" in r:  # --pack: all runs' images/s against the solo step's, and one run's
            solo = by.get((r["method"], r["variant"], 1))
            r["speedup_vs_pack1"] = r["images_per_s"] / solo["images_per_s"] if ok(solo) else None
        ref, anc = by.get((r["method"], "reference", runs)), by.get((r["method"], "anchor", runs))
        r["speedup_vs_reference"] = r["images_per_s"] / ref["images_per_s"] if ref and not ref.get("error") else None
        r["speedup_vs_anchor"] = r["images_per_s"] / anc["images_per_s"] if anc and not anc.get("error") else None
        if device.type == "cuda":
            fast = by.get((r["method"], "fast", runs))
            useful = fast.get("counted_flops_per_step") if fast and not fast.get("error") else None
            r["useful_flops_per_step"] = useful
            if useful:
                rate = useful / (r["step_ms"] / 1e3)
                r["useful_tflops_per_s"] = rate / 1e12
                r["peak_fraction"] = rate / peak if peak else "unknown"


def check_records_path(path: Union[str, Path]) -> None:
    """`--json PATH` can be written: not a folder (checked before anything is measured)."""
    if Path(path).is_dir():
        raise FastpromptError(f"--json {path} is a folder; pass a file name such as {Path(path) / 'bench.json'}")


def write_records(records: list[dict], path: Union[str, Path]) -> None:
    """The records as an indented JSON list, written atomically (the folder is created): called
    after every method, so the file is valid JSON with every record measured so far."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, records)


# one line per record, as it is measured; at most 80 columns (75 with the CUDA column)
_LINE = "{:<12} {:<12} {:>9} {:>9} {:>6} {:>7} {:>9}"


# with --pack: runs a step, all runs' images/s, one run's, the total against the solo step's (x 1)
_PACK_LINE = "{:<12} {:<12} {:>4} {:>9} {:>9} {:>8} {:>5} {:>9}"


def header_line(device_type: str, packs: bool = False) -> str:
    if packs:
        return _PACK_LINE.format("method", "variant", "runs", "images/s", "per run", "step ms", "x 1", "peak MiB")
    head = _LINE.format("method", "variant", "images/s", "step ms", "x ref", "x anch", "peak MiB")
    return head + (f" {'TFLOP/s':>7}" if device_type == "cuda" else "")


def record_line(r: dict) -> str:
    """One record in the columns of `header_line` (its --pack columns for a record with `pack`)."""
    if r.get("error"):
        runs = f" x{r['pack']}" if r.get("pack", 1) > 1 else ""
        return f"{r['method']:<12} {r['variant'] + runs:<12} failed: {r['error']}"[:80]

    def ratio(x):
        return "-" if x is None else f"{x:.2f}"

    if "pack" in r:
        return _PACK_LINE.format(r["method"], r["variant"], r["pack"], f"{r['images_per_s']:.2f}",
                                 f"{r['images_per_s_per_run']:.2f}", f"{r['step_ms']:.1f}",
                                 ratio(r.get("speedup_vs_pack1")), f"{r['peak_memory_bytes'] / 2**20:.1f}")

    line = _LINE.format(r["method"], r["variant"], f"{r['images_per_s']:.2f}", f"{r['step_ms']:.1f}",
                        ratio(r.get("speedup_vs_reference")), ratio(r.get("speedup_vs_anchor")),
                        f"{r['peak_memory_bytes'] / 2**20:.1f}")
    if "useful_tflops_per_s" in r:
        line += f" {r['useful_tflops_per_s']:>7.1f}"
    return line
