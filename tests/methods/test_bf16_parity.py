"""Every method in bf16: the fast backend under bf16 autocast is as close to a float64 run of the
reference as the reference itself is under bf16 autocast, within 2x (flash-attention's
low-precision rule, the one the kernel tests use). Logits, loss and every prompt gradient.

Runs on CUDA when there is one (the fast path's Triton kernels; `scripts/gpu-check.sh`) and on
CPU otherwise (the fast path's algorithms with the eager kernels; CPU autocast rounds the
matmuls to bf16)."""

import copy

import pytest
import torch
from _util import CLASSNAMES, assert_within_reference_noise, oracle_outcome, step_outcome

import fastprompt

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = 2e-3  # an absolute allowance: where bf16 autocast leaves a quantity (nearly) exact


def step(model, images, labels, bf16):
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
        loss = model.loss(images, labels)
        with torch.no_grad():
            return loss, model(images)


@pytest.mark.parametrize("method", fastprompt.list_methods())
def test_fast_bf16_error_at_most_twice_reference_bf16_error(method, tiny_clip, images, labels):
    """Against a float64 run of the reference (`assert_within_reference_noise`): every quantity
    of the fast backend under bf16 autocast at most 2x as far off as the reference under bf16
    autocast, plus FLOOR. Measured over 6 seeds on CPU (264 checks): at most 1.6x."""
    clip = tiny_clip if DEVICE == "cpu" else copy.deepcopy(tiny_clip).to(DEVICE)  # the session's CPU model stays
    images, labels = images.to(DEVICE), labels.to(DEVICE)
    models = {}
    for backend in ("reference", "fast"):
        torch.manual_seed(0)
        models[backend] = fastprompt.create_model(method, classnames=CLASSNAMES, clip=clip, pretrained=None,
                                                  backend=backend).to(DEVICE)
    reference, fast = models["reference"], models["fast"]
    oracle = oracle_outcome(reference, lambda m: step(m, images.double(), labels, bf16=False))
    want = step_outcome(reference, lambda: step(reference, images, labels, bf16=True))  # the same mixup draws (seed)
    got = step_outcome(fast, lambda: step(fast, images, labels, bf16=True))
    assert_within_reference_noise({"fast bf16": got}, want, oracle, factor=2.0, floor=FLOOR)
