"""`fastprompt bench`: training-step throughput and peak memory per method, four ways.

For each method (and `coop-text`, the CoOp text step alone) and each variant
- `reference`: `backend="reference"`, the eager oracle;
- `fast`: `backend="fast"`, the default;
- `fast+compile`: the fast backend under `torch.compile` (`fastprompt.training.compiled`);
- `anchor`: the method computed the way CoOp / MaPLe / DPT research code does
  (`benchmarks/anchor.py`, needs a source checkout; whole-model fp16 on GPU),
a training step is: forward, backward and an SGD (momentum 0.9) step on random images of
the model's input size with random labels (zeroshot has nothing to train: forward only).
Every variant starts from the same frozen CLIP and the same prompt initialisation; CAVPT
gets the zero-shot top-K of the batch precomputed (the default `topk_source="cached"`), in
every variant. On CUDA the reference, fast and compiled variants run under bf16 autocast.

`coop-text` times CoOp's text side alone: text features of all `classes` class prompts
through the learnable context, the cosine cross-entropy of a batch of cached (random,
normalised) image features against them, backward and SGD step; no image tower.

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
On CUDA each record also has the step's useful FLOPs (counted with FlopCounterMode on one
step of the fast variant, fastprompt's custom ops included), the achieved rate and its
fraction of the GPU's dense bf16 peak where the GPU is in `PEAK_FLOPS` ("unknown" otherwise).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import importlib.util
import json
import logging
import re
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fastprompt.errors import FastpromptError
from fastprompt.losses import cosine_ce
from fastprompt.methods import create_model, list_methods
from fastprompt.models.clip import load_clip
from fastprompt.runtime import resolve_device
from fastprompt.training.compiled import COMPILE_MODES, compile_fn, compile_step

log = logging.getLogger(__name__)

VARIANTS = ("reference", "fast", "fast+compile", "anchor")
TEXT_STEP = "coop-text"  # the CoOp text step alone (text encoder of all classes + loss + backward)

# Dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name()
# (first match wins, so the specific names come first). Vendor datasheets, no sparsity.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


def bench_methods() -> list[str]:
    """What `--methods` accepts: every method and `coop-text`."""
    return [*list_methods(), TEXT_STEP]


@dataclass
class BenchConfig:
    clip: str = "ViT-B-32"  # open_clip model name or fastprompt-tiny
    pretrained: Optional[str] = None  # None: random weights (throughput does not depend on them)
    batch_size: int = 16  # images per step
    classes: int = 100  # simulated classes, named "class 0" .. "class N-1"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    methods: tuple[str, ...] = field(default_factory=bench_methods)
    variants: tuple[str, ...] = VARIANTS
    steps: int = 3  # timed steps per variant (the median is reported)
    warmup: int = 1  # untimed steps before them
    compile_mode: str = "default"  # torch.compile mode of the fast+compile variant
    seed: int = 0

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.variants = tuple(self.variants)
        known = bench_methods()
        bad = [m for m in self.methods if m not in known]
        if bad or not self.methods:
            raise FastpromptError(f"unknown method {', '.join(map(repr, bad)) or '(none given)'} for bench; choose from: {', '.join(known)}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise FastpromptError(f"unknown variant {', '.join(map(repr, bad)) or '(none given)'}; choose from: {', '.join(VARIANTS)}")
        for name, low in (("batch_size", 1), ("classes", 1), ("steps", 1), ("warmup", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise FastpromptError(f"{name}={value!r} must be an integer >= {low}")
        if self.compile_mode not in COMPILE_MODES:
            raise FastpromptError(f"compile_mode={self.compile_mode!r} must be one of {', '.join(COMPILE_MODES)}")
        if isinstance(self.pretrained, str) and self.pretrained.lower() == "none":
            self.pretrained = None
        resolve_device(self.device)


# ----------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------


class _CpuPeak:
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


# ----------------------------------------------------------------------------------------
# FLOPs (CUDA only)
# ----------------------------------------------------------------------------------------

_flop_formulas_registered = False


def _register_flop_formulas() -> None:
    """FlopCounterMode counts aten ops; teach it fastprompt's custom ops (flash-attention convention)."""
    global _flop_formulas_registered
    if _flop_formulas_registered:
        return
    from torch.utils.flop_counter import register_flop_formula

    import fastprompt.kernels  # noqa: F401  (defines the ops)

    ops = torch.ops.fastprompt

    def attention(q_shape, pk_shape, causal):
        b, h, n, d = q_shape
        keys = pk_shape[2] + ((n + 1) / 2 if causal else n)
        return int(4 * b * h * n * keys * d)

    @register_flop_formula(ops.prefix_attention_fwd)
    def _(q, k, v, pk, pv, causal, scale, *args, **kwargs):
        return attention(q, pk, causal)

    @register_flop_formula(ops.prefix_attention_bwd)
    def _(dout, q, k, v, pk, pv, out, lse, causal, scale, *args, **kwargs):
        return int(2.5 * attention(q, pk, causal))

    @register_flop_formula(ops.cosine_cross_entropy_fwd)
    def _(x, w, target, scale, *args, **kwargs):
        return 2 * x[0] * w[0] * x[1]

    @register_flop_formula(ops.cosine_cross_entropy_bwd)
    def _(grad, x, w, target, scale, *args, **kwargs):
        return 4 * x[0] * w[0] * x[1]

    _flop_formulas_registered = True


def peak_flops(device: torch.device) -> Optional[float]:
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops
    return None


# ----------------------------------------------------------------------------------------
# workloads
# ----------------------------------------------------------------------------------------


def load_anchor():
    """`benchmarks/anchor.py` of the source tree (not part of the installed package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "anchor.py"
    if not path.is_file():
        raise FastpromptError(
            f"the anchor variant needs {path} (a source checkout of fastprompt); run from the repository or leave anchor out of --variants"
        )
    name = "fastprompt_bench_anchor"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@dataclass
class _Workload:
    step: Callable  # (*inputs) -> (loss, logits)
    inputs: tuple
    params: list  # trainable tensors the optimiser steps
    autocast: Callable  # () -> context manager
    precision: str
    model: torch.nn.Module


def _build(method: str, variant: str, master, cfg: BenchConfig, device: torch.device) -> _Workload:
    """Model, inputs and step function of one (method, variant), on `device`."""
    cuda = device.type == "cuda"
    anchor = variant == "anchor"
    half = anchor and cuda  # CoOp's prec="fp16": the whole model in fp16
    clip = copy.deepcopy(master).to(device) if cuda else master  # CPU: one shared copy (memory is a delta)
    if half:
        clip = clip.half()
    classnames = [f"class {i}" for i in range(cfg.classes)]
    torch.manual_seed(cfg.seed)  # the same prompt initialisation in every variant
    model_method = "coop" if method == TEXT_STEP else method
    backend = "reference" if variant in ("reference", "anchor") else "fast"
    model = create_model(model_method, classnames, clip=clip, pretrained=None, backend=backend, device=device)
    model.train()
    if half:
        model.half()
    dtype = torch.float16 if half else torch.float32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and not anchor else nullcontext
    precision = "fp16 (model.half)" if half else ("bf16 autocast" if cuda else "fp32")
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    labels = torch.randint(0, cfg.classes, (cfg.batch_size,), generator=gen).to(device)  # (B,)
    params = [p for p in model.parameters() if p.requires_grad]

    if method == TEXT_STEP:
        feats = F.normalize(torch.randn(cfg.batch_size, model.bundle.embed_dim, generator=gen), dim=-1)  # (B, D)
        feats = feats.to(device, dtype)
        if anchor:
            runner = load_anchor().Anchor(model)

            def step(x, y):
                w = runner.text_features()  # (K, D): 77 tokens, every class
                logits = model.clip.logit_scale.exp() * x @ w.t()  # (B, K)
                return F.cross_entropy(logits, y), logits.detach()
        else:
            def step(x, y):
                w = model.text_features()  # (K, D)
                return cosine_ce(x, w, y, model.logit_scale(), model.backend), w.detach()

            if variant == "fast+compile":
                step = compile_fn(step, cfg.compile_mode, device=device)
        return _Workload(step, (feats, labels), params, autocast, precision, model)

    size = model.bundle.image_size
    images = torch.randn(cfg.batch_size, 3, size, size, generator=gen).to(device, dtype)  # (B, 3, H, W)
    inputs: tuple = (images, labels)
    wants_topk = model.wants_topk_table()
    if wants_topk:
        with torch.no_grad(), autocast():
            topk = model.zero_shot_topk(images)  # (B, K_N): what topk_source="cached" supplies
        inputs = (images, labels, topk)
    if anchor:
        runner = load_anchor().Anchor(model)
        step = runner.loss_and_logits
    elif variant == "fast+compile":
        compiled = compile_step(model, cfg.compile_mode)
        step = (lambda x, y, k: compiled(x, y, topk=k)) if wants_topk else compiled
    else:
        step = model.loss_and_logits
    return _Workload(step, inputs, params, autocast, precision, model)


def _train_step(work: _Workload, optimizer: Optional[torch.optim.Optimizer]) -> None:
    with work.autocast():
        loss, _logits = work.step(*work.inputs)
    if optimizer is not None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CPU-GPU sync: timing boundary


def _count_flops(work: _Workload, optimizer) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    _register_flop_formulas()
    with FlopCounterMode(display=False) as counter:
        _train_step(work, optimizer)
    return int(counter.get_total_flops())


def _state_bytes(work: _Workload, optimizer) -> int:
    """Bytes of what a variant keeps resident between steps: its model's parameters and
    buffers (frozen CLIP included), the optimiser state and the batch."""
    seen, total = set(), 0
    tensors = [*work.model.parameters(), *work.model.buffers(), *[t for t in work.inputs if torch.is_tensor(t)]]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class _CudaPeak:
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


@dataclass
class _Run:
    """One variant of one method while it is being measured."""

    variant: str
    work: _Workload
    optimizer: Optional[torch.optim.Optimizer]
    record: dict
    times: list = field(default_factory=list)
    cpu_times: list = field(default_factory=list)  # process CPU time per step (all threads)
    step_peak: int = 0


def _error_record(method: str, variant: str, cfg: BenchConfig, device: torch.device, err: Exception) -> dict:
    log.error("bench %s / %s failed: %s: %s", method, variant, type(err).__name__, err)
    return {"method": method, "variant": variant, "device": str(device), "clip": cfg.clip,
            "batch_size": cfg.batch_size, "classes": cfg.classes, "images_per_s": None,
            "peak_memory_bytes": None, "error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}


def _prepare(method: str, variant: str, master, cfg: BenchConfig, device: torch.device) -> _Run:
    """Build one variant, compile it (fast+compile) and run its warm-up steps."""
    work = _build(method, variant, master, cfg, device)
    optimizer = torch.optim.SGD(work.params, lr=1e-3, momentum=0.9) if work.params else None
    record = {"method": method, "variant": variant, "device": str(device), "clip": cfg.clip,
              "batch_size": cfg.batch_size, "classes": cfg.classes, "precision": work.precision,
              "step": "forward+backward+sgd" if optimizer else "forward (nothing to train)",
              "steps": cfg.steps, "warmup": cfg.warmup}
    if variant == "fast+compile":
        _sync(device)
        start = time.perf_counter()
        _train_step(work, optimizer)  # the compile (and a first step)
        _sync(device)
        record["compile_s"] = time.perf_counter() - start
    for _ in range(cfg.warmup):
        _train_step(work, optimizer)
    _sync(device)
    return _Run(variant, work, optimizer, record)


def measure_method(method: str, master, cfg: BenchConfig, device: torch.device, memory,
                   progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Records of every variant of `method`.

    The timed steps are interleaved (round r runs step r of every variant in turn), so that
    load from other processes, which comes and goes over minutes on a shared machine, lands
    on all variants alike instead of on whichever happened to run at the time."""
    runs: list = []
    for variant in cfg.variants:
        if progress is not None:
            progress(f"{method} / {variant}: build and warm up")
        try:
            runs.append(_prepare(method, variant, master, cfg, device))
        except FastpromptError:
            raise
        except Exception as err:  # one broken variant (say, a compiler failure) must not void an hour of runs
            runs.append(_error_record(method, variant, cfg, device, err))
            torch._dynamo.reset()
    live = [r for r in runs if isinstance(r, _Run)]
    for round_ in range(cfg.steps):
        if progress is not None:
            progress(f"{method}: timed round {round_ + 1}/{cfg.steps}")
        for run in live:
            memory.start()
            start, cpu_start = time.perf_counter(), time.process_time()
            _train_step(run.work, run.optimizer)
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
        state = _state_bytes(run.work, run.optimizer)
        run.record.update({
            "images_per_s": cfg.batch_size / median,
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
            run.record["counted_flops_per_step"] = _count_flops(run.work, run.optimizer)
        records.append(run.record)
        log.info("%s %s: %.2f images/s, step %.1f ms", method, run.variant, run.record["images_per_s"], run.record["step_ms"])
    del runs, live
    torch._dynamo.reset()  # drop compiled graphs before the next method
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def _add_ratios(records: list[dict], device: torch.device) -> None:
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


def run_bench(cfg: BenchConfig, progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Measure every (method, variant) of `cfg`; returns the records (see the module docstring)."""
    device = resolve_device(cfg.device)
    if "anchor" in cfg.variants:
        load_anchor()  # fail before the long part
    torch.manual_seed(cfg.seed)
    master = load_clip(cfg.clip, cfg.pretrained, device="cpu").model  # frozen CLIP shared by all variants
    memory = _CudaPeak(device) if device.type == "cuda" else _CpuPeak()
    records = []
    for method in cfg.methods:
        records += measure_method(method, master, cfg, device, memory, progress)
    _add_ratios(records, device)
    return records


def write_json(records: list[dict], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=2)
        f.write("\n")


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


def config_dict(cfg: BenchConfig) -> dict:
    return asdict(cfg)
