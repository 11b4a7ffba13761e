"""The Python contract's bad-input errors: each names the problem and the fix."""

import pytest

import fastprompt
from fastprompt.errors import FastpromptError


def make(method="coop", **kw):
    args = dict(classnames=["forest", "river"], clip="fastprompt-tiny", pretrained=None)
    args.update(kw)
    return fastprompt.create_model(method, **args)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(FastpromptError) as err:
        make("cop")
    assert "unknown method 'cop'" in str(err.value)
    for name in fastprompt.list_methods():
        assert name in str(err.value)


def test_unknown_option_names_it_and_the_valid_ones():
    with pytest.raises(FastpromptError, match="unknown option n_prompts for method 'coop'; valid options: n_ctx, csc, ctx_init"):
        make("coop", n_prompts=3)


def test_bad_option_values_name_the_field():
    with pytest.raises(FastpromptError, match="topk=0 must be a positive integer"):
        make("cavpt", topk=0)
    with pytest.raises(FastpromptError, match="aux_target='gt' must be one of eq10, gt-only"):
        make("cavpt", aux_target="gt")
    with pytest.raises(FastpromptError, match="infer='both' must be one of ensemble, soft"):
        make("e2mim", infer="both")
    with pytest.raises(FastpromptError, match="n_prompts=0"):
        make("vpt-deep", n_prompts=0)


def test_empty_and_bad_class_lists():
    with pytest.raises(FastpromptError, match="classnames is empty"):
        make(classnames=[])
    with pytest.raises(FastpromptError, match="class names repeat: forest"):
        make(classnames=["forest", "forest"])


def test_missing_checkpoint_and_bad_template_and_backend(tmp_path):
    with pytest.raises(FastpromptError, match="checkpoint file not found"):
        make(pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(FastpromptError, match="must contain '\\{\\}' exactly once"):
        make(template="a photo")
    with pytest.raises(FastpromptError, match="unknown backend 'slow'"):
        make(backend="slow")


def test_error_type_is_a_value_error():
    assert issubclass(FastpromptError, ValueError)


def test_images_of_another_size_name_the_size_the_model_takes():
    import torch

    model = make()
    with pytest.raises(FastpromptError, match=r"images of shape \(2, 3, 224, 224\) do not fit this model, which takes "
                                              r"\(B, 3, 64, 64\); resize them to 64 px"):
        model(torch.zeros(2, 3, 224, 224))
    with pytest.raises(FastpromptError, match=r"images of shape \(3, 64, 64\) do not fit"):  # the batch axis left out
        model.loss(torch.zeros(3, 64, 64), torch.zeros(3, dtype=torch.long))


def test_create_model_and_transforms_in_open_clip_order():
    """(model, train transform, eval transform) as open_clip returns them, each transform at the
    model's input size: PIL image in, float32 (3, S, S) out, which the model takes as a batch of one."""
    import numpy as np
    import torch
    from PIL import Image

    from fastprompt.data.transforms import EvalTransform, TrainTransform

    model, train_transform, eval_transform = fastprompt.create_model_and_transforms(
        "vpt-deep", ["forest", "river"], clip="fastprompt-tiny", pretrained=None, n_prompts=2)
    assert model.method == "vpt-deep" and model.config.n_prompts == 2
    assert isinstance(train_transform, TrainTransform) and isinstance(eval_transform, EvalTransform)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    x = eval_transform(image)
    assert x.dtype == torch.float32 and x.shape == (3, 64, 64)
    assert torch.equal(x, eval_transform(image))  # deterministic
    torch.manual_seed(0)
    a = train_transform(image)
    assert a.shape == (3, 64, 64) and not torch.equal(a, train_transform(image))  # a fresh crop per call
    torch.manual_seed(0)
    assert torch.equal(a, train_transform(image))  # drawn from torch's generator, as torchvision's
    assert model(torch.stack([x, a])).shape == (2, 2)
    with pytest.raises(FastpromptError, match="the transform takes a PIL image, got Tensor"):
        eval_transform(x)
