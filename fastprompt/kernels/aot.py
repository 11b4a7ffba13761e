"""Ahead-of-time compilation of every shipped Triton kernel config for a GPU target, without a GPU.

Triton compiles for a named target on any machine: `triton.compile(ASTSource(fn, signature,
constexprs), target=GPUTarget("cuda", 80 | 90, 32), options=...)` runs the whole pipeline
(TTIR, TTGIR, LLVM IR, PTX, and ptxas, which the triton wheel ships, to a cubin). From that
we read what the CPU interpreter never checks: the shared memory a block needs
(`metadata.shared`) and, from ptxas's `-v` log, registers per thread and spill bytes.

The kernel modules own their facts: each declares `aot_launches()` (every kernel a launch
compiles, per shipped config, with its pointer dtypes and constexprs) beside its launcher;
this module only compiles them. It must run in a process where the kernels were defined
without `TRITON_INTERPRET=1` (the interpreter replaces `@triton.jit` functions and widens bf16
dots), so the tests call `python -m fastprompt.kernels.aot` in a subprocess with the flag
removed. Reports are cached as JSON keyed by the kernel sources, Triton version, target,
signature, constexprs and options: a warm run reads them back in milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from fastprompt.errors import FastpromptError

logger = logging.getLogger(__name__)

# Shared memory a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100 163 KiB,
# H100 227 KiB. Triton raises OutOfResources at launch above this; we check it before.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TARGETS = {"sm_80": 80, "sm_90": 90}

_TORCH_TO_TRITON = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.int64": "i64"}


def triton_dtype(dtype) -> str:
    """Triton's signature name of a torch dtype ("bf16", "fp32", ...)."""
    try:
        return _TORCH_TO_TRITON[str(dtype)]
    except KeyError:
        raise FastpromptError(f"aot: no Triton signature type for {dtype}; add it to _TORCH_TO_TRITON") from None


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel compile: what a launch with these inputs and this shipped config compiles."""

    kernel: str  # "prefix_attention.fwd"
    fn: Any  # the @triton.jit function (a JITFunction outside the interpreter)
    pointers: dict[str, str]  # pointer argument -> element type ("bf16", "fp32", "i64")
    floats: tuple[str, ...]  # scalar fp32 arguments; every other runtime scalar is i32
    constexprs: dict[str, Any]  # every tl.constexpr argument, including the config's blocks
    num_warps: int
    num_stages: int
    config: str  # the shipped config, e.g. "BLOCK_M=64 BLOCK_N=64 w4 s3"
    case: dict[str, Any]  # what the launch stands for: dtype, head_dim, causal, ...

    def signature(self) -> dict[str, str]:
        names = self.fn.arg_names
        const_names = {names[i] for i in self.fn.constexprs}
        missing = const_names - set(self.constexprs)
        if missing:
            raise FastpromptError(f"aot: {self.kernel} declares no value for constexpr(s) {sorted(missing)}")
        sig = {}
        for name in names:
            if name in const_names:
                sig[name] = "constexpr"
            elif name in self.pointers:
                sig[name] = "*" + self.pointers[name]
            elif name in self.floats:
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        return sig

    def attrs(self) -> dict[tuple[int, ...], list]:
        """What the launcher specialises at run time for our tensors: every pointer 16-byte
        aligned (torch allocations are) and every stride a multiple of 16 elements (true for
        contiguous tensors with the head dims and widths we ship)."""
        out = {}
        for i, name in enumerate(self.fn.arg_names):
            if name in self.pointers or name.startswith("stride_"):
                out[(i,)] = [["tt.divisibility", 16]]
        return out


def config_label(blocks: dict[str, int], num_warps: int, num_stages: int) -> str:
    return " ".join(f"{k}={v}" for k, v in blocks.items()) + f" w{num_warps} s{num_stages}"


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _report_key(launch: Launch, capability: int) -> str:
    """Triton's own source hash of the kernel (its text, the @triton.jit functions it calls and
    the globals it reads), the Triton version, the target, signature, constexprs and options."""
    import triton

    blob = json.dumps(
        [launch.fn.cache_key, triton.__version__, launch.kernel, capability, launch.signature(),
         {k: str(v) for k, v in launch.constexprs.items()}, launch.num_warps, launch.num_stages],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def compile_launch(launch: Launch, capability: int) -> dict[str, Any]:
    """Compile one launch for sm_<capability> and report shared memory, registers and spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(launch.fn, launch.signature(), launch.constexprs, launch.attrs())
    log = io.StringIO()
    start = time.perf_counter()
    # Triton prints the ptxas -v log when asked; always compile so the log is never skipped
    # by Triton's own cache (ours, keyed the same way, sits in front).
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope():
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                src, target=GPUTarget("cuda", capability, 32),
                options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages),
            )
    seconds = time.perf_counter() - start
    text = log.getvalue()
    regs = _PTXAS_REGS.findall(text)
    spills = _PTXAS_SPILLS.findall(text)
    if "cubin" not in kernel.asm or not regs or not spills:
        raise FastpromptError(f"aot: {launch.kernel} for sm_{capability}: no cubin or no ptxas -v log (got {text[-300:]!r})")
    return dict(
        kernel=launch.kernel, config=launch.config, case=launch.case, target=f"sm_{capability}",
        shared=int(kernel.metadata.shared), shared_limit=SHARED_LIMIT[capability],
        n_regs=int(regs[-1]), spill_stores=int(spills[-1][0]), spill_loads=int(spills[-1][1]),
        num_warps=launch.num_warps, num_stages=launch.num_stages, compile_s=round(seconds, 3),
    )


def _compile_cached(args) -> dict[str, Any]:
    launch, capability, cache = args
    path = cache / f"{_report_key(launch, capability)}.json"
    if path.is_file():
        report = json.loads(path.read_text())
        report["cached"] = True
        return report
    report = compile_launch(launch, capability)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(report))
    tmp.replace(path)
    report["cached"] = False
    return report


SELECTIONS = ("cover", "fp32", "full")


def selector(selection: str):
    """`select(configs, axes) -> [(config, case)]` for the kernel modules' `aot_launches`.

    - "cover": every config at least once and every value of every axis at least once per
      kernel (case i of max(#configs, #values) takes value i mod #values of each axis and goes
      to config i mod #configs); fp32 is left to "fp32" where an axis has other dtypes (IEEE
      fp32 dots compile ten times slower);
    - "fp32": each config once in fp32 with the last (largest) value of every other axis: the
      most shared memory a config needs;
    - "full": every config under every combination of the axes.
    """
    if selection not in SELECTIONS:
        raise FastpromptError(f"aot: selection {selection!r} is not one of {', '.join(SELECTIONS)}")

    def select(configs, axes):
        configs = list(configs)
        if selection == "full":
            names = list(axes)
            return [(c, dict(zip(names, values))) for c in configs for values in itertools.product(*axes.values())]
        dtypes = tuple(axes.get("dtype", ()))
        if selection == "fp32":
            if "fp32" not in dtypes:
                return []
            return [(c, {k: v[-1] for k, v in axes.items()} | {"dtype": "fp32"}) for c in configs]
        if len(dtypes) > 1:
            axes = axes | {"dtype": tuple(d for d in dtypes if d != "fp32")}
        n = max(len(configs), *(len(v) for v in axes.values()))
        return [(configs[i % len(configs)], {k: v[i % len(v)] for k, v in axes.items()}) for i in range(n)]

    return select


def shipped_launches(selection: str = "cover") -> list[Launch]:
    """Every kernel of both ops under every shipped config (see the modules' `aot_launches`)."""
    import importlib

    from fastprompt.kernels._common import is_interpreted

    launches = []
    for name in ("prefix_attention", "cosine_cross_entropy"):
        module = importlib.import_module(f"fastprompt.kernels.{name}")
        if module._INTERPRETED:
            raise FastpromptError("aot: the kernels were defined under TRITON_INTERPRET=1; run the AOT compile in a process without it")
        launches += module.aot_launches(selector(selection))
    if any(is_interpreted(launch.fn) for launch in launches):
        raise FastpromptError("aot: a kernel is interpreted; run the AOT compile in a process without TRITON_INTERPRET=1")
    return launches


_JOBS: list = []  # the work list of compile_all, inherited by its forked workers (JITFunctions do not pickle)


def _compile_job(index: int) -> dict[str, Any]:
    return _compile_cached(_JOBS[index])


def compile_all(targets: list[int], cache: Path, *, selection: str = "cover", workers: int = 2) -> list[dict[str, Any]]:
    """Compile every shipped launch for every target (cached). Returns the reports in order."""
    global _JOBS
    cache.mkdir(parents=True, exist_ok=True)
    _JOBS = [(launch, cap, cache) for cap in targets for launch in shipped_launches(selection)]
    with tempfile.TemporaryDirectory(prefix="fastprompt-aot-") as triton_cache:
        os.environ["TRITON_CACHE_DIR"] = triton_cache  # Triton's own cubins: throwaway
        if workers <= 1:
            return [_compile_job(i) for i in range(len(_JOBS))]
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_compile_job, range(len(_JOBS))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all")
    parser.add_argument("--cache", type=Path, default=Path(".pytest_cache/fastprompt-aot"), help="report cache folder")
    parser.add_argument("--selection", choices=SELECTIONS, default="cover", help="which (config, case) pairs: see selector()")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the reports here (default: stdout)")
    args = parser.parse_args(argv)
    targets = [TARGETS[t] for t in (args.target or sorted(TARGETS))]
    reports = compile_all(targets, args.cache, selection=args.selection, workers=args.workers)
    text = json.dumps(reports, indent=1)
    if args.json:
        args.json.write_text(text)
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("fastprompt.kernels.aot: unset TRITON_INTERPRET (the AOT compile needs compiled, not interpreted, kernels)")
    sys.exit(main())
