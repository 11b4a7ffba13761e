"""ResNet CLIPs (CoOp's headline backbones): methods that leave the image tower alone run on
them; methods that prompt it refuse with a message that names the fix."""

import pytest
import torch

import fastprompt
from fastprompt.errors import FastpromptError
from fastprompt.models.clip import load_clip

CLASSNAMES = ["forest", "river", "highway"]


@pytest.fixture(scope="module")
def rn50():
    torch.manual_seed(0)
    return load_clip("RN50", None).model


@pytest.mark.slow
def test_zeroshot_on_rn50_equals_clip(rn50):
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for backend in ("reference", "fast"):
        model = fastprompt.create_model("zeroshot", CLASSNAMES, clip=rn50, backend=backend)
        with torch.no_grad():
            x = torch.nn.functional.normalize(rn50.encode_image(images), dim=-1)  # (B, D)
            w = torch.nn.functional.normalize(rn50.encode_text(model.bundle.tokenizer(
                [f"a photo of a {c}." for c in CLASSNAMES])), dim=-1)  # (K, D)
            expected = rn50.logit_scale.exp() * x @ w.t()  # (B, K)
            torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["coop", "e2mim", "cocoop", "prograd"])
def test_frozen_tower_methods_train_on_rn50(rn50, method):
    """Loss and gradients on both backends agree; only the prompts train."""
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0])
    grads = {}
    for backend in ("reference", "fast"):
        torch.manual_seed(0)
        model = fastprompt.create_model(method, CLASSNAMES, clip=rn50, backend=backend, n_ctx=4)
        torch.manual_seed(1)  # e2mim's mixup draws
        model.loss(images, labels).backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(not p.requires_grad for p in model.clip.parameters())
    assert grads["fast"].keys() == grads["reference"].keys() and grads["fast"]
    for name in grads["fast"]:
        torch.testing.assert_close(grads["fast"][name], grads["reference"][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep", "vlp", "cavpt"])
def test_prompted_tower_methods_refuse_a_resnet(rn50, method):
    with pytest.raises(FastpromptError, match=f"{method} prompts the image tower .* ModifiedResNet; visual prompts need a ViT"):
        fastprompt.create_model(method, CLASSNAMES, clip=rn50)
