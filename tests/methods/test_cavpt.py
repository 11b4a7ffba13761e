"""CAVPT: eq. 10 targets by hand, top-K handling, the auxiliary term and its options."""

import pytest
import torch

import fastprompt
from fastprompt.methods.cavpt import aux_targets

from _util import CLASSNAMES


def test_aux_targets_match_eq10_by_hand():
    # K = 4 classes, K_N = 2; image 0 (label 2) has top-K [2, 0]; image 1 (label 3) has [1, 0]
    topk = torch.tensor([[2, 0], [1, 0]])
    labels = torch.tensor([2, 3])
    q = 0.25
    want = torch.tensor([
        [[0, 0, 1, 0], [q, q, q, q]],  # output of class 2 is the ground truth: one-hot; class 0: uniform
        [[q, q, q, q], [q, q, q, q]],  # ground truth not among the top-K: every output uniform
    ])
    torch.testing.assert_close(aux_targets(topk, labels, 4), want)


def _model(clip, **opts):
    torch.manual_seed(0)
    return fastprompt.create_model("cavpt", classnames=CLASSNAMES, clip=clip, **opts)


def test_topk_is_zero_shot_and_capped(tiny_clip, images):
    model = _model(tiny_clip, topk=3)
    zs = fastprompt.create_model("zeroshot", classnames=CLASSNAMES, clip=tiny_clip)
    with torch.no_grad():
        want = zs(images).topk(3, dim=-1).indices
    assert torch.equal(model.zero_shot_topk(images), want)
    assert _model(tiny_clip, topk=50).k_n == len(CLASSNAMES)


def test_supplied_topk_equals_online(tiny_clip, images, labels):
    model = _model(tiny_clip)
    topk = model.zero_shot_topk(images)
    torch.testing.assert_close(model.loss(images, labels, topk=topk), model.loss(images, labels))
    with pytest.raises(fastprompt.FastpromptError, match="topk must be int64 of shape \\[4, 5\\]"):
        model.loss(images, labels, topk=topk[:, :2])


def test_alpha_zero_leaves_only_the_main_loss(tiny_clip, images, labels):
    main = fastprompt.create_model("vpt-deep", classnames=CLASSNAMES, clip=tiny_clip)
    model = _model(tiny_clip, alpha=0.0)
    model.load_prompt_state_dict({**model.prompt_state_dict(), "visual.prompts": main.visual.prompts.detach()})
    # the class-aware prompts still enter the last layer, so only the loss *form* is checked here:
    logits = model(images)
    want = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(model.loss(images, labels), want, rtol=1e-5, atol=1e-5)


def test_gt_only_and_layers(tiny_clip, images, labels):
    for aux_target in ("eq10", "gt-only"):
        model = _model(tiny_clip, aux_target=aux_target, layers=2)
        assert len(model.cavpt) == 2 and model.first_layer == 1
        loss = model.loss(images, labels)
        loss.backward()
        assert torch.count_nonzero(model.cavpt[0].classifier.grad) > 0  # the auxiliary term trains it
    with pytest.raises(fastprompt.FastpromptError, match="layers=4 exceeds the image tower's 3 layers"):
        _model(tiny_clip, layers=4)


def test_text_prompt_is_vlp_cavpt(tiny_clip):
    assert "text.context" in _model(tiny_clip, text_prompt=True, n_ctx=4).prompt_state_dict()
    with pytest.raises(fastprompt.FastpromptError, match="n_ctx needs text_prompt=True"):
        _model(tiny_clip, n_ctx=4)
