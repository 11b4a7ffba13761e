"""`ivlp` against muzairkhattak/multimodal-prompt-learning `trainers/independentVL.py` on its
`clip/model.py` (the re-implementation in tests/_maple.py): its defaults, its prompt layout
(the first n_ctx tokens of ctx_init learned, the rest of the phrase kept), its initialisation,
and its logits to 1e-5 of the largest one, with prompts moved away from their initial values.
Fast == reference for the defaults is tests/methods/test_all_methods.py's; learning on the demo
set is tests/training/test_learning.py's."""

import pytest
import torch

import _maple
import fastprompt

from _util import CLASSNAMES, assert_fast_equals_reference, relative_error


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return _maple.with_random_layernorms(tiny_clip)


def _model(clip, backend="fast", method="ivlp", **options):
    torch.manual_seed(0)
    return fastprompt.create_model(method, CLASSNAMES, clip=clip, pretrained=None, backend=backend, **options)


def test_defaults_are_the_released_config(tiny_clip):
    """vit_b16_c2_ep5_batch4_2+2ctx.yaml: 2 + 2 tokens, "a photo of a", depth 12 of 12 both sides
    (every layer: 2 text and 3 image layers here), MaPLe's placement, lr 0.0035 with 1 warm-up epoch."""
    model = _model(tiny_clip)
    assert model.resolved_options() == {"n_ctx": 2, "csc": False, "ctx_init": "a photo of a", "text_depth": 2,
                                         "n_prompts": 2, "placement": "before-ln-pre", "vision_depth": 3}
    shapes = {name: tuple(t.shape) for name, t in model.prompt_state_dict().items()}
    assert shapes == {"text.context": (2, 64), "text.deep_context": (1, 2, 64), "visual.prompts": (3, 2, 64)}
    assert [(g.name, g.lr, g.warmup_epochs) for g in type(model).groups] == [("text", 0.0035, 1), ("visual", 0.0035, 1)]


def test_prompt_layout_and_initialisation_are_the_released_ones(clip):
    """VLPromptLearner: ctx = the embeddings of "a photo", prompts "a photo of a {class}.", the
    suffix after position 1 + n_ctx: `[SOS] X X of a {class}.`"""
    model = _model(clip)
    ctx, prefix, suffix, tokenized = _maple.prompt_learner(clip, model.bundle.tokenizer, CLASSNAMES, 2, "a photo of a")
    text = model.text
    torch.testing.assert_close(text.context.detach(), ctx, rtol=0, atol=0)
    assert torch.equal(text.tokens, tokenized)
    torch.testing.assert_close(text.token_prefix, prefix, rtol=0, atol=0)
    torch.testing.assert_close(text.token_suffix, suffix, rtol=0, atol=0)
    words = model.bundle.tokenizer(["of a"])[0, 1:3]
    assert torch.equal(text.tokens[:, 3:5], words.expand(len(CLASSNAMES), -1))  # "of a" stays in every prompt


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_logits_equal_the_released_module(backend, clip, images):
    model = _model(clip, backend).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # away from the initial values, so every prompt tensor counts
        for p in model.prompt_state_dict().values():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    _, prefix, suffix, tokenized = _maple.prompt_learner(clip, model.bundle.tokenizer, CLASSNAMES, 2, "a photo of a")
    text, prompts = model.text, model.visual.prompts.detach()
    ctx = text.context.detach().expand(len(CLASSNAMES), -1, -1)  # (K, 2, w)
    with torch.no_grad():
        text_features = _maple.text_features(clip, torch.cat([prefix, ctx, suffix], dim=1), tokenized,
                                             list(text.deep_context.detach()))
        image_features = _maple.image_features(clip.visual, images, prompts[0], list(prompts[1:]))
        want = _maple.logits(clip, image_features, text_features)
        assert relative_error(model(images), want) <= 1e-5


@pytest.mark.parametrize("method, options", [
    ("ivlp", {"n_ctx": 3, "n_prompts": 4, "text_depth": 1, "vision_depth": 2}),  # PromptSRC-style non-default depths
    ("coop", {"n_ctx": 2, "ctx_init": "a photo of a", "csc": True}),
])
def test_fast_equals_reference(method, options, clip, images, labels):
    assert_fast_equals_reference(lambda backend: _model(clip, backend, method, **options), images, labels)


def test_coop_keeps_its_layout_where_the_phrase_fits(tiny_clip):
    """n_ctx equal to the phrase (or left out) is CoOp's `[SOS, u_1..u_4, CLASS, ".", EOS]`;
    a shorter n_ctx keeps the rest of the phrase; a longer one is refused."""
    full = _model(tiny_clip, method="coop", ctx_init="a photo of a")
    assert full.text.n_ctx == 4 and full.text.n_words == 0
    assert torch.equal(full.text.tokens, _model(tiny_clip, method="coop", n_ctx=4).text.tokens)  # "X X X X {class}."
    short = _model(tiny_clip, method="coop", ctx_init="a photo of a", n_ctx=3)
    assert short.text.n_ctx == 3 and short.text.n_words == 1 and tuple(short.text.context.shape) == (3, 64)
    with pytest.raises(fastprompt.FastpromptError, match="n_ctx=5 is more than the 4 tokens of ctx_init='a photo of a'"):
        _model(tiny_clip, method="coop", ctx_init="a photo of a", n_ctx=5)
