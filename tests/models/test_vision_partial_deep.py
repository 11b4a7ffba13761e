"""The prompted image tower with deep prompts in the first L_d < L layers only (CAVPT released):
the later layers carry the per-sample prompts alone, or no slots at all; fast == reference."""

import pytest
import torch

from fastprompt.models import vision

from _util import relative_error


def _encode_and_grads(visual, images, deep, per_sample, backend):
    deep = deep.clone().requires_grad_(True)
    per_sample = per_sample.clone().requires_grad_(True)

    def extra(layer, tokens):  # per-sample prompts in the last layer only, reading its tokens
        return per_sample + tokens[:, :1] if layer == len(visual.transformer.resblocks) - 1 else None

    feats = vision.encode(visual, images, deep=deep, extra=extra, backend=backend)  # (B, D)
    grads = torch.autograd.grad(feats.square().sum(), [deep, per_sample])
    return feats.detach(), grads


def test_last_layer_with_per_sample_prompts_only(tiny_clip, images):
    visual = tiny_clip.visual
    torch.manual_seed(0)
    deep = torch.randn(2, 4, 64) * 0.1  # (L_d = L - 1, P, d)
    per_sample = torch.randn(4, 3, 64) * 0.1  # (B, Kn, d)
    want, want_grads = _encode_and_grads(visual, images, deep, per_sample, "reference")
    got, got_grads = _encode_and_grads(visual, images, deep, per_sample, "fast")
    assert relative_error(got, want) < 1e-4
    for g, w in zip(got_grads, want_grads):
        assert w.abs().sum() > 0 and relative_error(g, w) < 1e-4
    full = vision.encode(visual, images, deep=torch.cat([deep, torch.zeros(1, 4, 64)]), backend="reference")
    assert relative_error(full, want) > 1e-3  # zero prompts in the last layer are not "no prompts"


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_no_deep_layers_is_the_plain_tower(backend, tiny_clip, images):
    with torch.no_grad():
        got = vision.encode(tiny_clip.visual, images, deep=torch.zeros(0, 4, 64), backend=backend)
        assert relative_error(got, tiny_clip.visual(images)) < 1e-5
    with pytest.raises(ValueError, match="deep prompts have 4 layers, the tower has 3"):
        vision.encode(tiny_clip.visual, images, deep=torch.zeros(4, 4, 64), backend=backend)
