"""Every method in bf16: the fast backend under bf16 autocast is as close to the fp32 reference
as the reference itself is under bf16 autocast, within 2x (flash-attention's low-precision rule,
the one the kernel tests use). Logits, loss and every prompt gradient.

Runs on CUDA when there is one (the fast path's Triton kernels; `scripts/gpu-check.sh`) and on
CPU otherwise (the fast path's algorithms with the eager kernels; CPU autocast rounds the
matmuls to bf16)."""

import copy

import pytest
import torch
from _util import CLASSNAMES, relative_error

import fastprompt

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = 2e-3  # an absolute allowance: where bf16 autocast leaves a quantity (nearly) exact


def run(method, clip, images, labels, backend, bf16):
    torch.manual_seed(0)
    model = fastprompt.create_model(method, classnames=CLASSNAMES, clip=clip, pretrained=None, backend=backend)
    model = model.to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
        torch.manual_seed(7)  # the same mixup draws for e2mim
        loss = model.loss(images, labels)
        with torch.no_grad():
            logits = model(images)
    out = {"logits": logits.float(), "loss": loss.detach().float()}
    if model.prompt_state_dict():
        loss.backward()
        out |= {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return out


@pytest.mark.parametrize("method", fastprompt.list_methods())
def test_fast_bf16_error_at_most_twice_reference_bf16_error(method, tiny_clip, images, labels):
    clip = tiny_clip if DEVICE == "cpu" else copy.deepcopy(tiny_clip).to(DEVICE)  # the session's CPU model stays
    images, labels = images.to(DEVICE), labels.to(DEVICE)
    exact = run(method, clip, images, labels, "reference", bf16=False)
    ref = run(method, clip, images, labels, "reference", bf16=True)
    fast = run(method, clip, images, labels, "fast", bf16=True)
    assert fast.keys() == exact.keys() == ref.keys()
    for name in exact:
        if name.startswith("e2mim."):
            continue  # compared as one group below
        ref_err = relative_error(ref[name], exact[name])
        fast_err = relative_error(fast[name], exact[name])
        assert fast_err <= 2 * ref_err + FLOOR, f"{method} {name}: fast bf16 error {fast_err:.2e}, reference bf16 {ref_err:.2e}"
    # E2MIM's critic: its tensors' gradients are small and nearly cancel (norms ~1e-3 against ~5
    # for the context), so each tensor's bf16 error is noise of either path (0.1-0.4 relative);
    # the critic is compared as the one parameter group the optimiser steps
    critic = sorted(n for n in exact if n.startswith("e2mim."))
    if critic:
        group = {k: torch.cat([d[n].flatten() for n in critic]) for k, d in (("exact", exact), ("ref", ref), ("fast", fast))}
        ref_err = relative_error(group["ref"], group["exact"])
        fast_err = relative_error(group["fast"], group["exact"])
        assert fast_err <= 2 * ref_err + FLOOR, f"{method} critic group: fast bf16 error {fast_err:.2e}, reference bf16 {ref_err:.2e}"
