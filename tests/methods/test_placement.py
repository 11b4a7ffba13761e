"""`placement`: where layer 1's visual prompts enter the image tower.

`before-ln-pre` makes vpt-shallow, vpt-deep and vlp compute MaPLe's VPT and IVLP (text depth 1)
as muzairkhattak/multimodal-prompt-learning `clip/model.py` writes them (the oracle in
tests/_maple.py), to 1e-5 of the largest logit; `after-ln-pre` (the default, the CAVPT authors'
code, pinned by tests/methods/test_vpt.py) does not. Fast == reference for both placements,
loss and gradients, the CAVPT variants included."""

import pytest
import torch

import _maple
import fastprompt

from _util import CLASSNAMES, assert_fast_equals_reference, relative_error

TEMPLATE = "a photo of a {}."  # MaPLe's VPT trainer: FixedEmbeddings' "a photo of a {name}."


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return _maple.with_random_layernorms(tiny_clip)


def _model(method, clip, backend="fast", **options):
    torch.manual_seed(0)
    return fastprompt.create_model(method, CLASSNAMES, clip=clip, pretrained=None, backend=backend,
                                   template=TEMPLATE, **options)


def _handcrafted(clip, tokenizer):
    """MaPLe's VPT trainer: `clip_model.encode_text` of "a photo of a {name}." (FixedEmbeddings)."""
    return clip.encode_text(tokenizer([TEMPLATE.format(name) for name in CLASSNAMES]))


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_vpt_before_ln_pre_equals_maple_vpt(method, backend, clip, images):
    model = _model(method, clip, backend, placement="before-ln-pre", n_prompts=3).eval()
    prompts = model.visual.prompts.detach()  # (L_d, P, d): VPT, then the blocks' VPT_shallow
    with torch.no_grad():
        text = _handcrafted(clip, model.bundle.tokenizer)
        want = _maple.logits(clip, _maple.image_features(clip.visual, images, prompts[0], list(prompts[1:])), text)
        assert relative_error(model(images), want) <= 1e-5
        after = _model(method, clip, backend, n_prompts=3).eval()  # the default placement, same prompts
        assert relative_error(after(images), want) > 1e-3


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_vlp_before_ln_pre_equals_maple_ivlp_with_text_depth_one(backend, clip, images):
    model = _model("vlp", clip, backend, placement="before-ln-pre", n_prompts=2, n_ctx=4).eval()
    prompts = model.visual.prompts.detach()  # (L, P, d)
    _, prefix, suffix, tokenized = _maple.prompt_learner(clip, model.bundle.tokenizer, CLASSNAMES, 4, None)
    ctx = model.text.context.detach().expand(len(CLASSNAMES), -1, -1)  # (K, 4, w): our context in their learner
    with torch.no_grad():
        text = _maple.text_features(clip, torch.cat([prefix, ctx, suffix], dim=1), tokenized, [])
        image = _maple.image_features(clip.visual, images, prompts[0], list(prompts[1:]))
        assert relative_error(model(images), _maple.logits(clip, image, text)) <= 1e-5


@pytest.mark.parametrize("method, options", [
    ("vpt-shallow", {}),
    ("vpt-deep", {}),
    ("vlp", {"n_ctx": 4}),
    ("cavpt", {"topk": 3}),
    ("cavpt", {"topk": 3, "variant": "released", "layers": 2}),
])
def test_fast_equals_reference_before_ln_pre(method, options, clip, images, labels):
    reference = assert_fast_equals_reference(
        lambda backend: _model(method, clip, backend, placement="before-ln-pre", **options), images, labels)
    assert reference.visual.prompts.grad[0].abs().sum() > 0  # layer 1's prompts learn through ln_pre


def test_placement_is_validated(clip):
    with pytest.raises(fastprompt.FastpromptError, match="placement='middle' must be one of after-ln-pre, before-ln-pre"):
        _model("vpt-deep", clip, placement="middle")
