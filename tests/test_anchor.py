"""The anchor-style baseline (`fastprompt.bench.anchor`) computes the method our reference does.

Same prompt tensors, same frozen CLIP: loss, logits and every prompt gradient of the anchor
within 1e-4 (relative, fp32) of `backend="reference"`, for every method.
"""

import pytest
import torch
from _util import CLASSNAMES, module_relative_errors, relative_error

import fastprompt
from fastprompt.bench.anchor import Anchor

TOPK = torch.tensor([[0, 1, 2], [1, 2, 3], [4, 3, 2], [0, 4, 1]])  # (B, K_N)


def run(step, model, images, labels, extra):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # E2MIM draws its mixing pairs and weights from the global RNG
    loss, logits = step(images, labels, **extra)
    grads = {}
    if loss.requires_grad:
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), logits.detach(), grads


@pytest.mark.parametrize("method, options", [
    *[(m, {}) for m in fastprompt.list_methods()],
    ("coop", {"csc": True}),
    ("cavpt", {"topk": 3, "aux_target": "gt-only", "text_prompt": True}),
    ("cavpt", {"variant": "released"}),
    ("cavpt", {"variant": "released", "text_prompt": True, "layers": 2, "guidance_epochs": 1}),
    ("e2mim", {"mi_input": "logits"}),
    ("vpt-shallow", {"placement": "before-ln-pre"}),
    ("vlp", {"placement": "before-ln-pre"}),
    ("cavpt", {"variant": "released", "placement": "before-ln-pre"}),
    ("coop", {"text_depth": 2, "n_ctx": 4}),
    ("vpt-deep", {"vision_depth": 2}),
    ("vlp", {"text_depth": 2, "vision_depth": 2, "placement": "before-ln-pre"}),
    ("maple", {"prompt_depth": 1}),
])
def test_anchor_equals_reference(method, options, tiny_clip, images, labels):
    torch.manual_seed(0)
    if method == "cavpt":
        options = {"topk": 3, **options}
    model = fastprompt.create_model(method, CLASSNAMES, clip=tiny_clip, pretrained=None, backend="reference",
                                    **options).train()
    extra = {"topk": TOPK} if method == "cavpt" else {}
    want = run(model.loss_and_logits, model, images, labels, extra)
    got = run(Anchor(model).loss_and_logits, model, images, labels, extra)
    assert relative_error(got[0], want[0]) <= 1e-4
    assert relative_error(got[1], want[1]) <= 1e-4
    assert got[2].keys() == want[2].keys() and (got[2] or method == "zeroshot")
    for module, error in module_relative_errors(got[2], want[2]).items():  # a bias with its weight: see the helper
        assert error <= 1e-4, module
