"""Microbenchmark: prefix attention (Triton) against SDPA on the concatenated sequence.

Run: `pytest benchmarks/bench_prefix_attention.py --benchmark-only` (select with -k, e.g.
`-k "vit-b32 and fwd_bwd"`). The baseline is what the fast path replaces: `torch.cat` of the
(expanded) prefix and the tokens, then `scaled_dot_product_attention`, once per SDPA backend
that accepts the case (flash refuses the boolean causal mask and fp32, for example; such
cases are skipped). Modes: `fwd` (forward with inputs that require grad, as in training),
`bwd` (backward only; the forward runs in the untimed setup), `fwd_bwd`.

Timing is `_timing.time_mode` (each call synchronised; extra_info has the median time and the
TFLOP/s). FLOPs follow the flash-attention convention: forward 4 * B * H * N * keys * d
(keys = P + N, or P + (N + 1) / 2 when causal), backward 2.5x the forward.

Without CUDA it runs small shapes through Triton's interpreter, which only shows that the
suite works; the numbers mean nothing there.
"""

from _timing import CUDA, DEVICE, MODES, time_mode  # first: sets TRITON_INTERPRET without CUDA

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastprompt.kernels import prefix_attention, prefix_attention_reference

# name: (B, H, N, P, d, Bp, causal)
SHAPES = {
    "vit-b32": (256, 12, 50, 10, 64, 1, False),  # VPT-deep, shared prompts
    "vit-b16": (256, 12, 197, 10, 64, 1, False),
    "vit-b32-cavpt": (256, 12, 50, 15, 64, 256, False),  # + 5 class-aware prompts per image
    "text": (256, 8, 24, 17, 64, 1, True),  # CoOp: SOS + 16 context shared, causal suffix
}
if not CUDA:
    SHAPES = {
        "vit-b32": (2, 2, 50, 10, 64, 1, False),
        "text": (2, 2, 24, 17, 64, 1, True),
    }
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32} if CUDA else {"fp32": torch.float32}
BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
IMPLS = ["triton", *BACKENDS]


def attention_flops(B, H, N, P, d, causal, mode):
    keys = P + ((N + 1) / 2 if causal else N)
    fwd = 4 * B * H * N * keys * d
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode]


def make_inputs(B, H, N, P, d, Bp, dtype):
    q, k, v = (torch.randn(B, H, N, d, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(Bp, H, P, d, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    dout = torch.randn(B, H, N, d, device=DEVICE, dtype=dtype)  # (B, H, N, d)
    return (q, k, v, pk, pv), dout


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_prefix_attention(benchmark, shape, dtype_name, mode, impl):
    B, H, N, P, d, Bp, causal = SHAPES[shape]
    inputs, dout = make_inputs(B, H, N, P, d, Bp, DTYPES[dtype_name])

    if impl == "triton":
        def forward():
            return prefix_attention(*inputs, causal=causal, impl="triton")
    else:
        if not CUDA and impl != "sdpa-math":
            pytest.skip("only the math SDPA backend runs on CPU")

        def forward():
            with sdpa_kernel(BACKENDS[impl]):
                return prefix_attention_reference(*inputs, causal=causal)

        try:  # does this backend accept the case (dtype, mask, head dim)?
            torch.autograd.grad(forward(), inputs, dout)
        except RuntimeError as err:
            pytest.skip(f"{impl} does not run this case: {str(err).splitlines()[0]}")

    time_mode(benchmark, forward, inputs, mode, attention_flops(B, H, N, P, d, causal, mode), grad_output=dout,
              shape=SHAPES[shape], dtype=dtype_name, impl=impl)
