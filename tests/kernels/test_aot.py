"""Every shipped Triton kernel config compiles for sm_80 and sm_90, without a GPU.

`python -m fastprompt.kernels.aot` compiles the kernels ahead of time for a GPU target
(Triton's full pipeline down to a cubin, ptxas included) in a subprocess without
TRITON_INTERPRET (this process defined its kernels for the interpreter). Its reports give each
compile's shared memory, registers and spills (every target in one subprocess, once per session);
they are cached in the user's cache folder (~/.cache/fastprompt/test-aot), keyed by kernel source,
Triton version, target, signature and config, so that a fresh clone does not compile them again
(in the clone's .pytest_cache every fresh clone paid a minute of CPU): a hit is the report a fresh
compile of the same kernel would give.
The default selection ("cover") compiles every config at least once per target with every dtype but fp32, head dim, causal flag and target kind at
least once per kernel (a cold run takes a minute or two on 2 cores, a warm one seconds); the
slow test adds each config's fp32 worst case, where the shared memory of a block runs out.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")

from fastprompt.errors import FastpromptError  # noqa: E402
from fastprompt.kernels._common import prune_by_shared_memory, shared_memory_pruner  # noqa: E402
from fastprompt.kernels.aot import SHARED_LIMIT, TARGETS, selector  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastprompt" / "test-aot"
MODULES = ("prefix_attention", "cosine_cross_entropy")
AUTOTUNED = {"prefix_attention.fwd", "prefix_attention.bwd_dkdv", "prefix_attention.bwd_dq"}  # pruned at launch


def _compile_reports(selection: str, path: Path) -> None:
    """The AOT compile reports of every target into `path` (one subprocess; the report cache
    CACHE makes a repeated compile a read)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastprompt.kernels.aot", "--selection", selection, "--cache", str(CACHE), "--json", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="session")
def aot_reports(build_once):
    """`aot_reports(target, selection)`: the compile reports of one target. Every target is
    compiled in one subprocess per selection and session, for every pytest-xdist worker
    (`build_once`: a worker asking while another compiles waits for its reports)."""

    @functools.cache
    def every_target(selection: str) -> tuple[dict, ...]:
        path = build_once(f"aot-reports-{selection}.json", functools.partial(_compile_reports, selection))
        return tuple(json.loads(path.read_text()))

    def reports(target: str, selection: str) -> tuple[dict, ...]:
        every = every_target(selection)
        assert {r["target"] for r in every} == set(TARGETS)  # every target compiled
        return tuple(r for r in every if r["target"] == target)

    return reports


def shipped(selection: str) -> list:
    """The launches the kernel modules declare (built here, not compiled: no GPU state needed)."""
    return [launch for name in MODULES
            for launch in importlib.import_module(f"fastprompt.kernels.{name}").aot_launches(selector(selection))]


by_target = pytest.mark.parametrize("target", sorted(TARGETS), ids=sorted(TARGETS))


@by_target
def test_every_shipped_config_compiles(target, aot_reports):
    reports = aot_reports(target, "cover")
    compiled = {(r["kernel"], r["config"]) for r in reports}
    every = {(launch.kernel, launch.config) for launch in shipped("full")}
    assert every - compiled == set(), "shipped configs never compiled"
    assert len(reports) == len(shipped("cover"))
    # every value of every axis (fp32 aside: the slow test) reached each kernel at least once
    for kernel in {r["kernel"] for r in reports}:
        full = [launch.case for launch in shipped("full") if launch.kernel == kernel]
        cover = [r["case"] for r in reports if r["kernel"] == kernel]
        for axis in full[0]:
            want = {c[axis] for c in full} - {"fp32"}
            if axis == "dtype" and not want:  # fp32-only tiles: compiled in fp32
                want = {"fp32"}
            assert want <= {c[axis] for c in cover}, (kernel, axis)


@by_target
def test_shared_memory_fits_the_target(target, aot_reports):
    limit = SHARED_LIMIT[TARGETS[target]]
    for r in aot_reports(target, "cover"):
        assert 0 <= r["shared"] <= limit, f"{r['kernel']} {r['config']} {r['case']}: {r['shared']} bytes of shared memory > {limit}"


@by_target
def test_registers_and_spills_are_reported(target, aot_reports):
    reports = aot_reports(target, "cover")
    for r in reports:
        assert 1 <= r["n_regs"] <= 255 and r["spill_stores"] >= 0 and r["spill_loads"] >= 0, r
    spilling = [f"{r['kernel']} [{r['config']}] {r['case']}: {r['n_regs']} regs, {r['spill_stores']} B spill stores"
                for r in reports if r["spill_stores"] > 0]
    if spilling:
        warnings.warn(f"{target}: {len(spilling)} kernel(s) spill registers:\n  " + "\n  ".join(spilling), stacklevel=1)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTPROMPT_SLOW_TESTS") != "1",
                    reason="fp32 compiles take 5-420 s each on CPU (17 min cold in all); opt in with FASTPROMPT_SLOW_TESTS=1")
@by_target
def test_fp32_worst_case_fits_or_is_pruned(target, caplog, aot_reports):
    """Each config in fp32 at head dim 128 (the most shared memory): fixed tiles must fit;
    an autotuned kernel keeps at least one config, and the pruner drops exactly the others."""
    limit = SHARED_LIMIT[TARGETS[target]]
    reports = aot_reports(target, "fp32")
    assert {(r["kernel"], r["config"]) for r in reports} == {(l.kernel, l.config) for l in shipped("fp32")}
    for kernel in {r["kernel"] for r in reports}:
        rows = [r for r in reports if r["kernel"] == kernel]
        if kernel not in AUTOTUNED:
            assert all(r["shared"] <= limit for r in rows), [(r["config"], r["shared"]) for r in rows]
            continue
        need = {r["config"]: r["shared"] for r in rows}
        with caplog.at_level(logging.INFO, logger="fastprompt.kernels._common"):
            kept = prune_by_shared_memory(list(need), need.__getitem__, limit, kernel=kernel)
        assert kept == [c for c in need if need[c] <= limit] and kept, need
        for config in set(need) - set(kept):
            assert f"config {config} pruned before launch: needs {need[config]} bytes" in caplog.text


def test_prune_by_shared_memory_keeps_order_and_says_why(caplog):
    configs = [triton.Config({"BLOCK_M": m}, num_warps=4, num_stages=3) for m in (128, 64, 32)]
    need = {128: 200_000, 64: 100_000, 32: 50_000}
    with caplog.at_level(logging.INFO, logger="fastprompt.kernels._common"):
        kept = prune_by_shared_memory(configs, lambda c: need[c.kwargs["BLOCK_M"]], 166_912, kernel="k")
    assert kept == configs[1:]
    assert "needs 200000 bytes of shared memory per block, the device allows 166912" in caplog.text
    with pytest.raises(FastpromptError, match="no shipped config fits this GPU's 1000 bytes .* smallest needs 50000"):
        prune_by_shared_memory(configs, lambda c: need[c.kwargs["BLOCK_M"]], 1000, kernel="k")


def test_shared_memory_pruner_compiles_each_config_for_the_launch(monkeypatch):
    """The autotune hook: each config compiled (warmup) with the launch's arguments, its
    constexprs and the config's own, then judged against the launch device's limit."""
    from triton.runtime import driver

    compiled = []

    class Kernel:  # stands in for a JITFunction: the hook only uses arg_names and warmup
        arg_names = ["X", "n", "HEAD_DIM", "BLOCK_M"]

        def warmup(self, *args, grid, **kwargs):
            compiled.append((args, kwargs))
            return SimpleNamespace(metadata=SimpleNamespace(shared=kwargs["BLOCK_M"] * kwargs["HEAD_DIM"] * 16))

    devices = []
    monkeypatch.setattr(driver, "_active", SimpleNamespace(utils=SimpleNamespace(
        get_device_properties=lambda index: devices.append(index) or {"max_shared_mem": 100_000})))
    configs = [triton.Config({"BLOCK_M": m}, num_warps=4, num_stages=2) for m in (128, 64)]
    x = torch.zeros(3)
    kept = shared_memory_pruner(Kernel(), "k")(configs, {"X": x, "n": 3}, HEAD_DIM=64)
    assert kept == configs[1:] and devices == [0]  # 128 * 64 * 16 = 131072 > 100000
    assert [args for args, _ in compiled] == [(x, 3), (x, 3)]
    assert [kw["BLOCK_M"] for _, kw in compiled] == [128, 64]
    assert all(kw["HEAD_DIM"] == 64 and kw["num_warps"] == 4 and kw["num_stages"] == 2 for _, kw in compiled)


def test_cover_selection_reaches_every_config_and_value():
    select = selector("cover")
    pairs = select(["a", "b", "c"], {"dtype": ("bf16", "fp16", "fp32"), "head_dim": (32, 64, 80, 128), "causal": (False, True)})
    assert {c for c, _ in pairs} == {"a", "b", "c"}
    assert {case["head_dim"] for _, case in pairs} == {32, 64, 80, 128}
    assert {case["dtype"] for _, case in pairs} == {"bf16", "fp16"}  # fp32: the "fp32" selection
    assert {case["causal"] for _, case in pairs} == {False, True}
    assert selector("fp32")(["a"], {"dtype": ("bf16", "fp32"), "head_dim": (32, 128)}) == [("a", {"dtype": "fp32", "head_dim": 128})]
    assert selector("fp32")(["a"], {"dtype": ("bf16",)}) == []
    with pytest.raises(FastpromptError, match="selection 'some'"):
        selector("some")
