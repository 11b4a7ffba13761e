"""Microbenchmark: fused cosine-logit cross-entropy (Triton) against eager and compiled eager.

Run: `pytest benchmarks/bench_cosine_ce.py --benchmark-only` (select with -k, e.g.
`-k "in1k and fwd_bwd"`). Baselines: `cosine_cross_entropy_reference` (F.normalize + matmul +
F.cross_entropy) eagerly and under `torch.compile` (inductor; compiled during the warm-up
rounds). Modes: `fwd` (with inputs that require grad), `bwd` (backward only; forward in the
untimed setup), `fwd_bwd`. `wgrad` says whether w needs a gradient (CoOp: the text features
come from the learnable context) or not (cached class features: only x and the scale train).

Each timed call ends with torch.cuda.synchronize(). extra_info carries the median time and the
TFLOP/s of the matmul work: forward 2 * B * C * D, backward 2 * B * C * D per gradient (x, and w
when wgrad), not counting the logit recomputation of the fused backward.

Without CUDA it runs a small shape through Triton's interpreter, which only shows that the
suite works; the numbers mean nothing there (the compiled baseline then compiles C++ with
inductor, which takes a while on a small CPU).
"""

import os

import torch

if not torch.cuda.is_available():  # before fastprompt defines its @triton.jit kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastprompt.kernels import cosine_cross_entropy, cosine_cross_entropy_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ROUNDS, WARMUP = (30, 5) if CUDA else (2, 1)

# name: (B, C, D)
SHAPES = {
    "in1k": (256, 1000, 512),  # classification against ImageNet class features
    "infonce": (256, 256, 512),  # InfoNCE: w = the other view of the batch
    "large": (4096, 20000, 512),  # the largest supported size
}
if not CUDA:
    SHAPES = {"small": (16, 40, 32)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32} if CUDA else {"fp32": torch.float32}

# One compiled graph per (shape, dtype, wgrad): more than dynamo's default 8 recompiles, after
# which it would silently run the function eagerly.
torch._dynamo.config.recompile_limit = 64
_compiled_reference = torch.compile(cosine_cross_entropy_reference, dynamic=False)
IMPLS = {
    "triton": lambda *a: cosine_cross_entropy(*a, impl="triton"),
    "eager": cosine_cross_entropy_reference,
    "compiled": _compiled_reference,
}


def loss_flops(B, C, D, wgrad, mode):
    fwd = 2 * B * C * D
    bwd = fwd * (2 if wgrad else 1)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd_bwd"])
@pytest.mark.parametrize("wgrad", [False, True], ids=["w-frozen", "wgrad"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cosine_ce(benchmark, shape, dtype_name, wgrad, mode, impl):
    B, C, D = SHAPES[shape]
    dtype = DTYPES[dtype_name]
    x = torch.randn(B, D, device=DEVICE, dtype=dtype, requires_grad=True)  # (B, D)
    w = torch.randn(C, D, device=DEVICE, dtype=dtype, requires_grad=wgrad)  # (C, D)
    scale = torch.tensor(100.0, device=DEVICE, requires_grad=True)  # CLIP's logit scale
    target = torch.randint(0, C, (B,), device=DEVICE)  # (B,)
    leaves = [x, w, scale] if wgrad else [x, scale]
    loss_fn = IMPLS[impl]

    def forward():
        return loss_fn(x, w, target, scale)

    def fwd():
        forward()
        sync()

    def fwd_bwd():
        torch.autograd.grad(forward(), leaves)  # no .grad accumulation in the timing
        sync()

    def bwd_setup():
        loss = forward()
        sync()
        return (loss,), {}

    def bwd(loss):
        torch.autograd.grad(loss, leaves)
        sync()

    if mode == "bwd":
        benchmark.pedantic(bwd, setup=bwd_setup, rounds=ROUNDS, warmup_rounds=WARMUP)
    else:
        benchmark.pedantic(fwd if mode == "fwd" else fwd_bwd, rounds=ROUNDS, warmup_rounds=WARMUP)

    benchmark.extra_info.update(
        shape=SHAPES[shape], dtype=dtype_name, wgrad=wgrad, mode=mode, impl=impl,
        device=torch.cuda.get_device_name() if CUDA else "cpu (triton interpreter)",
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_ms"] = median * 1e3
        benchmark.extra_info["tflops"] = loss_flops(B, C, D, wgrad, mode) / median / 1e12
