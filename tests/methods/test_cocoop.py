"""`cocoop` against KaiyangZhou/CoOp `trainers/cocoop.py` (the re-implementation in tests/_cocoop.py):
its defaults, its prompt layout and initialisation (ctx_init's word count as the context
length), its logits to 1e-5 of the largest one and its loss and every gradient within the
float noise of the released module's own fp32 run, on a CLIP whose output dimension differs
from its text width (the meta-net's widths), with every tensor moved from its initial value.
Fast == reference for the defaults is tests/methods/test_all_methods.py's, here for the other
layouts and the chunked text passes; learning on the demo set is tests/training/test_learning.py's."""

import copy

import open_clip
import pytest
import torch

import _cocoop
import _maple
import fastprompt
from fastprompt.methods import cocoop

from _util import (CLASSNAMES, NoDowncast, assert_fast_equals_reference, assert_within_reference_noise, relative_error,
                   step_outcome)

# (ctx_init, n_ctx): the released config; a phrase with a word of two BPE tokens ("itap" -> "it",
# "ap": 3 words, 4 tokens, so the phrase's last "a" stays in the prompt); random context.
LAYOUTS = [("a photo of a", None), ("itap of a", None), (None, 2)]
LAYOUT_IDS = ["ctxv1", "multi-token-word", "random"]


@pytest.fixture(scope="module")
def clip():
    """A tiny CLIP whose output dimension D = 80 differs from its text width 96 and vision width 64
    (the meta-net is Linear(80, 5) -> ReLU -> Linear(5, 96)), random LayerNorm affines."""
    torch.manual_seed(0)
    model = open_clip.CLIP(80, vision_cfg={"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
                           text_cfg={"context_length": 77, "vocab_size": 49408, "width": 96, "heads": 2, "layers": 2})
    return _maple.with_random_layernorms(model.eval())


def _model(clip, backend="fast", **options):
    torch.manual_seed(0)
    return fastprompt.create_model("cocoop", CLASSNAMES, clip=clip, pretrained=None, backend=backend, **options)


def _learner(model, ctx_init, n_ctx):
    """The released PromptLearner holding `model`'s context and meta-net."""
    learner = _cocoop.PromptLearner(model.clip, model.bundle.tokenizer, CLASSNAMES, n_ctx or cocoop.N_CTX, ctx_init)
    with torch.no_grad():
        learner.ctx.copy_(model.text.context)
    learner.meta_net.load_state_dict(model.meta.state_dict())
    return learner


def _released_outcome(clip, learner, images, labels):
    """Loss, logits and gradients of the released module, named as `step_outcome` names ours."""
    learner.zero_grad(set_to_none=True)
    loss = _cocoop.custom_clip(clip, learner, images, labels)
    loss.backward()
    with torch.no_grad():
        logits = _cocoop.custom_clip(clip, learner, images)
    grads = {"text.context": learner.ctx.grad, **{f"meta.{n}": p.grad for n, p in learner.meta_net.named_parameters()}}
    out = {"loss": loss.detach(), "logits": logits, **{f"grad {n}": g.flatten() for n, g in grads.items()}}
    out["grad meta.*"] = torch.cat([g.flatten() for n, g in grads.items() if n.startswith("meta.")])
    return out


def test_defaults_are_the_released_config(clip):
    """vit_b16_c4_ep10_batch1_ctxv1.yaml: "a photo of a" (4 words: 4 tokens), lr 0.002 with 1 warm-up
    epoch for the context and the meta-net; the meta-net's widths from the output dimension."""
    model = _model(clip)
    assert model.resolved_options() == {"n_ctx": 4, "csc": False, "ctx_init": "a photo of a"}
    shapes = {name: tuple(t.shape) for name, t in model.prompt_state_dict().items()}
    assert shapes == {"text.context": (4, 96), "meta.linear1.weight": (5, 80), "meta.linear1.bias": (5,),
                      "meta.linear2.weight": (96, 5), "meta.linear2.bias": (96,)}
    assert [(g.name, g.lr, g.warmup_epochs) for g in type(model).groups] == [("text", 0.002, 1), ("meta", 0.002, 1)]
    assert model.frozen_image_tower and model.visual is None
    assert _model(clip, ctx_init=None).text.n_ctx == 4  # N_CTX without a phrase


@pytest.mark.parametrize("ctx_init, n_ctx", LAYOUTS, ids=LAYOUT_IDS)
def test_prompt_layout_and_initialisation_are_the_released_ones(ctx_init, n_ctx, clip):
    model = _model(clip, ctx_init=ctx_init, n_ctx=n_ctx)
    learner = _cocoop.PromptLearner(clip, model.bundle.tokenizer, CLASSNAMES, n_ctx or cocoop.N_CTX, ctx_init)
    m = learner.n_ctx
    assert model.text.n_ctx == m
    tokens, released = model.text.tokens, learner.tokenized_prompts  # the ids at the M context positions are never read
    assert torch.equal(tokens[:, :1], released[:, :1]) and torch.equal(tokens[:, 1 + m :], released[:, 1 + m :])
    torch.testing.assert_close(model.text.token_suffix, learner.token_suffix, rtol=0, atol=0)
    if ctx_init:
        torch.testing.assert_close(model.text.context.detach(), learner.ctx.detach(), rtol=0, atol=0)
    assert _model(clip, ctx_init="a_photo_of_a").text.n_ctx == 4  # "_" is a space, as released


@pytest.mark.parametrize("ctx_init, n_ctx, backend", [
    *[pytest.param(*layout, "fast", id=f"{name}-fast") for layout, name in zip(LAYOUTS, LAYOUT_IDS)],
    pytest.param(*LAYOUTS[0], "reference", id="ctxv1-reference"),
])
def test_equals_the_released_module(ctx_init, n_ctx, backend, clip, images, labels):
    """Logits (eval) to 1e-5 of the largest one; loss, logits and every gradient of a training
    step at most 10x as far from a float64 run of the released module as its own fp32 run is."""
    model = _model(clip, backend, ctx_init=ctx_init, n_ctx=n_ctx)
    meta, text = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)  # the meta-net's draws whatever M is
    with torch.no_grad():  # away from the initial values: every tensor counts
        for name, p in model.prompt_state_dict().items():
            p.add_(0.3 * torch.randn(p.shape, generator=meta if name.startswith("meta.") else text))
        hidden = model.meta.linear1(model.image_features(images)) > 0  # (B, 5)
    assert hidden.any() and not hidden.all()  # π reads x through live units, and the ReLU cuts others
    learner = _learner(model, ctx_init, n_ctx)
    with torch.no_grad():
        want = _cocoop.custom_clip(clip, learner, images)
        assert relative_error(model.eval()(images), want) <= 1e-5

    released = _released_outcome(clip, learner, images, labels)
    clip64, learner64 = copy.deepcopy(clip).double(), copy.deepcopy(learner).double()
    with NoDowncast():
        oracle = _released_outcome(clip64, learner64, images.double(), labels)

    def step():
        loss = model.loss(images, labels)
        with torch.no_grad():
            return loss, model(images)

    got = step_outcome(model.train(), step)
    assert_within_reference_noise({backend: got}, released, oracle)


@pytest.mark.parametrize("ctx_init, n_ctx, prompts_per_pass", [
    pytest.param(*LAYOUTS[1], cocoop.PROMPTS_PER_PASS, id="multi-token-word"),
    pytest.param(*LAYOUTS[2], 10, id="random-two-images-a-pass"),  # 10 prompts: two images of 5 classes a pass
])
def test_fast_equals_reference(ctx_init, n_ctx, prompts_per_pass, clip, images, labels, monkeypatch):
    monkeypatch.setattr(cocoop, "PROMPTS_PER_PASS", prompts_per_pass)
    reference = assert_fast_equals_reference(lambda backend: _model(clip, backend, ctx_init=ctx_init, n_ctx=n_ctx),
                                             images, labels)
    assert all(p.grad.abs().sum() > 0 for p in reference.parameters() if p.requires_grad)


def test_class_features_depend_on_the_image(clip, images):
    """Each image scores its own prompts: the class features of two images differ."""
    model = _model(clip).eval()
    with torch.no_grad():
        w = model.class_features(model.image_features(images))  # (B, K, D)
    assert w.shape == (4, len(CLASSNAMES), 80) and relative_error(w[0], w[1]) > 1e-3
    with pytest.raises(fastprompt.FastpromptError, match="cocoop's class features depend on the image"):
        model.text_features()


def test_options_are_validated(clip):
    with pytest.raises(fastprompt.FastpromptError, match="n_ctx=8 contradicts ctx_init='a photo of a' \\(4 words\\)"):
        _model(clip, n_ctx=8)
    with pytest.raises(fastprompt.FastpromptError, match="csc=True: CoCoOp's context is shared by every class"):
        _model(clip, csc=True)
    with pytest.raises(fastprompt.FastpromptError, match="separate its words by single spaces"):
        _model(clip, ctx_init="a  photo")
    with pytest.raises(fastprompt.FastpromptError, match="n_ctx=0 must be an integer in 1..60"):
        _model(clip, ctx_init=None, n_ctx=0)
    assert _model(clip, n_ctx=4).text.n_ctx == 4  # the phrase's own word count is accepted
