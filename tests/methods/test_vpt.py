"""VPT against a naive per-layer implementation written here, from the equations."""

import math

import torch
import torch.nn.functional as F

import fastprompt

from _util import CLASSNAMES


def naive_block(block, x):
    """One CLIP residual block written out: pre-LN multi-head attention and MLP."""
    attn = block.attn
    b, n, d = x.shape
    h = attn.num_heads
    y = F.layer_norm(x, (d,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    q, k, v = (y @ attn.in_proj_weight.t() + attn.in_proj_bias).split(d, dim=-1)
    q, k, v = (t.reshape(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1) @ v
    a = a.transpose(1, 2).reshape(b, n, d) @ attn.out_proj.weight.t() + attn.out_proj.bias
    x = x + a
    y = F.layer_norm(x, (d,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
    y = block.mlp.c_proj(F.gelu(block.mlp.c_fc(y)))
    return x + y


def naive_tokens(visual, images):
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + visual.positional_embedding
    return visual.ln_pre(x)


def naive_vpt(visual, images, prompts, deep):
    """[cls, P_l, patches] per layer; deep: slots overwritten before every layer (eq. 6)."""
    x = naive_tokens(visual, images)
    b, p = x.shape[0], prompts.shape[1]
    x = torch.cat([x[:, :1], prompts[0].expand(b, -1, -1), x[:, 1:]], 1)
    for layer, block in enumerate(visual.transformer.resblocks):
        if deep:
            x = torch.cat([x[:, :1], prompts[layer].expand(b, -1, -1), x[:, 1 + p:]], 1)
        x = naive_block(block, x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def _logits(model, feats):
    return model.logit_scale() * F.normalize(feats, dim=-1) @ model.text_features().t()


def test_vpt_deep_equals_naive(tiny_clip, images):
    for backend in ("reference", "fast"):
        torch.manual_seed(0)
        model = fastprompt.create_model("vpt-deep", classnames=CLASSNAMES, clip=tiny_clip, backend=backend, n_prompts=3)
        prompts = model.visual.prompts
        assert prompts.shape == (3, 3, 64)
        want = _logits(model, naive_vpt(tiny_clip.visual, images, prompts, deep=True))
        torch.testing.assert_close(model(images), want, rtol=1e-4, atol=1e-4)


def test_vpt_shallow_equals_naive(tiny_clip, images):
    for backend in ("reference", "fast"):
        model = fastprompt.create_model("vpt-shallow", classnames=CLASSNAMES, clip=tiny_clip, backend=backend, n_prompts=2)
        prompts = model.visual.prompts
        assert prompts.shape == (1, 2, 64)
        want = _logits(model, naive_vpt(tiny_clip.visual, images, prompts, deep=False))
        torch.testing.assert_close(model(images), want, rtol=1e-4, atol=1e-4)


def test_prompts_change_the_output(tiny_clip, images):
    model = fastprompt.create_model("vpt-deep", classnames=CLASSNAMES, clip=tiny_clip)
    before = model(images)
    with torch.no_grad():
        model.visual.prompts.normal_(0, 1.0)
    assert not torch.allclose(before, model(images))
