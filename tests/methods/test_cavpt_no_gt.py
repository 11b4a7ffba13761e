"""CAVPT's `aux_target="gt-only"` when no image has its ground-truth class in its top-K: the
auxiliary term is exactly zero and adds exactly nothing to any gradient, on both backends
(methods/cavpt.py `aux_loss`: a masked mean whose count is clamped, no branch on the rows). One ground truth in one top-K
turns the term on, which shows these batches do reach the branch they claim to."""

import pytest
import torch

import fastprompt

from _util import CLASSNAMES

LABELS = torch.tensor([0, 1, 2, 0])
NO_GT = torch.tensor([[3, 4], [3, 4], [4, 3], [3, 4]])  # (B, K_N=2): no row holds its label
ONE_GT = torch.tensor([[0, 4], [3, 4], [4, 3], [3, 4]])  # image 0's label (0) is in its top-K


def _model(clip, backend, alpha):
    torch.manual_seed(0)  # the same prompts and heads for every alpha
    return fastprompt.create_model("cavpt", classnames=CLASSNAMES, clip=clip, backend=backend, topk=2,
                                   aux_target="gt-only", alpha=alpha).train()


def _loss_and_grads(model, images, topk):
    model.zero_grad(set_to_none=True)
    loss, _ = model.loss_and_logits(images, LABELS, topk=topk)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_aux_term_is_exactly_zero_without_ground_truth(backend, tiny_clip, images):
    model = _model(tiny_clip, backend, alpha=1.0)
    layer = model.cavpt[0]
    normed = torch.randn(4, 2, layer.classifier.shape[1], requires_grad=True)  # (B, K_N, d)
    aux = model.aux_loss(layer, normed, NO_GT, LABELS)
    assert aux.item() == 0.0
    aux.backward()
    assert torch.count_nonzero(normed.grad) == 0
    assert layer.classifier.grad is None or torch.count_nonzero(layer.classifier.grad) == 0

    aux_one = model.aux_loss(layer, normed, ONE_GT, LABELS)
    assert aux_one.item() > 0.0
    aux_one.backward()
    assert torch.count_nonzero(layer.classifier.grad) > 0


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_no_ground_truth_batch_trains_like_alpha_zero(backend, tiny_clip, images):
    loss, grads = _loss_and_grads(_model(tiny_clip, backend, alpha=1.0), images, NO_GT)
    want_loss, want_grads = _loss_and_grads(_model(tiny_clip, backend, alpha=0.0), images, NO_GT)
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        want = want_grads[name]
        if grad is None or want is None:  # the auxiliary classifiers: no gradient, or a zero one
            assert all(g is None or torch.count_nonzero(g) == 0 for g in (grad, want)), name
            assert "classifier" in name
        else:
            assert torch.equal(grad, want), name
    # with a ground truth in a top-K the auxiliary term moves the classifier
    _, grads_one = _loss_and_grads(_model(tiny_clip, backend, alpha=1.0), images, ONE_GT)
    assert torch.count_nonzero(grads_one["cavpt.0.classifier"]) > 0
