"""The timing harness of the kernel microbenchmarks (`bench_cosine_ce.py`, `bench_prefix_attention.py`).

`time_mode` times one op under pytest-benchmark in one of three modes: `fwd` (forward with
inputs that require grad, as in training), `bwd` (backward only; the forward runs in the
untimed setup), `fwd_bwd`. Gradients are taken with `torch.autograd.grad`, so no `.grad`
accumulates during timing. Each timed call ends with torch.cuda.synchronize(); extra_info
carries the median time and the TFLOP/s implied by the caller's FLOP count.

Without CUDA the kernels run through Triton's interpreter: importing this module sets
TRITON_INTERPRET=1 then, so import it before fastprompt defines its @triton.jit kernels.
"""

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if CUDA else "cpu"
ROUNDS, WARMUP = (30, 5) if CUDA else (2, 1)
MODES = ["fwd", "bwd", "fwd_bwd"]


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def time_mode(benchmark, forward, leaves, mode: str, flops: float, grad_output=None, **info) -> None:
    """Time `forward()` (and the gradient of its output to `leaves`, given `grad_output`) in `mode`."""

    def fwd():
        forward()
        sync()

    def fwd_bwd():
        torch.autograd.grad(forward(), leaves, grad_output)
        sync()

    def bwd_setup():
        out = forward()
        sync()
        return (out,), {}

    def bwd(out):
        torch.autograd.grad(out, leaves, grad_output)
        sync()

    if mode == "bwd":
        benchmark.pedantic(bwd, setup=bwd_setup, rounds=ROUNDS, warmup_rounds=WARMUP)
    else:
        benchmark.pedantic(fwd if mode == "fwd" else fwd_bwd, rounds=ROUNDS, warmup_rounds=WARMUP)

    benchmark.extra_info.update(mode=mode, device=torch.cuda.get_device_name() if CUDA else "cpu (triton interpreter)",
                                **info)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_ms"] = median * 1e3
        benchmark.extra_info["tflops"] = flops / median / 1e12
