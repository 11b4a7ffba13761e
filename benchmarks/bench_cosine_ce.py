"""Microbenchmark: fused cosine-logit cross-entropy (Triton) against eager and compiled eager.

Run: `pytest benchmarks/bench_cosine_ce.py --benchmark-only` (select with -k, e.g.
`-k "in1k and fwd_bwd"`). Baselines: `cosine_cross_entropy_reference` (F.normalize + matmul +
F.cross_entropy) eagerly and under `torch.compile` (inductor; compiled during the warm-up
rounds). Modes: `fwd` (with inputs that require grad), `bwd` (backward only; forward in the
untimed setup), `fwd_bwd`. `wgrad` says whether w needs a gradient (CoOp: the text features
come from the learnable context) or not (cached class features: only x and the scale train).

Timing is `_timing.time_mode` (each call synchronised; extra_info has the median time and the
TFLOP/s). FLOPs count the matmul work: forward 2 * B * C * D, backward 2 * B * C * D per gradient (x, and w
when wgrad), not counting the logit recomputation of the fused backward.

Without CUDA it runs a small shape through Triton's interpreter, which only shows that the
suite works; the numbers mean nothing there (the compiled baseline then compiles C++ with
inductor, which takes a while on a small CPU).
"""

from _timing import CUDA, DEVICE, MODES, time_mode  # first: sets TRITON_INTERPRET without CUDA

import pytest
import torch

from fastprompt.kernels import cosine_cross_entropy, cosine_cross_entropy_reference

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


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
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
    time_mode(benchmark, lambda: loss_fn(x, w, target, scale), leaves, mode, loss_flops(B, C, D, wgrad, mode),
              shape=SHAPES[shape], dtype=dtype_name, wgrad=wgrad, impl=impl)
