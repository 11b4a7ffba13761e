"""The shared-prefix text path equals the full prompts, at 1 class and at many with names of
different token lengths, forward and gradient to the context."""

import pytest
import torch

import fastprompt

from _util import relative_error

NAMES = ["cat", "a very long and elaborate class name with many tokens in it", "x", "sea or lake", "permanent crop land"]


@pytest.mark.parametrize("classnames", [NAMES[:1], NAMES[1:2], NAMES], ids=["1-class", "long-1-class", "many"])
def test_shared_prefix_equals_full_prompts(classnames, tiny_clip):
    out = {}
    for backend in ("reference", "fast"):
        torch.manual_seed(0)
        model = fastprompt.create_model("coop", classnames=classnames, clip=tiny_clip, backend=backend, n_ctx=6)
        feats = model.text(model.clip, backend)  # (K, D)
        (feats * torch.linspace(-1, 1, feats.numel()).view_as(feats)).sum().backward()
        out[backend] = (feats.detach(), model.text.context.grad.clone())
    assert relative_error(out["fast"][0], out["reference"][0]) < 1e-5
    assert relative_error(out["fast"][1], out["reference"][1]) < 1e-4
