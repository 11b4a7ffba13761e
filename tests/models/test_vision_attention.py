"""`vision.class_attention`: the figures' last-layer class-token attention over patches."""

import pytest
import torch

from fastprompt.models import vision


@pytest.mark.parametrize("mode", ["plain", "shallow", "deep", "deep+extra", "shallow+before-ln-pre", "deep+before-ln-pre",
                                  "deep+carry"])
def test_class_attention_is_the_reference_function_and_sums_to_one(tiny_clip, images, mode):
    visual = tiny_clip.visual
    g = torch.Generator().manual_seed(0)
    width, layers = visual.class_embedding.shape[-1], len(visual.transformer.resblocks)
    kwargs = {}
    if mode.startswith("shallow"):
        kwargs["shallow"] = torch.randn(3, width, generator=g)
    if mode.startswith("deep"):
        kwargs["deep"] = torch.randn(layers, 2, width, generator=g)
    if mode == "deep+extra":
        extra_tokens = torch.randn(images.shape[0], 2, width, generator=g)
        kwargs["extra"] = lambda layer, tokens: extra_tokens + tokens[:, :1] if layer == layers - 1 else None
    if mode == "deep+carry":  # prompts in the first layer, carried through the others (MaPLe's depth)
        kwargs["deep"], kwargs["carry"] = kwargs["deep"][:1], True
    if mode.endswith("before-ln-pre"):
        kwargs["placement"] = "before-ln-pre"
    features, attention = vision.class_attention(visual, images, **kwargs)
    with torch.no_grad():
        expected = vision.encode(visual, images, backend="reference", **kwargs)
        fast = vision.encode(visual, images, backend="fast", **kwargs)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(features, fast, rtol=1e-4, atol=1e-5)
    patches = (visual.image_size[0] // visual.patch_size[0]) ** 2
    assert attention.shape == (images.shape[0], patches)
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(images.shape[0]))


def test_class_attention_is_the_class_token_softmax_averaged_over_heads(tiny_clip, images):
    visual = tiny_clip.visual
    _, attention = vision.class_attention(visual, images)
    with torch.no_grad():
        x = vision.embed(visual, images)  # (B, N, d)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        block = visual.transformer.resblocks[-1]
        attn = block.attn
        b, n, d = x.shape
        h = attn.num_heads
        q, k, _ = torch.nn.functional.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
        q = q.view(b, n, h, d // h).transpose(1, 2)  # (B, H, N, hd)
        k = k.view(b, n, h, d // h).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1).mean(1)  # (B, N, N)
    row = weights[:, 0, 1:]
    torch.testing.assert_close(attention, row / row.sum(-1, keepdim=True))
