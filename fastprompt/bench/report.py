"""Reporting of bench records: speed-ups and FLOP rates added to each record, the rich table
the CLI prints, and the JSON list `--json` writes."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from fastprompt.bench.flops import peak_flops
from fastprompt.files import write_json


def add_ratios(records: list[dict], device: torch.device) -> None:
    """Speed-ups against the reference and the anchor of the same method; useful FLOP rates on CUDA."""
    by = {(r["method"], r["variant"]): r for r in records}
    peak = peak_flops(device) if device.type == "cuda" else None
    for r in records:
        if r.get("error"):
            continue
        ref, anc = by.get((r["method"], "reference")), by.get((r["method"], "anchor"))
        r["speedup_vs_reference"] = r["images_per_s"] / ref["images_per_s"] if ref and not ref.get("error") else None
        r["speedup_vs_anchor"] = r["images_per_s"] / anc["images_per_s"] if anc and not anc.get("error") else None
        if device.type == "cuda":
            fast = by.get((r["method"], "fast"))
            useful = fast.get("counted_flops_per_step") if fast and not fast.get("error") else None
            r["useful_flops_per_step"] = useful
            if useful:
                rate = useful / (r["step_ms"] / 1e3)
                r["useful_tflops_per_s"] = rate / 1e12
                r["peak_fraction"] = rate / peak if peak else "unknown"
            r["gpu"] = torch.cuda.get_device_name(device)


def write_records(records: list[dict], path: Union[str, Path]) -> None:
    """The records as an indented JSON list, written atomically (the folder is created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, records)


def records_table(records: list[dict]):
    """A rich Table of the records."""
    from rich.table import Table

    first = records[0] if records else {}
    table = Table(title=f"fastprompt bench: {first.get('clip')}, batch {first.get('batch_size')}, "
                        f"{first.get('classes')} classes, {first.get('device')}")
    table.add_column("method", no_wrap=True, min_width=11)
    table.add_column("variant", no_wrap=True, min_width=12)
    for col in ("images/s", "step ms", "×ref", "×anchor", "peak MiB", "step MiB"):
        table.add_column(col, justify="right")
    cuda = any(r.get("useful_tflops_per_s") is not None for r in records)
    if cuda:
        table.add_column("useful TFLOP/s", justify="right")
        table.add_column("of peak", justify="right")

    def ratio(x):
        return "-" if x is None else f"{x:.2f}"

    for r in records:
        if r.get("error"):
            table.add_row(r["method"], r["variant"], f"failed: {r['error'][:60]}")
            continue
        row = [r["method"], r["variant"], f"{r['images_per_s']:.2f}", f"{r['step_ms']:.1f}",
               ratio(r.get("speedup_vs_reference")), ratio(r.get("speedup_vs_anchor")),
               f"{r['peak_memory_bytes'] / 2**20:.1f}", f"{r['step_memory_bytes'] / 2**20:.1f}"]
        if cuda:
            frac = r.get("peak_fraction")
            row += [f"{r.get('useful_tflops_per_s', 0):.1f}",
                    frac if isinstance(frac, str) or frac is None else f"{100 * frac:.1f}%"]
        table.add_row(*row)
    return table
