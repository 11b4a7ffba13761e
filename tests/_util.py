"""Shared test constants and measures (tests/ is on pytest's pythonpath)."""

import torch

CLASSNAMES = ["red circle", "blue square", "green triangle", "yellow star", "purple hexagon"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the tolerance measure of every fast-vs-reference test.

    The denominator is floored at 1e-4 so that a gradient that is zero in exact arithmetic
    (e.g. of a key bias, which softmax cancels) compares its float noise absolutely."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-4))
