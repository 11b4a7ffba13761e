"""Timing and peak memory of bench steps, and `run_bench`, which measures a whole `BenchConfig`.

Measurements: all variants of a method are built, compiled (the compiled variant's first
call, reported as `compile_s`) and warmed up (`warmup` untimed steps); then `steps` timed
rounds run one step of every variant in turn, so that load from other processes lands on
all variants alike. `step_ms` is the median of a variant's steps (`step_ms_min` the
fastest), `images_per_s = batch_size / median`; `step_cpu_ms` is the median process CPU time
of a step (all threads), the steadier figure on a shared CPU. Memory, per variant:
- `step_memory_bytes`: the most a step allocates above what was allocated just before it.
  CUDA: `torch.cuda.max_memory_allocated` (peak stats reset before the step) minus
  `memory_allocated`. CPU: the resident-set high-water mark (VmHWM, reset through
  /proc/self/clear_refs before the step) minus the RSS before it; glibc is told to hand
  large frees back to the system (`mallopt(M_MMAP_THRESHOLD)`, `malloc_trim`) so that
  memory freed earlier does not hide a step's growth. Without /proc the process-lifetime
  `ru_maxrss` stands in (an upper bound) and `memory_measure` says so.
- `state_bytes`: what the variant keeps between steps: its model's parameters and buffers
  (the frozen CLIP; fp16 for the GPU anchor), optimiser state and batch;
- `peak_memory_bytes = state_bytes + step_memory_bytes`: what a run of this variant alone
  would peak at (on CUDA, what `max_memory_allocated` would report for it alone).
With `packs` (`--pack 1,2,4,8`) each packing method (`MethodSpec.packs`) is measured at each
number of runs N in its reference, fast and fast+compile variants: N runs of `batch_size` images
a step through `fastprompt.training.pack.Pack` (N = 1: the solo step itself); `pack` is N,
`images_per_s` the images of all runs a second and `images_per_s_per_run` one run's (batch_size
/ step), `speedup_vs_pack1` all runs' images/s against the solo step's: how much sooner N runs
finish packed than one after another (the cost of a run's image packed against solo is its
inverse).
A method that does not pack, and the anchor, have the solo rows only.
On CUDA each record also has the step's useful FLOPs (`fastprompt.bench.flops`, counted on
one step of every variant but the compiled one; the fast variant's count is the useful work
of the method), the achieved rate and its fraction of the GPU's dense bf16 peak
(`fastprompt.bench.report.add_ratios`).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import re
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from fastprompt.bench.config import BenchConfig
from fastprompt.bench.environment import environment
from fastprompt.bench.flops import count_flops
from fastprompt.bench.report import add_ratios
from fastprompt.bench.workloads import Workload, build, build_pack, state_bytes, train_step
from fastprompt.errors import FastpromptError
from fastprompt.methods import list_methods, method_spec
from fastprompt.models.clip import load_clip
from fastprompt.runtime import resolve_device

log = logging.getLogger(__name__)


class CpuPeak:
    """Peak resident memory of a stretch of this process, above its level at the start."""

    def __init__(self):
        self._libc = None
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so large frees go back to the OS
        except (OSError, AttributeError):  # not glibc: RSS still works, a little less sharply
            self._libc = None
        self.exact = self._reset_hwm()
        self.measure = "rss_hwm_delta" if self.exact else "ru_maxrss_delta (process lifetime; upper bound)"
        self.baseline = 0

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    def start(self) -> None:
        if self._libc is not None:
            self._libc.malloc_trim(0)
        if self.exact:
            self._reset_hwm()
            self.baseline = self._status("VmRSS")
        else:
            self.baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        if self.exact:
            return max(0, self._status("VmHWM") - self.baseline)
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline)


class CudaPeak:
    """Peak CUDA memory a step allocates above what was allocated before it."""

    measure = "cuda.max_memory_allocated"

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0

    def start(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return max(0, torch.cuda.max_memory_allocated(self.device) - self.baseline)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CPU-GPU sync: timing boundary


@dataclass
class _Run:
    """One variant of one method while it is being measured."""

    variant: str
    work: Workload
    optimizer: Optional[torch.optim.Optimizer]
    record: dict
    times: list = field(default_factory=list)
    cpu_times: list = field(default_factory=list)  # process CPU time per step (all threads)
    step_peak: int = 0


def _error_record(method: str, variant: str, cfg: BenchConfig, device: torch.device, err: Exception,
                  runs: int = 1) -> dict:
    log.error("bench %s / %s failed: %s: %s", method, variant, type(err).__name__, err)
    record = {"method": method, "variant": variant, "device": str(device), "clip": cfg.clip,
              "batch_size": cfg.batch_size, "classes": cfg.classes, "images_per_s": None,
              "peak_memory_bytes": None, "error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
    return {**record, "pack": runs} if cfg.packs else record


def _optimizer(variant: str, params, device: torch.device) -> torch.optim.Optimizer:
    """The optimiser each variant's trainer uses: ours is fused SGD with its lr a device tensor
    (`Trainer._make_optimizer`); the anchor-style codebases build a plain `torch.optim.SGD` (Dassl
    dassl/optim/optimizer.py `build_optimizer`)."""
    if variant == "anchor":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    return torch.optim.SGD(params, lr=torch.tensor(1e-3, device=device), momentum=0.9, fused=True)


def _prepare(method: str, variant: str, master, cfg: BenchConfig, device: torch.device, runs: int = 1) -> _Run:
    """Build one variant (of `runs` packed runs), compile it (fast+compile) and run its warm-up steps."""
    if runs == 1:
        work = build(method, variant, master, cfg, device)
        optimizer = _optimizer(variant, work.params, device) if work.params else None
    else:
        work = build_pack(method, variant, master, cfg, device, runs, lambda params: _optimizer(variant, params, device))
        optimizer = None  # each run's own, in the pack
    record = {"method": method, "variant": variant, "device": str(device), "clip": cfg.clip,
              "batch_size": cfg.batch_size, "classes": cfg.classes, "precision": work.precision,
              "step": "forward+backward+sgd" if optimizer or work.pack else "forward (nothing to train)",
              "steps": cfg.steps, "warmup": cfg.warmup}
    if cfg.packs:
        record["pack"] = runs
        if work.pack is not None:
            record["execution"] = work.pack.execution
    if variant == "fast+compile":
        _sync(device)
        start = time.perf_counter()
        train_step(work, optimizer)  # the compile (and a first step)
        _sync(device)
        record["compile_s"] = time.perf_counter() - start
    for _ in range(cfg.warmup):
        train_step(work, optimizer)
    _sync(device)
    return _Run(variant, work, optimizer, record)


def measure_method(method: str, master, cfg: BenchConfig, device: torch.device, memory: Union[CpuPeak, CudaPeak],
                   progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Records of every variant of `method`.

    The timed steps are interleaved (round r runs step r of every variant in turn), so that
    load from other processes, which comes and goes over minutes on a shared machine, lands
    on all variants alike instead of on whichever happened to run at the time."""
    runs: list = []
    packs = bool(cfg.packs) and method in list_methods() and method_spec(method).packs  # coop-text: the solo step
    if cfg.packs and not packs:
        log.warning("bench %s: the method does not pack (MethodSpec.packs); its solo rows only", method)
    for variant in cfg.variants:
        sizes = cfg.packs if packs and variant != "anchor" else (1,)
        for size in sizes:
            if progress is not None:
                progress(f"{method} / {variant}{f' x{size} runs' if size > 1 else ''}: build and warm up")
            try:
                runs.append(_prepare(method, variant, master, cfg, device, size))
            except FastpromptError:
                raise
            except Exception as err:  # one broken variant (say, a compiler failure) must not void an hour of runs
                runs.append(_error_record(method, variant, cfg, device, err, size))
                torch._dynamo.reset()
    live = [r for r in runs if isinstance(r, _Run)]
    for round_ in range(cfg.steps):
        if progress is not None:
            progress(f"{method}: timed round {round_ + 1}/{cfg.steps}")
        for run in live:
            memory.start()
            start, cpu_start = time.perf_counter(), time.process_time()
            train_step(run.work, run.optimizer)
            _sync(device)
            run.times.append(time.perf_counter() - start)
            run.cpu_times.append(time.process_time() - cpu_start)
            run.step_peak = max(run.step_peak, memory.peak())

    records = []
    for run in runs:
        if not isinstance(run, _Run):
            records.append(run)
            continue
        median = statistics.median(run.times)
        state = state_bytes(run.work, run.optimizer)
        if cfg.packs:
            run.record["images_per_s_per_run"] = cfg.batch_size / median
        run.record.update({
            "images_per_s": run.work.runs * cfg.batch_size / median,  # every run's images
            "step_ms": 1e3 * median,
            "step_ms_min": 1e3 * min(run.times),
            "step_ms_all": [round(1e3 * t, 3) for t in run.times],
            "step_cpu_ms": 1e3 * statistics.median(run.cpu_times),  # process CPU time, all threads
            "peak_memory_bytes": state + run.step_peak,
            "step_memory_bytes": run.step_peak,
            "state_bytes": state,
            "memory_measure": memory.measure,
        })
        if device.type == "cuda" and run.variant != "fast+compile":
            run.record["counted_flops_per_step"] = count_flops(lambda: train_step(run.work, run.optimizer))
        records.append(run.record)
        log.info("%s %s: %.2f images/s, step %.1f ms", method, run.variant, run.record["images_per_s"], run.record["step_ms"])
    del runs, live
    torch._dynamo.reset()  # drop compiled graphs before the next method
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def run_bench(cfg: BenchConfig, progress: Optional[Callable[[str], None]] = None,
              on_records: Optional[Callable[[list[dict]], None]] = None) -> list[dict]:
    """Measure every (method, variant) of `cfg`; returns the records (see the module docstrings).

    `on_records` gets each method's records as soon as they are measured (with their ratios
    and `environment`: machine, versions, date, commit)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    master = load_clip(cfg.clip, cfg.pretrained, device="cpu").model  # frozen CLIP shared by all variants
    memory = CudaPeak(device) if device.type == "cuda" else CpuPeak()
    records = []
    for method in cfg.methods:
        done = measure_method(method, master, cfg, device, memory, progress)
        add_ratios(done, device)  # ratios compare the variants of one method
        stamp = environment(device)
        for record in done:
            record.update(stamp)
        records += done
        if on_records is not None:
            on_records(done)
    return records
