"""`kgcoop` against htyao89/KgCoOp `KgCoOp/trainers/kgcoop.py` (the re-implementation in
tests/_kgcoop.py): its defaults, its prompt layout and initialisation ("a photo of a" whatever
ctx_init says; random context, class-specific with csc), and its training loss and context
gradient within 1e-5 relative of the released module's fp32 run and within the float noise of
a float64 run of it, with the context moved from its initial value (cos(t_k, t_k^clip) < 1) and a
template that is not the prompt's layout. Fast == reference for the defaults is
tests/methods/test_all_methods.py's, here for class-specific context; learning on the demo set
is tests/training/test_learning.py's."""

import copy

import open_clip
import pytest
import torch

import _kgcoop
import _maple
import fastprompt
from fastprompt.losses import knowledge_gap
from fastprompt.methods.specs import KGCOOP_N_CTX

from _util import (CLASSNAMES, NoDowncast, assert_fast_equals_reference, assert_within_reference_noise, relative_error,
                   step_outcome)

TEMPLATE = "a photo of a {}, a type of shape."  # the dataset's template (KgCoOp's CUSTOM_TEMPLATES style)
# (ctx_init, n_ctx, csc): the released config; random shared context; random class-specific context
LAYOUTS = [("a photo of a", None, False), (None, 2, False), (None, None, True)]
LAYOUT_IDS = ["ctxv1", "random", "random-csc"]


@pytest.fixture(scope="module")
def clip():
    """A tiny CLIP whose output dimension D = 80 differs from its text width 96, random LayerNorm affines."""
    torch.manual_seed(0)
    model = open_clip.CLIP(80, vision_cfg={"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
                           text_cfg={"context_length": 77, "vocab_size": 49408, "width": 96, "heads": 2, "layers": 2})
    return _maple.with_random_layernorms(model.eval())


TOKENIZER = open_clip.get_tokenizer("ViT-B-32")  # CLIP's BPE, the tokenizer of every open_clip CLIP


def _model(clip, backend="fast", **options):
    torch.manual_seed(0)
    return fastprompt.create_model("kgcoop", CLASSNAMES, clip=clip, pretrained=None, backend=backend, template=TEMPLATE,
                                   **options)


def _learner(model, ctx_init, n_ctx, csc):
    """The released PromptLearner holding `model`'s context."""
    learner = _kgcoop.PromptLearner(model.clip, model.bundle.tokenizer, CLASSNAMES, TEMPLATE, n_ctx or KGCOOP_N_CTX,
                                    ctx_init, csc)
    with torch.no_grad():
        learner.ctx.copy_(model.text.context)
    return learner


def _released_outcome(clip, learner, images, labels, weight):
    """Loss, logits and the context gradient of the released step, named as `step_outcome` names ours."""
    learner.zero_grad(set_to_none=True)
    ori = _kgcoop.text_features_old(clip, TOKENIZER, learner)
    loss, logits = _kgcoop.forward_backward_loss(clip, learner, ori, images, labels, weight)
    loss.backward()
    return {"loss": loss.detach(), "logits": logits.detach(), "grad text.context": learner.ctx.grad.flatten()}


def test_defaults_are_the_released_config(clip):
    """vit_b16_ep100_ctxv1.yaml + base2new_train.sh: CTX_INIT True ("a photo of a": 4 tokens),
    NCTX 4, W 8.0 (the README's `base2new_train.sh DATASET 8.0`), lr 0.002 with 1 warm-up epoch."""
    model = _model(clip)
    assert model.resolved_options() == {"n_ctx": 4, "csc": False, "ctx_init": "a photo of a", "weight": 8.0}
    assert {n: tuple(t.shape) for n, t in model.prompt_state_dict().items()} == {"text.context": (4, 96)}
    assert [(g.name, g.lr, g.warmup_epochs) for g in type(model).groups] == [("text", 0.002, 1)]
    assert model.frozen_image_tower and model.visual is None
    assert _model(clip, ctx_init=None).text.n_ctx == 4  # the script's NCTX without a phrase
    assert _model(clip, ctx_init="a_photo_of_a").text.n_ctx == 4  # "_" is a space, as released


@pytest.mark.parametrize("ctx_init, n_ctx, csc", LAYOUTS, ids=LAYOUT_IDS)
def test_prompt_layout_and_initialisation_are_the_released_ones(ctx_init, n_ctx, csc, clip):
    model = _model(clip, ctx_init=ctx_init, n_ctx=n_ctx, csc=csc)
    learner = _kgcoop.PromptLearner(clip, model.bundle.tokenizer, CLASSNAMES, TEMPLATE, n_ctx or KGCOOP_N_CTX, ctx_init, csc)
    m = learner.n_ctx
    assert model.text.n_ctx == m and model.text.context.shape == learner.ctx.shape
    tokens, released = model.text.tokens, learner.tokenized_prompts  # the ids at the M context positions are never read
    assert torch.equal(tokens[:, :1], released[:, :1]) and torch.equal(tokens[:, 1 + m :], released[:, 1 + m :])
    torch.testing.assert_close(model.text.token_suffix, learner.token_suffix, rtol=0, atol=0)
    if ctx_init:
        torch.testing.assert_close(model.text.context.detach(), learner.ctx.detach(), rtol=0, atol=0)


def test_the_frozen_features_are_the_dataset_template(clip):
    """t^clip: the template's features (not the prompt's "a photo of a {}." layout), normalised."""
    model = _model(clip)
    learner = _learner(model, "a photo of a", None, False)
    want = _kgcoop.text_features_old(clip, model.bundle.tokenizer, learner)
    assert relative_error(model.template_features, want) <= 1e-5
    plain = fastprompt.create_model("kgcoop", CLASSNAMES, clip=clip, pretrained=None, template="a photo of a {}.")
    assert relative_error(plain.template_features, want) > 1e-2


@pytest.mark.parametrize("ctx_init, n_ctx, csc, backend", [
    *[pytest.param(*layout, "fast", id=f"{name}-fast") for layout, name in zip(LAYOUTS, LAYOUT_IDS)],
    pytest.param(*LAYOUTS[0], "reference", id="ctxv1-reference"),
])
def test_equals_the_released_trainer(ctx_init, n_ctx, csc, backend, clip, images, labels):
    """Loss and context gradient of one step within 1e-5 relative of the released fp32 step, and
    loss, logits and gradient at most 10x as far from its float64 run as its own fp32 run is."""
    weight = 8.0
    model = _model(clip, backend, ctx_init=ctx_init, n_ctx=n_ctx, csc=csc)
    with torch.no_grad():  # away from the initial values: the knowledge term has a gradient
        model.text.context.add_(0.3 * torch.randn(model.text.context.shape, generator=torch.Generator().manual_seed(2)))
    learner = _learner(model, ctx_init, n_ctx, csc)
    released = _released_outcome(clip, learner, images, labels, weight)
    gap = knowledge_gap(model.text_features().detach(), model.template_features, "reference")
    assert 1e-3 < float(gap) < 1  # the term is live, and it is 1 - a mean cosine

    got = step_outcome(model.train(), lambda: model.loss_and_logits(images, labels))
    for key in ("loss", "grad text.context"):
        assert relative_error(got[key], released[key]) <= 1e-5, key
    clip64, learner64 = copy.deepcopy(clip).double(), copy.deepcopy(learner).double()
    with NoDowncast():
        oracle = _released_outcome(clip64, learner64, images.double(), labels, weight)
    assert_within_reference_noise({backend: got}, released, oracle)


def test_weight_scales_the_knowledge_term(clip, images, labels):
    """weight 0 is CoOp's loss with the same context; the loss grows by weight x the gap."""
    losses = {}
    for weight in (0.0, 8.0):
        model = _model(clip, weight=weight)
        with torch.no_grad():
            model.text.context.add_(0.3)
            losses[weight] = model.loss(images, labels)
    coop = fastprompt.create_model("coop", CLASSNAMES, clip=clip, pretrained=None, template=TEMPLATE, ctx_init="a photo of a")
    with torch.no_grad():
        coop.text.context.copy_(model.text.context)
        gap = knowledge_gap(model.text_features(), model.template_features, "fast")
        assert relative_error(losses[0.0], coop.loss(images, labels)) <= 1e-6
    assert relative_error(losses[8.0], losses[0.0] + 8.0 * gap) <= 1e-6 and float(gap) > 1e-3


def test_fast_equals_reference_class_specific(clip, images, labels):
    def build(backend):
        model = _model(clip, backend, ctx_init=None, csc=True)
        with torch.no_grad():
            model.text.context.add_(0.3 * torch.randn(model.text.context.shape, generator=torch.Generator().manual_seed(3)))
        return model

    reference = assert_fast_equals_reference(build, images, labels)
    assert reference.text.context.grad.abs().sum() > 0


def test_options_are_validated(clip):
    with pytest.raises(fastprompt.FastpromptError, match="ctx_init='itap of a': KgCoOp's released code initialises its "
                                                         "context from 'a photo of a'"):
        _model(clip, ctx_init="itap of a")
    with pytest.raises(fastprompt.FastpromptError, match="n_ctx=8 contradicts ctx_init='a photo of a' \\(4 tokens\\)"):
        _model(clip, n_ctx=8)
    with pytest.raises(fastprompt.FastpromptError, match="csc=True with ctx_init: KgCoOp's phrase initialises one context"):
        _model(clip, csc=True)
    with pytest.raises(fastprompt.FastpromptError, match="weight=-1 must be a number >= 0"):
        _model(clip, weight=-1)
    assert _model(clip, n_ctx=4).text.n_ctx == 4
