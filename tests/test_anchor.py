"""The anchor-style baseline (`fastprompt.bench.anchor`) computes the method our reference does.

Same prompt tensors, same frozen CLIP: loss, logits and every prompt gradient of the anchor
(fp32) within the float noise of `backend="reference"` (fp32), both measured against a float64
run of the reference (`assert_within_reference_noise`), for every method.
"""

import pytest
import torch
from _util import CLASSNAMES, assert_within_reference_noise, oracle_outcome, step_outcome

import fastprompt
from fastprompt.bench.anchor import Anchor

TOPK = torch.tensor([[0, 1, 2], [1, 2, 3], [4, 3, 2], [0, 4, 1]])  # (B, K_N)


@pytest.mark.parametrize("method, options", [
    *[(m, {}) for m in fastprompt.list_methods()],
    ("coop", {"csc": True}),
    ("kgcoop", {"ctx_init": None, "csc": True}),  # random class-specific context: cos(t_k, t_k^clip) far from 1
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
    ("ivlp", {"n_ctx": 4, "n_prompts": 4, "vision_depth": 2}),  # PromptSRC's IVLP layout: 4 + 4, the slots carried above
    ("maple", {"n_ctx": 3, "placement": "after-ln-pre"}),
    ("promptsrc", {"vision_depth": 2, "text_weight": 3.0, "image_weight": 0.5}),  # the slots carried above depth 2
])
def test_anchor_equals_reference(method, options, tiny_clip, images, labels):
    torch.manual_seed(0)
    if method == "cavpt":
        options = {"topk": 3, **options}
    model = fastprompt.create_model(method, CLASSNAMES, clip=tiny_clip, pretrained=None, backend="reference",
                                    **options).train()
    extra = {"topk": TOPK} if method == "cavpt" else {}
    oracle = oracle_outcome(model, lambda m: m.loss_and_logits(images.double(), labels, **extra))
    want = step_outcome(model, lambda: model.loss_and_logits(images, labels, **extra))
    got = step_outcome(model, lambda: Anchor(model).loss_and_logits(images, labels, **extra))
    assert (len(got) > 2) == (method != "zeroshot")  # every method but zero-shot has gradients
    assert_within_reference_noise({"anchor": got}, want, oracle)
