"""CAVPT `variant="released"`: one test per behaviour of fanrena/DPT trainers/DPT.py that we match,
fast == reference for the variant, and its option rules."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.methods.cavpt import ReleasedClassAwareLayer

from _util import CLASSNAMES, assert_within_reference_noise, oracle_outcome, relative_error, step_outcome

N_TOKENS = 17  # fastprompt-tiny: cls + 4x4 patches; 3 layers, width 64, D = 64


def _model(clip, backend="fast", seed=0, **opts):
    torch.manual_seed(seed)
    return fastprompt.create_model("cavpt", classnames=CLASSNAMES, clip=clip, pretrained=None, backend=backend,
                                   variant="released", **opts)


def _record_block_lengths(model):
    lengths = []
    hooks = [block.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]) and None)
             for block in model.clip.visual.transformer.resblocks]
    return lengths, hooks


@pytest.mark.parametrize("layers", [1, 2])
def test_deep_prompts_stop_below_the_class_aware_layers(tiny_clip, images, layers):
    """`Transformer_VPTD`: VPT-deep prompts in layers 1..L-layers; the CAVPT layers carry only K_N prompts."""
    model = _model(tiny_clip, backend="reference", topk=3, layers=layers)
    assert tuple(model.visual.prompts.shape) == (3 - layers, 10, 64)
    lengths, hooks = _record_block_lengths(model)
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    assert lengths[:3] == [N_TOKENS] * 3  # the frozen zero-shot pass for the top-K
    assert lengths[3:] == [N_TOKENS + 10] * (3 - layers) + [N_TOKENS + 3] * layers


def test_query_reads_the_learned_text_unnormalised_with_gradient(tiny_clip, images, labels):
    """`text_features[indices]`: CoOp's features of the top-K classes, before normalisation, with gradient."""
    model = _model(tiny_clip, topk=3, text_prompt=True, n_ctx=4)
    seen = {}
    model.cavpt[0].query.register_forward_pre_hook(lambda _m, args: seen.update(text=args[0]))
    model.cavpt[0].register_forward_hook(lambda _m, _args, out: seen.update(prompts=out[0]))
    model.loss(images, labels)
    raw = model.text(model.clip, "reference")  # (K, D), unnormalised
    topk = model.zero_shot_topk(images)
    assert relative_error(seen["text"].detach(), raw[topk].detach()) < 1e-5
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(CLASSNAMES)))
    (grad,) = torch.autograd.grad(seen["prompts"].sum(), model.text.context)
    assert grad.abs().sum() > 0  # the class-aware prompts train the text context

    hand = _model(tiny_clip, topk=3)  # no text prompt: the cached hand-crafted features
    seen.clear()
    hand.cavpt[0].query.register_forward_pre_hook(lambda _m, args: seen.update(text=args[0]))
    with torch.no_grad():
        hand(images)
    torch.testing.assert_close(seen["text"], hand.template_features[hand.zero_shot_topk(images)])


def test_module_equals_the_released_equations():
    """`CAVPT.forward` + `Attention`: a = W_o softmax(W_q t (W_k s)ᵀ/√32) s over s = [tokens ; 10 tokens];
    prompt = LN2(a + t); aux logits = W_c LN1(a); shapes and biases as released."""
    torch.manual_seed(0)
    layer = ReleasedClassAwareLayer(embed_dim=64, width=64, num_classes=5)
    assert layer.query.bias is not None and tuple(layer.query.weight.shape) == (64, 64)
    assert layer.q_proj.bias is None and tuple(layer.q_proj.weight.shape) == (32, 64)
    assert layer.k_proj.bias is None and tuple(layer.k_proj.weight.shape) == (32, 64)
    assert layer.out_proj.bias is None and tuple(layer.out_proj.weight.shape) == (64, 64)
    assert tuple(layer.extra_tokens.shape) == (10, 64) and layer.classifier.bias is None
    with torch.no_grad():  # non-trivial LayerNorm affines, so that the two norms are told apart
        for norm in (layer.norm, layer.aux_norm):
            norm.weight.normal_(1.0, 0.3), norm.bias.normal_(0.0, 0.3)
    tokens, text = torch.randn(2, 7, 64), torch.randn(2, 3, 64)
    prompts, a = layer(tokens, text)

    t = text @ layer.query.weight.T + layer.query.bias  # (2, 3, 64)
    s = torch.cat([tokens, layer.extra_tokens.expand(2, -1, -1)], dim=1)  # (2, 17, 64)
    q, k = t @ layer.q_proj.weight.T, s @ layer.k_proj.weight.T  # (2, 3, 32), (2, 17, 32)
    attn = torch.softmax(torch.einsum("bqc,bkc->bqk", q, k) / math.sqrt(32), dim=-1)  # (2, 3, 17)
    want_a = torch.einsum("bqk,bkd->bqd", attn, s) @ layer.out_proj.weight.T  # (2, 3, 64)
    torch.testing.assert_close(a, want_a, rtol=1e-5, atol=1e-5)
    ln = lambda x, n: F.layer_norm(x, (64,), n.weight, n.bias, n.eps)  # noqa: E731
    torch.testing.assert_close(prompts, ln(want_a + t, layer.norm), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.aux_logits(a), ln(want_a, layer.aux_norm) @ layer.classifier.weight.T,
                               rtol=1e-5, atol=1e-5)


def test_keys_and_values_read_detached_tokens():
    """`class_token = class_token.detach()`: nothing flows back into the tower through the module."""
    torch.manual_seed(0)
    layer = ReleasedClassAwareLayer(embed_dim=64, width=64, num_classes=5)
    tokens = torch.randn(2, 7, 64, requires_grad=True)
    text = torch.randn(2, 3, 64, requires_grad=True)
    prompts, a = layer(tokens, text)
    out = prompts.square().sum() + layer.aux_logits(a).square().sum()
    grad_tokens, grad_text, grad_k = torch.autograd.grad(out, [tokens, text, layer.k_proj.weight], allow_unused=True)
    assert grad_tokens is None  # neither through k nor through the values
    assert grad_text.abs().sum() > 0 and grad_k.abs().sum() > 0


def test_aux_loss_sees_only_ground_truth_rows(tiny_clip, images, labels):
    """`DPT.forward_backward`: plain-logit CE on the rows whose class is the label, mean over those rows."""
    model = _model(tiny_clip, topk=3, layers=2)
    no_aux = _model(tiny_clip, topk=3, layers=2, alpha=0.0)
    no_aux.load_prompt_state_dict(model.prompt_state_dict())
    topk = torch.tensor([[0, 3, 4], [2, 3, 1], [4, 0, 1], [3, 1, 2]])  # labels [0, 1, 2, 0]: gt rows (0,0), (1,2)
    attended = []
    for layer in model.cavpt:
        layer.register_forward_hook(lambda _m, _args, out: attended.append(out[1]) and None)
    aux = model.loss(images, labels, topk=topk) - no_aux.loss(images, labels, topk=topk)
    logits = torch.cat([model.cavpt[i].aux_logits(a)[[0, 1], [0, 2]] for i, a in enumerate(attended)])  # (4, K)
    want = F.cross_entropy(logits, torch.tensor([0, 1, 0, 1]))
    torch.testing.assert_close(aux, want, rtol=1e-4, atol=1e-5)

    no_gt = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [1, 2, 3]])  # no label among any top-K: no term
    torch.testing.assert_close(model.loss(images, labels, topk=no_gt), no_aux.loss(images, labels, topk=no_gt))


def test_topk_is_online_per_view(tiny_clip, images, labels):
    """`CustomCLIP_Selected_CoVPTDeep.forward`: zero-shot top-K of the very images of the step."""
    model = _model(tiny_clip, topk=3)
    assert model.config.topk_source == "online" and model.config.aux_target == "gt-only"
    assert torch.equal(model.zero_shot_topk(images),
                       (F.normalize(model.clip.visual(images), dim=-1) @ model.template_features.T).topk(3).indices)
    torch.testing.assert_close(model.loss(images, labels), model.loss(images, labels, topk=model.zero_shot_topk(images)))
    flipped = images.flip(-1)  # another augmented view: its own top-K
    torch.testing.assert_close(model.loss(flipped, labels),
                               model.loss(flipped, labels, topk=model.zero_shot_topk(flipped)))


def test_guidance_for_the_first_epochs(tiny_clip, images, labels):
    """`DPT.forward_backward`, epoch < C: CE(zero-shot image, learned text) + CE(prompted image,
    hand-crafted text) + 0.1 CE(main); from epoch C on: the main CE; the aux term throughout."""
    model = _model(tiny_clip, topk=3, text_prompt=True, n_ctx=4, guidance_epochs=2)
    assert model.guiding  # never told an epoch: epoch 0
    raw, w = model._text_sides()
    context = {"topk": None, "query_text": raw}
    x = model.image_features(images, context)
    aux = model.released_aux_loss(context["aux_inputs"], context["topk"], labels)
    tau = model.logit_scale()
    main = F.cross_entropy(tau * x @ w.T, labels)
    zs = F.normalize(model.clip.visual(images), dim=-1)
    guided = F.cross_entropy(tau * zs @ w.T, labels) + F.cross_entropy(tau * x @ model.template_features.T, labels)
    for epoch, want in ((0, guided + 0.1 * main + aux), (1, guided + 0.1 * main + aux), (2, main + aux), (5, main + aux)):
        model.set_epoch(epoch)
        torch.testing.assert_close(model.loss(images, labels), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", [
    {"topk": 3},
    {"topk": 3, "text_prompt": True, "n_ctx": 4, "layers": 2, "guidance_epochs": 1},
], ids=["hand-crafted", "text-prompt-2layers-guidance"])
def test_fast_equals_reference(options, tiny_clip, images, labels):
    """Same prompt state -> the same loss, logits (eval mode) and gradients: the fast backend
    (fp32) within the float noise of the fp32 reference, both against a float64 run of the
    reference (`assert_within_reference_noise`)."""

    def step(model, images):
        loss = model.train().loss(images, labels)
        with torch.no_grad():
            return loss, model.eval()(images)

    reference, fast = (_model(tiny_clip, backend=backend, **options) for backend in ("reference", "fast"))
    oracle = oracle_outcome(reference, lambda m: step(m, images.double()))
    want = step_outcome(reference, lambda: step(reference, images))
    got = step_outcome(fast, lambda: step(fast, images))
    for name, p in reference.named_parameters():
        assert not p.requires_grad or p.grad.abs().sum() > 0, name  # every trainable tensor takes part
    assert_within_reference_noise({"fast": got}, want, oracle)


def test_prompts_transfer_to_other_classes_without_the_classifier(tiny_clip, images, labels):
    model = _model(tiny_clip, topk=3, text_prompt=True, n_ctx=4)
    assert model.training_only_names() == {"cavpt.0.classifier.weight"}
    other = fastprompt.create_model("cavpt", classnames=["forest", "river"], clip=tiny_clip, variant="released",
                                    text_prompt=True, n_ctx=4)
    other.load_prompt_state_dict(model.prompt_state_dict(), other_classes=True)
    assert torch.equal(other.cavpt[0].extra_tokens, model.cavpt[0].extra_tokens)
    assert other(images).shape == (4, 2)


@pytest.mark.parametrize("options, message", [
    ({"variant": "released", "topk_source": "cached"}, "topk_source='cached' belongs to variant='paper'"),
    ({"variant": "released", "aux_target": "eq10"}, "aux_target='eq10' belongs to variant='paper'"),
    ({"variant": "released", "guidance_epochs": 3}, "guidance_epochs=3 needs text_prompt=True"),
    ({"variant": "paper", "guidance_epochs": 3}, "guidance_epochs=3 is part of variant='released'"),
    ({"variant": "Released"}, "variant='Released' must be one of paper, released"),
    ({"variant": "released", "guidance_epochs": -1}, "guidance_epochs=-1 must be an integer >= 0"),
])
def test_option_rules(options, message, tiny_clip):
    with pytest.raises(fastprompt.FastpromptError, match=message.replace("(", "\\(").replace("[", "\\[")):
        fastprompt.create_model("cavpt", classnames=CLASSNAMES, clip=tiny_clip, **options)


def test_variant_defaults():
    from fastprompt.methods.cavpt import CavptConfig

    paper, released = CavptConfig(), CavptConfig(variant="released")
    assert (paper.variant, paper.aux_target, paper.topk_source) == ("paper", "eq10", "cached")
    assert (released.aux_target, released.topk_source, released.guidance_epochs) == ("gt-only", "online", 0)
    assert released.topk == paper.topk == 5 and released.alpha == paper.alpha == 1.0
