"""`maple` against muzairkhattak/multimodal-prompt-learning `trainers/maple.py` on its `clip/model.py`
(the re-implementation in tests/_maple.py): defaults, the coupling functions' initialisation
(copies of one Linear for layers 2..J, layer 1's its own), the prompt layout, and the logits to
1e-5 of the largest one with every prompt and coupling tensor moved from its initial value.
Fast == reference for the defaults is tests/methods/test_all_methods.py's, here for other depths;
learning on the demo set is tests/training/test_learning.py's."""

import logging

import open_clip
import pytest
import torch

import _maple
import fastprompt

from _util import CLASSNAMES, assert_fast_equals_reference, relative_error


@pytest.fixture(scope="module")
def clip3():
    """A tiny CLIP with 3 text and 3 image layers (random LayerNorm affines): room for two
    coupled deep layers."""
    torch.manual_seed(0)
    clip = open_clip.CLIP(64, vision_cfg={"image_size": 64, "layers": 3, "width": 64, "head_width": 32, "patch_size": 16},
                          text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3})
    return _maple.with_random_layernorms(clip.eval())


def _model(clip, backend="fast", **options):
    torch.manual_seed(0)
    return fastprompt.create_model("maple", CLASSNAMES, clip=clip, pretrained=None, backend=backend, **options)


def test_defaults_are_the_released_config(tiny_clip, caplog):
    """vit_b16_c2_ep5_batch4_2ctx.yaml: 2 tokens, "a photo of a", depth 9 (here every one of the 2
    text layers, said in the log), MaPLe's placement, lr 0.0035 with 1 warm-up epoch."""
    with caplog.at_level(logging.WARNING, logger="fastprompt.methods.maple"):
        model = _model(tiny_clip)
    assert "fewer than MaPLe's 9; prompts in all 2" in caplog.text
    assert model.resolved_options() == {"n_ctx": 2, "csc": False, "ctx_init": "a photo of a", "prompt_depth": 2,
                                         "placement": "before-ln-pre"}
    assert [(g.name, g.lr, g.warmup_epochs) for g in type(model).groups] == [("text", 0.0035, 1), ("visual", 0.0035, 1)]


def test_coupling_starts_as_copies_and_the_layout_is_the_released_one(clip3):
    model = _model(clip3, prompt_depth=3)
    shapes = {name: tuple(t.shape) for name, t in model.prompt_state_dict().items()}
    assert shapes == {"text.context": (2, 64), "text.deep_context": (2, 2, 64),
                      "visual.first.weight": (64, 64), "visual.first.bias": (64,),
                      "visual.deep.0.weight": (64, 64), "visual.deep.0.bias": (64,),
                      "visual.deep.1.weight": (64, 64), "visual.deep.1.bias": (64,)}
    first, deep = model.visual.first, model.visual.deep
    assert torch.equal(deep[0].weight, deep[1].weight) and torch.equal(deep[0].bias, deep[1].bias)  # _get_clones
    assert not torch.equal(first.weight, deep[0].weight)  # `proj`: a Linear of its own
    ctx, prefix, suffix, tokenized = _maple.prompt_learner(clip3, model.bundle.tokenizer, CLASSNAMES, 2, "a photo of a")
    torch.testing.assert_close(model.text.context.detach(), ctx, rtol=0, atol=0)
    assert torch.equal(model.text.tokens, tokenized)
    torch.testing.assert_close(model.text.token_suffix, suffix, rtol=0, atol=0)


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_logits_equal_the_released_module(depth, backend, clip3, images):
    model = _model(clip3, backend, prompt_depth=depth).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # away from the initial values: the copies differ, every tensor counts
        for p in model.prompt_state_dict().values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    _, prefix, suffix, tokenized = _maple.prompt_learner(clip3, model.bundle.tokenizer, CLASSNAMES, 2, "a photo of a")
    text = model.text
    compound = [] if text.deep_context is None else list(text.deep_context.detach())
    with torch.no_grad():
        prompts, shared_ctx, compound_text, compound_vision = _maple.maple_prompts(
            text.context.detach(), prefix, suffix, model.visual.first, compound, model.visual.deep)
        text_features = _maple.text_features(clip3, prompts, tokenized, compound_text)
        image_features = _maple.image_features(clip3.visual, images, shared_ctx, compound_vision)
        want = _maple.logits(clip3, image_features, text_features)
        assert relative_error(model(images), want) <= 1e-5
        other = _model(clip3, backend, prompt_depth=depth, placement="after-ln-pre").eval()
        other.load_prompt_state_dict(model.prompt_state_dict())
        assert relative_error(other(images), want) > 1e-3  # the first visual prompts' placement counts


@pytest.mark.parametrize("depth", [1, 3])
def test_fast_equals_reference(depth, clip3, images, labels):
    reference = assert_fast_equals_reference(lambda backend: _model(clip3, backend, prompt_depth=depth), images, labels)
    assert all(p.grad.abs().sum() > 0 for p in reference.parameters() if p.requires_grad)


def test_options_are_validated(tiny_clip):
    with pytest.raises(fastprompt.FastpromptError, match="prompt_depth=3 does not fit the towers \\(2 text and 3 image layers\\); pick 1..2"):
        _model(tiny_clip, prompt_depth=3)
    with pytest.raises(fastprompt.FastpromptError, match="csc=True: MaPLe couples one context"):
        _model(tiny_clip, csc=True)
    with pytest.raises(fastprompt.FastpromptError, match="prompt_depth=0 must be a positive integer"):
        _model(tiny_clip, prompt_depth=0)
