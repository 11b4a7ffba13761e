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


def test_prefix_groups_equal_full_prompts(tiny_clip):
    """G prefixes, each shared by the K prompts of its group (CoCoOp's per-image context), equal
    the G·K full prompts through the full-length tower: forward and the gradient to every prefix."""
    from fastprompt.models.text import encode_embeddings, encode_prefix_groups

    model = fastprompt.create_model("coop", classnames=NAMES, clip=tiny_clip, n_ctx=3)
    text = model.text
    out = {}
    for path in ("groups", "full"):
        ctx = (0.5 * torch.randn(3, 3, 64, generator=torch.Generator().manual_seed(0))).requires_grad_()  # (G, M, width): the same on both paths
        prefix = torch.cat([text.token_prefix[:1].expand(3, -1, -1), ctx], dim=1)  # (G, 1+M, width)
        if path == "groups":
            feats = encode_prefix_groups(model.clip, prefix, text.token_suffix, text.eot, text.length)  # (G, K, D)
        else:
            full = torch.cat([prefix[:, None].expand(-1, len(NAMES), -1, -1),
                              text.token_suffix[None].expand(3, -1, -1, -1)], dim=2).flatten(0, 1)  # (G·K, 77, width)
            feats = encode_embeddings(model.clip, full, text.eot.repeat(3), "reference").view(3, len(NAMES), -1)
        (feats * torch.linspace(-1, 1, feats.numel()).view_as(feats)).sum().backward()
        out[path] = (feats.detach(), ctx.grad)
    assert relative_error(out["groups"][0], out["full"][0]) < 1e-5
    assert relative_error(out["groups"][1], out["full"][1]) < 1e-4
