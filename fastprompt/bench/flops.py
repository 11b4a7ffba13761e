"""FLOP accounting of a bench step (CUDA only): the useful FLOPs of one training step,
counted with `torch.utils.flop_counter.FlopCounterMode` (fastprompt's custom ops taught to
it), and the dense bf16 peak of known GPUs, for the fraction of peak a variant achieves."""

from __future__ import annotations

from typing import Callable, Optional

import torch

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

_flop_formulas_registered = False


def _register_flop_formulas() -> None:
    """FlopCounterMode counts aten ops; teach it fastprompt's custom ops (flash-attention convention).

    Called on first use (registration is global state of torch's flop counter, so it is not
    done at import)."""
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


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of `step` (a whole training step), custom ops included."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_flop_formulas()
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def peak_flops(device: torch.device) -> Optional[float]:
    """The dense bf16 peak of `device`'s GPU, FLOP/s, or None if it is not in `PEAK_FLOPS`."""
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops
    return None
