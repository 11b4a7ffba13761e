"""E2MIM: class-wise mixup pairs and targets, the MI term, inference modes."""

import math

import pytest
import torch

import fastprompt
from fastprompt.methods.e2mim import classwise_pairs

from _util import CLASSNAMES, assert_within_reference_noise, oracle_outcome, step_outcome


def test_pairs_carry_different_labels():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        labels = torch.randint(0, 5, (16,), generator=g)
        a, b, keep = classwise_pairs(labels, generator=g)
        assert a.shape == b.shape == keep.shape == (16,)  # static: one pair per sample
        assert torch.equal(keep, labels[a] != labels[b])
        assert sorted(a.tolist()) == list(range(16)) and sorted(b.tolist()) == list(range(16))
        if int(torch.bincount(labels).max()) <= 8:  # no class holds more than half: every pair is kept
            assert keep.all()


def test_one_class_batch_has_no_pairs_and_dominated_batch_keeps_only_valid():
    a, b, keep = classwise_pairs(torch.zeros(6, dtype=torch.long))
    assert not keep.any()
    labels = torch.tensor([0, 0, 0, 0, 0, 1])
    a, b, keep = classwise_pairs(labels)
    assert int(keep.sum()) == 2 and torch.equal(keep, labels[a] != labels[b])  # the lone 1 as a and as b


def test_pairs_not_kept_add_nothing(tiny_clip, images):
    """A batch dominated by one class: the loss equals the one computed on the kept pairs alone
    (the dynamic-shape form this replaces)."""
    torch.manual_seed(0)
    model = fastprompt.create_model("e2mim", classnames=CLASSNAMES, clip=tiny_clip, backend="reference")
    labels = torch.tensor([0, 0, 0, 1])
    x = torch.nn.functional.normalize(model.clip.visual(images), dim=-1).detach().requires_grad_()  # (4, D)
    torch.manual_seed(3)
    feats, targets, valid = model.mix(x, labels)
    assert feats.shape == (8, x.shape[1]) and int(valid.sum()) == 6  # 4 originals + 2 kept pairs
    torch.testing.assert_close(targets[~valid], torch.zeros(2, 5))
    w, tau = model.text_features(), model.logit_scale()
    kept_feats, kept_targets = feats[valid], targets[valid]  # (6, D), (6, K)
    xn = torch.nn.functional.normalize(kept_feats, dim=-1)  # (6, D)
    want = torch.nn.functional.cross_entropy(tau * xn @ w.T, kept_targets)
    want = want + model.e2mim.nce((tau * xn @ w.T).softmax(-1), (tau * xn @ model.template_features.T).softmax(-1),
                                  "reference")
    torch.manual_seed(3)
    got = model.loss_and_logits(None, labels, features=x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert torch.count_nonzero(x.grad) > 0


def test_mixed_targets_sum_to_one_and_mix_the_pair(tiny_clip):
    model = fastprompt.create_model("e2mim", classnames=CLASSNAMES, clip=tiny_clip)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    x = torch.randn(6, 64)
    torch.manual_seed(0)
    feats, targets, valid = model.mix(x, labels)
    assert feats.shape == (12, 64) and targets.shape == (12, 5) and valid.all()
    torch.testing.assert_close(targets.sum(-1), torch.ones(12))
    mixed = targets[6:]
    assert ((mixed > 0).sum(-1) == 2).all()  # two different classes in every mixed target
    no_mix = fastprompt.create_model("e2mim", classnames=CLASSNAMES, clip=tiny_clip, mixup=False)
    assert no_mix.mix(x, labels)[0].shape == (6, 64) and no_mix.mix(x, labels)[2] is None


def test_mi_term_and_its_switch(tiny_clip, images, labels):
    torch.manual_seed(0)
    model = fastprompt.create_model("e2mim", classnames=CLASSNAMES, clip=tiny_clip, mixup=False)
    model.loss(images, labels).backward()
    for p in (model.e2mim.soft_head[0].weight, model.e2mim.hand_head[0].weight, model.e2mim.logit_scale):
        assert torch.count_nonzero(p.grad) > 0  # the InfoNCE critic trains
    off = fastprompt.create_model("e2mim", classnames=CLASSNAMES, clip=tiny_clip, mixup=False, mi_weight=0)
    off.load_prompt_state_dict(model.prompt_state_dict())
    coop = fastprompt.create_model("coop", classnames=CLASSNAMES, clip=tiny_clip)
    coop.load_prompt_state_dict({"text.context": model.text.context.detach()})
    torch.testing.assert_close(off.loss(images, labels), coop.loss(images, labels))
    # InfoNCE of uninformative heads sits near log M
    with torch.no_grad():
        x = model.image_features(images)
        logits = model.logit_scale() * x @ model.text_features().t()
        nce = model.e2mim.nce(logits, torch.zeros_like(logits), "reference")
    assert abs(float(nce) - math.log(4)) < 1e-4


def test_inference_modes(tiny_clip, images):
    soft = fastprompt.create_model("e2mim", classnames=CLASSNAMES, clip=tiny_clip, infer="soft")
    ens = fastprompt.create_model("e2mim", classnames=CLASSNAMES, clip=tiny_clip, infer="ensemble")
    ens.load_prompt_state_dict(soft.prompt_state_dict())
    zs = fastprompt.create_model("zeroshot", classnames=CLASSNAMES, clip=tiny_clip)
    with torch.no_grad():
        p = 0.5 * (soft(images).softmax(-1) + zs(images).softmax(-1))
        torch.testing.assert_close(ens(images).exp(), p)


def test_mi_input_is_each_views_probabilities_or_logits(tiny_clip, images, labels):
    """mi_input="probs" (default, the paper's figure 1): the critic reads softmax(τ cos(x, W)) of
    each view; "logits": τ cos(x, W) itself."""
    torch.manual_seed(0)
    model = fastprompt.create_model("e2mim", classnames=CLASSNAMES, clip=tiny_clip, mixup=False, backend="reference")
    assert model.config.mi_input == "probs"
    as_logits = fastprompt.create_model("e2mim", classnames=CLASSNAMES, clip=tiny_clip, mixup=False,
                                        backend="reference", mi_input="logits")
    as_logits.load_prompt_state_dict(model.prompt_state_dict())
    with torch.no_grad():
        x = torch.nn.functional.normalize(model.clip.visual(images), dim=-1)
        w = model.text_features()
        soft, hand = model.logit_scale() * x @ w.T, model.logit_scale() * x @ model.template_features.T
        ce = torch.nn.functional.cross_entropy(soft, labels)
        want_probs = ce + model.e2mim.nce(soft.softmax(-1), hand.softmax(-1), "reference")
        want_logits = ce + model.e2mim.nce(soft, hand, "reference")
        torch.testing.assert_close(model.loss(images, labels), want_probs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(as_logits.loss(images, labels), want_logits, rtol=1e-5, atol=1e-5)
    assert abs(float(want_probs - want_logits)) > 1e-4
    with pytest.raises(fastprompt.FastpromptError, match="mi_input='prob' must be one of probs, logits"):
        fastprompt.create_model("e2mim", classnames=CLASSNAMES, clip=tiny_clip, mi_input="prob")


@pytest.mark.parametrize("mi_input", ["probs", "logits"])
def test_fast_equals_reference_for_each_mi_input(mi_input, tiny_clip, images, labels):
    """Loss, logits and gradients of the fast backend within the float noise of the fp32
    reference, both against a float64 run of the reference (`assert_within_reference_noise`)."""
    models = {}
    for backend in ("reference", "fast"):
        torch.manual_seed(0)
        models[backend] = fastprompt.create_model("e2mim", classnames=CLASSNAMES, clip=tiny_clip, backend=backend,
                                                  mi_input=mi_input)
    reference, fast = models["reference"], models["fast"]
    oracle = oracle_outcome(reference, lambda m: m.loss_and_logits(images.double(), labels))
    want = step_outcome(reference, lambda: reference.loss_and_logits(images, labels))  # the same mixup draws (seed)
    got = step_outcome(fast, lambda: fast.loss_and_logits(images, labels))
    assert {"grad text.context", "grad e2mim.*", "grad e2mim.hand_head.2.weight"} <= set(got)
    assert_within_reference_noise({"fast": got}, want, oracle)
