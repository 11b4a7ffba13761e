"""Every method: shapes, a finite loss, gradients only where they belong, state round-trip,
and the reference and fast backends computing the same function."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastprompt

from _util import CLASSNAMES, assert_within_reference_noise, oracle_outcome, step_outcome

METHODS = fastprompt.list_methods()


def test_list_methods():
    assert METHODS == ["zeroshot", "coop", "vpt-shallow", "vpt-deep", "vlp", "cavpt", "e2mim", "cocoop", "kgcoop", "prograd", "promptsrc", "ivlp", "maple"]


def _build(method, clip, backend="fast", seed=0, **opts):
    torch.manual_seed(seed)
    return fastprompt.create_model(method, classnames=CLASSNAMES, clip=clip, pretrained=None, backend=backend, **opts)


EXPECTED_NAMES = {
    "zeroshot": set(),
    "coop": {"text.context"},
    "vpt-shallow": {"visual.prompts"},
    "vpt-deep": {"visual.prompts"},
    "vlp": {"text.context", "visual.prompts"},
    "cocoop": {"text.context", "meta.linear1.weight", "meta.linear1.bias", "meta.linear2.weight", "meta.linear2.bias"},
    "kgcoop": {"text.context"},
    "prograd": {"text.context"},
    "promptsrc": {"text.context", "text.deep_context", "visual.prompts"},
    "ivlp": {"text.context", "text.deep_context", "visual.prompts"},
    "maple": {"text.context", "text.deep_context", "visual.first.weight", "visual.first.bias", "visual.deep.0.weight",
              "visual.deep.0.bias"},
}


@pytest.mark.parametrize("method", METHODS)
def test_shapes_loss_gradients_and_state(method, tiny_clip, images, labels, tmp_path):
    model = _build(method, tiny_clip)
    logits = model(images)
    assert logits.shape == (4, len(CLASSNAMES)) and torch.isfinite(logits).all()
    loss = model.loss(images, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)

    state = model.prompt_state_dict()
    names = set(state)
    if method in EXPECTED_NAMES:
        assert names == EXPECTED_NAMES[method]
    elif method == "cavpt":
        assert "visual.prompts" in names and all(n == "visual.prompts" or n.startswith("cavpt.") for n in names)
    elif method == "e2mim":
        assert "text.context" in names and all(n == "text.context" or n.startswith("e2mim.") for n in names)

    if names:
        loss.backward()
        params = dict(model.named_parameters())
        for name in names:
            assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
        assert model.may_skip_parameters() == (method == "cavpt" and model.released)  # DDP's find_unused_parameters
        for name, p in model.clip.named_parameters():
            assert p.grad is None and not p.requires_grad, name

    # round trip through safetensors into a freshly initialised model
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "prompts.safetensors"))
    other = _build(method, tiny_clip, seed=1)
    other.load_prompt_state_dict(load_file(str(tmp_path / "prompts.safetensors")))
    model.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(images), model(images))


@pytest.mark.parametrize("method", METHODS)
def test_fast_equals_reference(method, tiny_clip, images, labels):
    """Same prompt state -> the same loss, logits and gradients: each of the fast backend's
    (fp32) within the float noise of the fp32 reference, both measured against a float64 run
    of the reference (`assert_within_reference_noise`)."""

    def step(model, images):
        loss = model.loss(images, labels)
        with torch.no_grad():
            return loss, model(images)

    reference, fast = _build(method, tiny_clip, backend="reference"), _build(method, tiny_clip, backend="fast")
    oracle = oracle_outcome(reference, lambda m: step(m, images.double()))
    want = step_outcome(reference, lambda: step(reference, images))
    got = step_outcome(fast, lambda: step(fast, images))
    assert (len(got) > 2) == (method != "zeroshot")  # every method but zero-shot has gradients
    assert_within_reference_noise({"fast": got}, want, oracle)


def test_load_prompt_state_dict_rejects_mismatches(tiny_clip):
    model = _build("vpt-deep", tiny_clip)
    with pytest.raises(fastprompt.FastpromptError, match="missing: \\['visual.prompts'\\]"):
        model.load_prompt_state_dict({"text.context": torch.zeros(16, 64)})
    with pytest.raises(fastprompt.FastpromptError, match="has shape \\(3, 5, 64\\), this model needs \\(3, 10, 64\\)"):
        model.load_prompt_state_dict({"visual.prompts": torch.zeros(3, 5, 64)})


@pytest.fixture(scope="module")
def vit_b32():
    torch.manual_seed(0)
    return fastprompt.models.load_clip("ViT-B-32", None).model


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_vit_b32_random_init_runs_every_method(method, vit_b32):
    """The contract's `clip="ViT-B-32", pretrained=None` on CPU: a small batch, every method (two
    classes: a third fewer text-tower passes, per class and per template, than three)."""
    model = fastprompt.create_model(method, classnames=CLASSNAMES[:2], clip=vit_b32, n_ctx=4) if method in (
        "coop", "vlp", "e2mim", "ivlp", "maple") else fastprompt.create_model(method, classnames=CLASSNAMES[:2], clip=vit_b32)
    images = torch.randn(2, 3, 224, 224)
    loss = model.loss(images, torch.tensor([0, 1]))
    assert model(images).shape == (2, 2) and torch.isfinite(loss)
    if model.prompt_state_dict():
        loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_vit_b32_by_name():
    model = fastprompt.create_model("zeroshot", classnames=["forest", "river"], clip="ViT-B-32", pretrained=None)
    assert model.bundle.name == "ViT-B-32" and model(torch.randn(1, 3, 224, 224)).shape == (1, 2)


@pytest.mark.parametrize("method", METHODS)
def test_prompts_transfer_to_other_classes(method, tiny_clip, images, labels):
    """Base-to-new and cross-dataset: prompts learned on some classes evaluate on others."""
    model = _build(method, tiny_clip)
    model.loss(images, labels)
    other = fastprompt.create_model(method, classnames=["forest", "river"], clip=tiny_clip)
    other.load_prompt_state_dict(model.prompt_state_dict(), other_classes=True)
    shared = set(other.prompt_state_dict()) - other.training_only_names()
    for name in shared:
        assert torch.equal(other.prompt_state_dict()[name], model.prompt_state_dict()[name])
    assert other(images).shape == (4, 2)


def test_class_specific_context_does_not_transfer(tiny_clip):
    model = _build("coop", tiny_clip, csc=True, n_ctx=2)
    other = fastprompt.create_model("coop", classnames=["forest", "river"], clip=tiny_clip, csc=True, n_ctx=2)
    with pytest.raises(fastprompt.FastpromptError, match="class-specific context"):
        other.load_prompt_state_dict(model.prompt_state_dict(), other_classes=True)


def test_a_method_that_may_skip_parameters_says_so(tiny_clip, images, labels):
    """E2MIM without its MI term leaves the critic out of the loss: it says so, and DDP looks for
    unused tensors only then (`find_unused_parameters`; issue 25 §14: the flag on every method
    made DDP warn from every rank)."""
    model = _build("e2mim", tiny_clip, mi_weight=0.0)
    assert model.may_skip_parameters()
    model.loss(images, labels).backward()
    unused = {name for name, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert unused and all(name.startswith("e2mim.") for name in unused)
    assert not _build("e2mim", tiny_clip).may_skip_parameters() and _build("cavpt", tiny_clip, variant="released").may_skip_parameters()
