"""Prompt depths as MaPLe names them: `vision_depth` N (visual prompts in the first N image layers,
what layer N writes into them carried above: PROMPT_DEPTH_VISION) and `text_depth` J (layers
2..J overwrite the text context with their own: PROMPT_DEPTH_TEXT), against the re-implementation
of muzairkhattak/multimodal-prompt-learning `clip/model.py` in tests/_maple.py (1e-5 of the
largest logit), and fast == reference, loss and every gradient."""

import pytest
import torch

import _maple
import fastprompt
from fastprompt.models import vision

from _util import CLASSNAMES, assert_fast_equals_reference, relative_error

TEMPLATE = "a photo of a {}."  # MaPLe's VPT trainer: FixedEmbeddings' "a photo of a {name}."


def _model(method, clip, backend="fast", **options):
    torch.manual_seed(0)
    return fastprompt.create_model(method, CLASSNAMES, clip=clip, pretrained=None, backend=backend,
                                   template=TEMPLATE, **options)


def _ivlp_text(model, clip):
    """IVLP's text side on our context: VLPromptLearner's prompts, TextEncoder with deep layers."""
    text = model.text
    _, prefix, suffix, tokenized = _maple.prompt_learner(clip, model.bundle.tokenizer, CLASSNAMES, text.n_ctx, None)
    ctx = text.context.detach().expand(len(CLASSNAMES), -1, -1)  # (K, M, w)
    deeper = [] if text.deep_context is None else list(text.deep_context.detach())
    return _maple.text_features(clip, torch.cat([prefix, ctx, suffix], dim=1), tokenized, deeper)


@pytest.mark.parametrize("placement", ["after-ln-pre", "before-ln-pre"])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_vision_depth_one_is_vpt_shallow(placement, backend, tiny_clip, images):
    deep = _model("vpt-deep", tiny_clip, backend, vision_depth=1, n_prompts=3, placement=placement).eval()
    shallow = _model("vpt-shallow", tiny_clip, backend, n_prompts=3, placement=placement).eval()
    assert deep.visual.prompts.shape == shallow.visual.prompts.shape == (1, 3, 64)
    shallow.load_prompt_state_dict(deep.prompt_state_dict())
    with torch.no_grad():
        assert relative_error(deep(images), shallow(images)) <= 1e-6


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_vpt_deep_vision_depth_equals_maple_vpt(backend, tiny_clip, images):
    """Depth 2 of 3: blocks 1 and 2 have their own prompts, block 3 reads what block 2 wrote into them."""
    model = _model("vpt-deep", tiny_clip, backend, vision_depth=2, n_prompts=3, placement="before-ln-pre").eval()
    prompts = model.visual.prompts.detach()  # (2, 3, 64)
    assert model.resolved_options()["vision_depth"] == 2
    with torch.no_grad():
        text = tiny_clip.encode_text(model.bundle.tokenizer([TEMPLATE.format(c) for c in CLASSNAMES]))
        image = _maple.image_features(tiny_clip.visual, images, prompts[0], [prompts[1]])
        assert relative_error(model(images), _maple.logits(tiny_clip, image, text)) <= 1e-5
        # the CAVPT authors' partial depth drops the prompts above it instead: another function
        dropped = vision.encode(tiny_clip.visual, images, deep=prompts, placement="before-ln-pre", backend=backend)
        assert relative_error(dropped, image) > 1e-3


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_coop_text_depth_equals_ivlp_text_layers(backend, tiny_clip, images):
    model = _model("coop", tiny_clip, backend, text_depth=2, n_ctx=3).eval()
    assert tuple(model.text.deep_context.shape) == (1, 3, 64)
    with torch.no_grad():
        want = _maple.logits(tiny_clip, tiny_clip.visual(images), _ivlp_text(model, tiny_clip))
        assert relative_error(model(images), want) <= 1e-5
        shallow = _model("coop", tiny_clip, backend, n_ctx=3).eval()  # text depth 1: CoOp, same context
        assert relative_error(shallow(images), want) > 1e-3


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_vlp_depths_equal_ivlp(backend, tiny_clip, images):
    model = _model("vlp", tiny_clip, backend, text_depth=2, vision_depth=2, n_ctx=2, n_prompts=2,
                   placement="before-ln-pre").eval()
    prompts = model.visual.prompts.detach()
    with torch.no_grad():
        image = _maple.image_features(tiny_clip.visual, images, prompts[0], [prompts[1]])
        assert relative_error(model(images), _maple.logits(tiny_clip, image, _ivlp_text(model, tiny_clip))) <= 1e-5


@pytest.mark.parametrize("method, options", [
    ("coop", {"text_depth": 2, "n_ctx": 3}),
    ("coop", {"text_depth": 2, "n_ctx": 3, "csc": True}),
    ("vpt-deep", {"vision_depth": 2}),
    ("vlp", {"text_depth": 2, "vision_depth": 2, "n_ctx": 2, "placement": "before-ln-pre"}),
])
def test_fast_equals_reference_with_depths(method, options, tiny_clip, images, labels):
    reference = assert_fast_equals_reference(lambda backend: _model(method, tiny_clip, backend, **options), images, labels)
    if "text_depth" in options:
        assert reference.text.deep_context.grad.abs().sum() > 0


def test_depths_are_validated(tiny_clip):
    with pytest.raises(fastprompt.FastpromptError, match="text_depth=3 does not fit the text tower's 2 layers; pick 1..2"):
        _model("coop", tiny_clip, text_depth=3)
    with pytest.raises(fastprompt.FastpromptError, match="vision_depth=4 does not fit the image tower's 3 layers; pick 1..3"):
        _model("vpt-deep", tiny_clip, vision_depth=4)
    with pytest.raises(fastprompt.FastpromptError, match="vision_depth=0 must be a positive integer"):
        _model("vlp", tiny_clip, vision_depth=0)
    with pytest.raises(fastprompt.FastpromptError, match="unknown option vision_depth for method 'vpt-shallow'"):
        _model("vpt-shallow", tiny_clip, vision_depth=1)
