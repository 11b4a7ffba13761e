"""Zero-shot and CoOp against CLIP's own computation."""

import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.models.clip import load_clip
from fastprompt.models.text import tokenize

from _util import CLASSNAMES


def _clip_text(clip, texts):
    bundle = load_clip(clip)
    return F.normalize(clip.encode_text(tokenize(clip, bundle.tokenizer, texts)), dim=-1)


def test_zeroshot_logits_equal_clip(tiny_clip, images):
    for backend in ("reference", "fast"):
        model = fastprompt.create_model("zeroshot", classnames=CLASSNAMES, clip=tiny_clip, pretrained=None,
                                        template="a photo of a {}.", backend=backend)
        x = F.normalize(tiny_clip.encode_image(images), dim=-1)
        w = _clip_text(tiny_clip, [f"a photo of a {c}." for c in CLASSNAMES])
        want = tiny_clip.logit_scale.exp() * x @ w.t()
        torch.testing.assert_close(model(images), want, rtol=1e-5, atol=1e-4)


def test_zeroshot_template_ensemble_is_mean_of_normalised_features(tiny_clip, images):
    templates = ["a photo of a {}.", "a drawing of the {}.", "{}"]
    model = fastprompt.create_model("zeroshot", classnames=CLASSNAMES, clip=tiny_clip, template=templates)
    feats = torch.stack([_clip_text(tiny_clip, [t.format(c) for c in CLASSNAMES]) for t in templates]).mean(0)
    torch.testing.assert_close(model.text_features(), F.normalize(feats, dim=-1), rtol=1e-5, atol=1e-5)


def test_coop_context_set_to_a_photo_of_a_equals_clip_template(tiny_clip):
    bundle = load_clip(tiny_clip)
    phrase = tokenize(tiny_clip, bundle.tokenizer, ["a photo of a"])
    embedding = tiny_clip.token_embedding(phrase)[0, 1:5]  # (4, width): "a", "photo", "of", "a"
    want = _clip_text(tiny_clip, [f"a photo of a {c}." for c in CLASSNAMES])
    for backend in ("reference", "fast"):
        model = fastprompt.create_model("coop", classnames=CLASSNAMES, clip=tiny_clip, backend=backend, n_ctx=4)
        model.load_prompt_state_dict({"text.context": embedding})
        torch.testing.assert_close(model.text_features(), want, rtol=1e-5, atol=1e-5)
    # the init-phrase path computes the same thing, for shared and class-specific context
    for csc in (False, True):
        model = fastprompt.create_model("coop", classnames=CLASSNAMES, clip=tiny_clip, ctx_init="a photo of a", csc=csc)
        assert model.prompt_state_dict()["text.context"].shape == ((5, 4, 64) if csc else (4, 64))
        torch.testing.assert_close(model.text_features(), want, rtol=1e-5, atol=1e-5)


def test_coop_random_init_statistics_and_shapes(tiny_clip):
    torch.manual_seed(0)
    model = fastprompt.create_model("coop", classnames=CLASSNAMES, clip=tiny_clip)
    ctx = model.prompt_state_dict()["text.context"]
    assert ctx.shape == (16, 64)
    assert abs(float(ctx.std()) - 0.02) < 0.003 and abs(float(ctx.mean())) < 0.003


def test_eval_text_features_are_computed_once(tiny_clip, images):
    model = fastprompt.create_model("coop", classnames=CLASSNAMES, clip=tiny_clip).eval()
    calls = []
    model.text.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        first = model(images)
        second = model(images)
    assert len(calls) == 1 and torch.equal(first, second)
    model.train()
    model.loss(images, torch.tensor([0, 1, 2, 0]))
    assert len(calls) == 2


def test_coop_class_positions_equal_clip_on_the_texts_they_spell(tiny_clip):
    """CoOp's CLASS_TOKEN_POSITION (KaiyangZhou/CoOp trainers/coop.py `PromptLearner.forward`):
    with the context set to "a photo of a", "middle" spells "a photo {class} of a." (the class
    after `n_ctx // 2` context tokens) and "front" "{class} a photo of a."; CLIP's own encoding of
    those texts, fast and reference, shared and class-specific context, gradients equal (issue 25 §5)."""
    bundle = load_clip(tiny_clip)
    phrase = tokenize(tiny_clip, bundle.tokenizer, ["a photo of a"])
    embedding = tiny_clip.token_embedding(phrase)[0, 1:5].detach()  # (4, width)
    names = [*CLASSNAMES, "a rather long and winding class name"]
    texts = {"middle": [f"a photo {c} of a." for c in names], "front": [f"{c} a photo of a." for c in names]}
    for position, spelled in texts.items():
        want = _clip_text(tiny_clip, spelled)
        grads = []
        for backend in ("reference", "fast"):
            for csc in (False, True):
                model = fastprompt.create_model("coop", classnames=names, clip=tiny_clip, backend=backend, n_ctx=4,
                                                csc=csc, class_position=position)
                model.load_prompt_state_dict({"text.context": embedding.expand(len(names), -1, -1) if csc else embedding})
                got = model.text_features()
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                if not csc:
                    (got * torch.linspace(-1, 1, got.numel()).view_as(got)).sum().backward()
                    grads.append(model.text.context.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-4 * float(grads[0].abs().max()))  # fp32 reordering
    end = fastprompt.create_model("coop", classnames=names, clip=tiny_clip, n_ctx=4, class_position="end")
    end.load_prompt_state_dict({"text.context": embedding})
    torch.testing.assert_close(end.text_features(), _clip_text(tiny_clip, [f"a photo of a {c}." for c in names]),
                               rtol=1e-5, atol=1e-5)
