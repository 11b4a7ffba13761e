"""`prograd` against BeierZhu/Prompt-align's released step (tests/_prograd.py): the loss terms
and the context's gradient after `prograd_backward_and_update`'s arithmetic within 1e-5
relative (fp32, the same weights and prompts), in a batch where the projection triggers and
one where it does not; its context init (the template's words in the last slots); fast ==
reference; the trainer's step writes the rule's gradient. Learning on the demo set is
tests/training/test_learning.py's."""

import pytest
import torch

import _prograd
import fastprompt
from fastprompt.methods.base import term_gradients
from fastprompt.training.trainer import _Step

from _util import CLASSNAMES, NoDowncast, assert_within_reference_noise, reference_copy, relative_error


def _model(backend="fast", **options):
    torch.manual_seed(0)
    return fastprompt.create_model("prograd", CLASSNAMES, clip="fastprompt-tiny", pretrained=None, backend=backend,
                                   **options)


def _moved(model):
    """Every context slot away from its init (the zeros included), as after some training."""
    with torch.no_grad():
        model.text.context.add_(0.05 * torch.randn(model.text.context.shape, generator=torch.Generator().manual_seed(3)))
    return model


def _batch(model, conflict: bool):
    """Images and the first of a fixed series of label draws for which the released step does
    (conflict=True) or does not project (the tiny CLIP's teacher is near uniform, so which
    draws conflict is found, not designed; the test then asserts the branch taken)."""
    size = model.bundle.image_size
    images = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(1))
    probe = _moved(_model("reference", projection_weight=model.config.projection_weight, temperature=model.config.temperature))
    for seed in range(50):
        labels = torch.randint(0, len(CLASSNAMES), (6,), generator=torch.Generator().manual_seed(seed))
        if _prograd.released_step(probe, images, labels, model.config.temperature, model.config.projection_weight)[3] == [conflict]:
            return images, labels
    raise AssertionError(f"no label draw with conflict={conflict}")


def _ours(model, images, labels):
    terms, _ = model.loss_terms(images, labels)
    params = [model.text.context]
    grads = model.gradient_rule().combine(term_gradients(terms, model.gradient_rule().terms, params))
    return terms["loss"].detach(), terms["kl"].detach(), grads


@pytest.mark.parametrize("conflict", [True, False], ids=["projected", "not-projected"])
@pytest.mark.parametrize("weight, temperature", [(1.0, 1.0), (0.5, 2.0)])
def test_step_equals_released_arithmetic(conflict, weight, temperature):
    model = _moved(_model(projection_weight=weight, temperature=temperature))
    images, labels = _batch(model, conflict)
    released = _moved(_model("reference", projection_weight=weight, temperature=temperature))
    xe, kl, grads, projected = _prograd.released_step(released, images, labels, temperature, weight)
    assert projected == [conflict]  # the batch takes the branch the case names
    got_xe, got_kl, got = _ours(model, images, labels)
    assert relative_error(got_xe, xe) < 1e-5 and relative_error(got_kl, kl) < 1e-5
    assert relative_error(got[0], grads[0]) < 1e-5
    plain = term_gradients(model.loss_terms(images, labels)[0], ("loss",), [model.text.context])["loss"][0]
    assert (relative_error(got[0], plain) > 1e-3) == conflict  # the projection changed the gradient iff it triggered


def test_context_init_fills_the_last_slots():
    """CTX_INIT True: "a photo of a" (4 words) in the last 4 of 16 slots, zeros before; the
    prompt is "X x12 a photo of a {name}." with everything from position 17 on frozen."""
    model = _model()
    context, tokenizer = model.text.context.detach(), model.bundle.tokenizer
    phrase = model.clip.token_embedding(tokenizer(["a photo of a"]))[0, 1:5]  # (4, width)
    assert context.shape[0] == 16 and torch.equal(context[:12], torch.zeros_like(context[:12]))
    assert torch.equal(context[12:], phrase.detach())
    want = tokenizer([f"{' '.join(['X'] * 12)} a photo of a {name}." for name in CLASSNAMES])
    assert torch.equal(model.text.tokens, want)


def test_a_phrase_of_more_tokens_than_words_keeps_its_last_tokens_frozen():
    """The released code counts words: "a type of pet, a photo of a" is 8 words, 9 tokens; its
    first 8 tokens fill the last 8 slots and the 9th ("a") stays before the class name."""
    model = _model(template_init=False, ctx_init="a type of pet, a photo of a")
    emb = model.clip.token_embedding
    tokens = model.bundle.tokenizer(["a type of pet, a photo of a"])
    assert torch.equal(model.text.context.detach()[8:], emb(tokens)[0, 1:9].detach())
    assert torch.equal(model.text.token_suffix[:, 0], emb(tokens)[0, 9].detach().expand(len(CLASSNAMES), -1))


def test_fast_equals_reference():
    """Both terms and the combined gradient of the fast and the fp32 reference path, each against a
    float64 run of the reference (`assert_within_reference_noise`), in a batch that projects."""
    fast, reference = _moved(_model()), _moved(_model("reference"))
    images, labels = _batch(fast, conflict=True)
    named = lambda out: {"loss": out[0], "kl": out[1], "grad text.context": out[2][0].flatten()}  # noqa: E731
    oracle_model = reference_copy(reference, torch.float64)
    with NoDowncast():
        oracle = named(_ours(oracle_model, images.double(), labels))
    assert_within_reference_noise({"fast": named(_ours(fast, images, labels))}, named(_ours(reference, images, labels)),
                                  oracle)


def test_the_trainer_step_writes_the_rules_gradient(monkeypatch):
    """The trainer's rule step (`Trainer._rule_backward`) on the `_Step` forward: the context's
    .grad is the released step's, not the cross-entropy's."""
    from fastprompt.training.trainer import Trainer

    model = _moved(_model())
    images, labels = _batch(model, conflict=True)
    released = _moved(_model("reference"))
    *_, grads, projected = _prograd.released_step(released, images, labels, 1.0, 1.0)
    assert projected == [True]
    trainer = Trainer.__new__(Trainer)  # only the attributes _rule_backward reads
    trainer.rule, trainer.trained, trainer.distributed = model.gradient_rule(), [model.text.context], False
    terms, _ = _Step(model)(images, labels)
    trainer._rule_backward(terms)
    assert relative_error(model.text.context.grad, grads[0]) < 1e-5


@pytest.mark.parametrize("options, message", [
    ({"ctx_init": "a photo of a"}, "both set ProGrad's init phrase"),
    ({"csc": True}, "csc=True with an init phrase"),
    ({"n_ctx": 2}, "n_ctx=2 is fewer than the 4 words"),
    ({"temperature": 0}, "temperature=0 must be > 0"),
])
def test_bad_options_name_the_fix(options, message):
    with pytest.raises(fastprompt.FastpromptError, match=message):
        _model(**options)


def test_template_init_needs_a_template_ending_in_the_class():
    with pytest.raises(fastprompt.FastpromptError, match="template_init needs one template ending in"):
        fastprompt.create_model("prograd", CLASSNAMES, clip="fastprompt-tiny", pretrained=None,
                                template="a photo of a {}, a type of pet.")


@pytest.mark.parametrize("conflict", [True, False], ids=["projected", "not-projected"])
def test_bench_anchor_steps_as_released(conflict):
    """The bench's anchor (`Anchor.loss_terms`, `rule_backward`: a second image pass, the released
    backward order and branches) writes the released step's gradient, and the fast step's."""
    from fastprompt.bench.anchor import Anchor

    model = _moved(_model("reference"))
    images, labels = _batch(model, conflict)
    *_, grads, _ = _prograd.released_step(_moved(_model("reference")), images, labels, 1.0, 1.0)
    anchor = Anchor(model)
    terms, _ = anchor.loss_terms(images, labels)
    anchor.rule_backward(terms, [model.text.context])
    assert relative_error(model.text.context.grad, grads[0]) < 1e-5
    assert relative_error(_ours(_moved(_model()), images, labels)[2][0], grads[0]) < 1e-5
