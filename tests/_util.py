"""Shared test constants and measures (tests/ is on pytest's pythonpath)."""

import copy
from typing import Callable, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CLASSNAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple hexagon"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the tolerance measure of every fast-vs-reference test.

    The denominator is floored at 1e-4 so that a gradient that is zero in exact arithmetic
    (e.g. of a key bias, which softmax cancels) compares its float noise absolutely."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-4))


# ----------------------------------------------------------------------------------------
# The float64 oracle (STYLE.md habit 12, flash-attention's rule): each fp32 path's error is
# measured against a float64 run of the reference and bounded by a multiple of the error the
# plain fp32 reference makes against the same oracle, so a tolerance follows the float noise
# of the case (its shapes, weights, thread count) instead of a constant it may sit next to.
# ----------------------------------------------------------------------------------------

# flash-attention's 2x is for large tensors, whose largest error is a stable statistic; ours are
# small (a 5-class head, a 64-wide prompt) and E2MIM's critic reads near-uniform probabilities,
# so its gradients are ill-conditioned. Measured over every method and anchor case, 6 seeds and
# 1 or 2 threads (2856 checks of `gradient_quantities`, logits and loss): the fast and anchor
# paths' errors are at most 5.7x the fp32 reference's, 2.4x at the 99th percentile (2x fails 58
# checks). At 10x every check of the tests' own cases keeps a margin of 3.5x or more, and any
# real difference still fails: a 1e-3 relative change of any one gradient, bf16 or tf32 math.
ORACLE_FACTOR = 10.0
ORACLE_FLOOR = 1e-6  # relative: about 8 fp32 ulps, for a quantity the fp32 reference happens to round exactly


class NoDowncast(TorchDispatchMode):
    """Fails on any op that rounds a float64 value to a lower precision (a `.float()`, an fp32
    buffer written from float64): under it, a float64 run computes in float64 end to end.
    Values made in fp32 from no float64 input (a mixup draw, one-hot targets) are inputs the
    fp32 paths share, not rounding of the oracle's computation."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_flatten((args, kwargs))[0]):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                    raise AssertionError(f"the float64 oracle rounds to {t.dtype} in {func}")
        return out


def reference_copy(module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A copy of `module` (parameters and buffers in `dtype`) on the reference backend (a
    PromptModel's `backend`; the fast kernels compute in fp32 or lower); fails if a submodule
    keeps a floating tensor outside them (a cached value the copy would still compute from)."""
    bundle = getattr(module, "bundle", None)  # a PromptModel's: its tokenizer's BPE tables hold no tensor
    shared = {id(bundle.tokenizer): bundle.tokenizer} if bundle is not None else {}
    module = copy.deepcopy(module, memo=shared).to(dtype)
    if hasattr(module, "backend"):
        module.backend = "reference"
    for name, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
                raise AssertionError(f"{name or 'model'}.{attr} ({value.dtype}) is no parameter or buffer; "
                                     f"the {dtype} copy would compute from it")
    return module


def gradient_quantities(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors' gradients as the quantities a comparison measures, flattened:
    "grad NAME" for every tensor of more than one number, and "grad PART.*" for a part made of
    several tensors (all of `cavpt.*`, all of `e2mim.*`).

    A bias whose gradient nearly cancels (a sum over rows that a loss can cancel, as InfoNCE's
    over the batch) has a large relative float error, but as large on the fp32 reference as on
    the path, so against the oracle it is measured on its own like any tensor. A lone scalar (E2MIM's InfoNCE temperature) counts only within its
    part: its error is one draw, measured at 0.03x to 28x that of the fp32 reference across
    seeds, where a tensor's largest error is a stable statistic."""
    parts: dict[str, list[torch.Tensor]] = {}
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts.setdefault(name.split(".", 1)[0], []).append(p.grad.flatten())
            if p.numel() > 1:
                out[f"grad {name}"] = p.grad.flatten()
    for part, grads in parts.items():
        if len(grads) > 1:
            out[f"grad {part}.*"] = torch.cat(grads)
    return out


def step_outcome(model: torch.nn.Module, step: Callable[[], tuple], seed: int = 7) -> dict[str, torch.Tensor]:
    """`step()` -> (loss, logits) after `torch.manual_seed(seed)` (the same random draws on
    every path, e.g. E2MIM's mixup), then backward: {"loss", "logits", "grad ..."} (the
    gradients as `gradient_quantities` groups them)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, logits = step()
    out = {"loss": loss.detach(), "logits": logits.detach()}
    if loss.requires_grad:
        loss.backward()
        out.update(gradient_quantities(model))
    return out


def oracle_outcome(model: torch.nn.Module, step: Callable[[torch.nn.Module], tuple],
                   seed: int = 7) -> dict[str, torch.Tensor]:
    """`step_outcome` of a float64 copy of `model` on the reference backend, checked to compute
    in float64 throughout (`NoDowncast`); `step(m)` runs one step of the copy `m` on the fp32
    paths' inputs in float64 (`images.double()`)."""
    oracle = reference_copy(model, torch.float64)
    with NoDowncast():
        out = step_outcome(oracle, lambda: step(oracle), seed)
    for name, value in out.items():
        assert value.dtype == torch.float64, f"the float64 oracle's {name} is {value.dtype}"
    return out


def oracle_errors(got: Mapping[str, torch.Tensor], oracle: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """`relative_error` of each quantity of `got` against the float64 oracle."""
    assert got.keys() == oracle.keys(), (sorted(got), sorted(oracle))
    return {k: relative_error(got[k].double(), oracle[k]) for k in oracle}


def assert_within_reference_noise(paths: Mapping[str, Mapping[str, torch.Tensor]],
                                  reference: Mapping[str, torch.Tensor], oracle: Mapping[str, torch.Tensor],
                                  factor: float = ORACLE_FACTOR, floor: float = ORACLE_FLOOR) -> None:
    """Every quantity of every fp32 path (name -> outcome) is at most `factor` times as far
    from the float64 oracle as the fp32 reference is, plus `floor` (relative errors)."""
    noise = oracle_errors(reference, oracle)
    bad = []
    for path, got in paths.items():
        for key, error in oracle_errors(got, oracle).items():
            bound = factor * noise[key] + floor
            if not error <= bound:
                bad.append(f"{path} {key}: {error:.3g} from the float64 oracle > {bound:.3g} "
                           f"({factor:g} x the fp32 reference's {noise[key]:.3g} + {floor:g})")
    assert not bad, "; ".join(bad)


def assert_fast_equals_reference(build: Callable[[str], torch.nn.Module], images: torch.Tensor,
                                 labels: torch.Tensor) -> torch.nn.Module:
    """A PromptModel's fast backend against its reference, both measured against a float64 run
    of the reference (`assert_within_reference_noise`): loss, logits and every gradient of one
    `loss(images, labels)` step. `build(backend)` makes the model (the same prompts for both).
    Returns the fp32 reference model with its gradients, for a test's own checks on them."""

    def step(model, x):
        loss = model.loss(x, labels)
        with torch.no_grad():
            return loss, model(x)

    reference, fast = build("reference"), build("fast")
    oracle = oracle_outcome(reference, lambda m: step(m, images.double()))
    want = step_outcome(reference, lambda: step(reference, images))
    got = step_outcome(fast, lambda: step(fast, images))
    assert any(k.startswith("grad ") for k in want), "the step trains nothing"
    assert_within_reference_noise({"fast": got}, want, oracle)
    return reference
