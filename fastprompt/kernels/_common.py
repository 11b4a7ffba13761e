"""Plumbing shared by the Triton kernels: is Triton importable, is it interpreting, which impl.

Triton decides at decoration time whether a `@triton.jit` function is compiled for the GPU
or run by its numpy interpreter (`TRITON_INTERPRET=1`), so the kernel modules ask their own
kernel objects (`is_interpreted`) instead of reading the environment later. Without Triton
(it is a Linux-only dependency) the kernels are defined against a stub and only the eager
references run.
"""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import Callable, Sequence

import torch

from fastprompt.errors import FastpromptError

logger = logging.getLogger(__name__)

IMPLS = ("auto", "triton", "reference")

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - Linux always has it (pyproject marker)
    HAS_TRITON = False

    def _identity_decorator(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    # Enough surface for the kernel modules to define (never run) their kernels.
    triton = SimpleNamespace(jit=_identity_decorator)
    tl = SimpleNamespace(constexpr=object)
    logger.warning("triton is not importable: fastprompt's Triton kernels are unavailable; impl='auto' uses the eager references")


if HAS_TRITON:
    try:
        _INTERPRET_AT_IMPORT = bool(triton.knobs.runtime.interpret)
    except AttributeError:  # triton < 3.3 has no knobs
        import os

        _INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"
    _WIDEN_BF16_DOT = tl.constexpr(_INTERPRET_AT_IMPORT)

    @triton.jit
    def mma(a, b, acc, PRECISION: tl.constexpr):
        """`tl.dot(a, b, acc)` with fp32 accumulation. Triton's interpreter multiplies bf16
        blocks as if their bits were integers (numpy has no bf16), so there the operands are
        widened to fp32 first; widening is exact, so the products are those of the GPU's bf16
        MMA and the CPU tests exercise the real casts."""
        if _WIDEN_BF16_DOT:
            if a.dtype == tl.bfloat16:
                a = a.to(tl.float32)
            if b.dtype == tl.bfloat16:
                b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)

else:  # pragma: no cover
    mma = None


def is_interpreted(kernel) -> bool:
    """True when `kernel` (a raw `@triton.jit` function) runs in Triton's CPU interpreter."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def resolve_impl(impl: str, device: torch.device, *, op: str, interpreted: bool) -> str:
    """Map the user's `impl` choice to "triton" or "reference" for tensors on `device`.

    "auto" is Triton on CUDA and the reference elsewhere; "triton" on CPU tensors needs the
    interpreter. Pure Python on static facts (device, flags), so `torch.compile` traces it.
    """
    if impl not in IMPLS:
        raise FastpromptError(f"{op}: impl={impl!r} is not supported; pass one of 'auto', 'triton', 'reference'")
    if impl == "reference":
        return "reference"
    if impl == "auto":
        return "triton" if (device.type == "cuda" and HAS_TRITON) else "reference"
    if not HAS_TRITON:
        raise FastpromptError(f"{op}: impl='triton' needs the triton package, which is not importable; install triton or use impl='reference'")
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        if not interpreted:
            raise FastpromptError(
                f"{op}: impl='triton' on CPU tensors needs Triton's interpreter; set TRITON_INTERPRET=1 in the "
                "environment before fastprompt is imported, move the tensors to CUDA, or use impl='reference'"
            )
        return "triton"
    raise FastpromptError(f"{op}: impl='triton' runs on CUDA (or CPU under TRITON_INTERPRET=1), got {device.type} tensors; use impl='reference'")


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact fp32 products for fp32 inputs (TF32 would miss the 1e-4
    agreement with the eager reference); the argument is ignored for bf16/fp16."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def sm_count(device_index: int) -> int:
    """Number of streaming multiprocessors of a CUDA device (for split heuristics)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def lastdim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take arbitrary outer strides but need unit stride along the last dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


def prune_by_shared_memory(configs: Sequence, shared_bytes: Callable[[object], int], limit: int, *, kernel: str) -> list:
    """The configs whose compiled kernel needs at most `limit` bytes of shared memory per
    block, in their order; each dropped one is logged with its need. `shared_bytes(config)`
    is the compiled kernel's `metadata.shared` (on a GPU from `JITFunction.warmup`, in the
    CPU tests from an ahead-of-time compile for the target). Raises when none fits."""
    needs = [(config, shared_bytes(config)) for config in configs]
    kept = [config for config, need in needs if need <= limit]
    for config, need in needs:
        if need > limit:
            logger.info("%s: config %s pruned before launch: needs %d bytes of shared memory per block, the device allows %d",
                        kernel, config, need, limit)
    if not kept:
        smallest = min(need for _config, need in needs)
        raise FastpromptError(
            f"{kernel}: no shipped config fits this GPU's {limit} bytes of shared memory per block (the smallest needs "
            f"{smallest}); use impl='reference' or a smaller head dim / lower precision"
        )
    return kept


def shared_memory_pruner(kernel, name: str) -> Callable:
    """An autotune `early_config_prune` for `kernel` (a JITFunction): compiles each config for the
    launch's device (`warmup`; the launch then finds it compiled) and keeps those whose shared
    memory fits the device, so a config that cannot fit is dropped with a reason, never
    discovered as an OutOfResources error in the middle of autotuning."""

    def prune(configs, named_args, **kwargs):
        from triton.runtime import driver

        args = [named_args[n] for n in kernel.arg_names if n in named_args]
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        limit = driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]

        def shared_bytes(config) -> int:
            compiled = kernel.warmup(*args, grid=(1,), **kwargs, **config.all_kwargs())
            return int(compiled.metadata.shared)

        return prune_by_shared_memory(configs, shared_bytes, limit, kernel=name)

    return prune
