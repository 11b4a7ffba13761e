"""Shared test constants and measures (tests/ is on pytest's pythonpath)."""

import torch

CLASSNAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple hexagon"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the tolerance measure of every fast-vs-reference test.

    The denominator is floored at 1e-4 so that a gradient that is zero in exact arithmetic
    (e.g. of a key bias, which softmax cancels) compares its float noise absolutely."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-4))


def module_relative_errors(got: dict, want: dict) -> dict:
    """`relative_error` per module: the gradients of one module's tensors (a Linear's weight
    and bias, `e2mim.hand_head.2.*`) compared together, at the scale of the module.

    A bias gradient is the sum over rows of the same terms the weight gradient weighs by the
    inputs, and a loss can cancel that sum: InfoNCE's gradients with respect to the normalised
    embeddings sum to zero over the batch, so the critic's output bias only sees how the rows'
    normalisation Jacobians differ, near zero when the rows are alike (E2MIM's heads reading
    near-uniform probabilities of a random CLIP). Measured alone, that near-cancelled sum turns
    float noise into a large relative error; measured with its weight it does not."""
    groups: dict[str, list[str]] = {}
    for name in want:
        groups.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(name)
    return {module: relative_error(torch.cat([got[n].flatten() for n in names]),
                                   torch.cat([want[n].flatten() for n in names]))
            for module, names in groups.items()}
