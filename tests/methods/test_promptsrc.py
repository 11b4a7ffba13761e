"""`promptsrc` against muzairkhattak/PromptSRC's released step (tests/_promptsrc.py): its defaults,
the frozen text target (the mean of unnormalised features over the 60 templates), the loss and
every prompt gradient within 1e-5 relative (fp32, the same weights and prompts), GPA's weights
and running sum as released, and a GPA state carried through `training_state` to the same
prompts. Fast == reference is tests/methods/test_all_methods.py's; learning on the demo set
tests/training/test_learning.py's; a killed run's resume tests/training/test_faults.py's."""

import numpy as np
import pytest
import torch

import _maple
import _promptsrc
import fastprompt
from fastprompt.methods.promptsrc import PROMPTSRC_TEMPLATES, gpa_weights
from fastprompt.prompts.handcrafted import template_features

from _util import CLASSNAMES, relative_error


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return _maple.with_random_layernorms(tiny_clip)


@pytest.fixture(scope="module")
def fixed(clip, tiny_clip):
    """The released `fixed_embeddings` of `clip` and CLASSNAMES (unnormalised), computed once."""
    return _promptsrc.fixed_embeddings(clip, fastprompt.create_model("zeroshot", CLASSNAMES, clip=tiny_clip, pretrained=None)
                                       .bundle.tokenizer, CLASSNAMES)


def _model(clip, backend="fast", **options):
    torch.manual_seed(0)
    return fastprompt.create_model("promptsrc", CLASSNAMES, clip=clip, pretrained=None, backend=backend, **options)


def _moved(model, seed=3):
    """Every prompt tensor away from its initial values, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_state_dict().values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def test_defaults_are_the_released_config(tiny_clip):
    """vit_b16_c2_ep20_batch4_4+4ctx.yaml: 4 + 4 tokens, "a photo of a", depth 9 (every layer of the
    test CLIP's 2 text and 3 image layers), MaPLe's placement, weights 25 and 10, GPA N(15, 1),
    lr 0.0025 with 1 warm-up epoch for both prompt sets."""
    model = _model(tiny_clip)
    assert model.resolved_options() == {"n_ctx": 4, "csc": False, "ctx_init": "a photo of a", "text_depth": 2,
                                         "placement": "before-ln-pre", "n_prompts": 4, "vision_depth": 3,
                                         "text_weight": 25.0, "image_weight": 10.0, "gpa_mean": 15.0, "gpa_std": 1.0}
    shapes = {name: tuple(t.shape) for name, t in model.prompt_state_dict().items()}
    assert shapes == {"text.context": (4, 64), "text.deep_context": (1, 4, 64), "visual.prompts": (3, 4, 64)}
    assert [(g.name, g.lr, g.warmup_epochs) for g in type(model).groups] == [("text", 0.0025, 1), ("visual", 0.0025, 1)]
    ctx, *_ = _maple.prompt_learner(tiny_clip, model.bundle.tokenizer, CLASSNAMES, 4, "a photo of a")
    assert torch.equal(model.text.context.detach(), ctx)  # the four tokens of "a photo of a"


def test_text_target_is_the_mean_of_unnormalised_template_features(clip, fixed):
    """`fixed_embeddings`: encode_text over the 60 templates, meaned before normalising; not CLIP's
    ensembling (normalise each, mean, normalise), which differs measurably here."""
    model = _model(clip)
    assert tuple(PROMPTSRC_TEMPLATES) == tuple(_promptsrc.IMAGENET_TEMPLATES)
    want = fixed / fixed.norm(dim=-1, keepdim=True)
    assert relative_error(model.text_target, want) < 1e-5
    # normalised per template; cached under its own key (the target is cached already)
    ensembled = template_features(model.bundle, CLASSNAMES, PROMPTSRC_TEMPLATES)
    assert relative_error(ensembled, want) > 1e-4


@pytest.mark.parametrize("backend, weights", [("fast", {}), ("reference", {}),
                                              ("fast", {"text_weight": 3.0, "image_weight": 0.5})],
                         ids=["fast", "reference", "fast-other-weights"])
def test_loss_and_prompt_gradients_equal_the_released_step(backend, weights, clip, fixed, images, labels):
    model = _moved(_model(clip, backend, **weights))
    released = {"text_loss_weight": weights.get("text_weight", 25.0),
                "image_loss_weight": weights.get("image_weight", 10.0)}
    loss, grads = _promptsrc.released_step(model, images, labels, **released, fixed=fixed)
    got = model.loss(images, labels)
    got.backward()
    assert relative_error(got.detach(), loss) < 1e-5
    params = dict(model.named_parameters())
    assert set(grads) == set(model.prompt_state_dict())
    for name, want in grads.items():
        assert relative_error(params[name].grad, want) < 1e-5, name


def test_bench_anchor_equals_the_released_step(clip, fixed, images, labels):
    """The bench's anchor (`Anchor._promptsrc`: 77-token text, a second frozen image pass) takes the
    released step's loss and prompt gradients."""
    from fastprompt.bench.anchor import Anchor

    model = _moved(_model(clip, "reference"))
    loss, grads = _promptsrc.released_step(model, images, labels, fixed=fixed)
    got, _ = Anchor(model).loss_and_logits(images, labels)
    got.backward()
    assert relative_error(got.detach(), loss) < 1e-5
    params = dict(model.named_parameters())
    for name, want in grads.items():
        assert relative_error(params[name].grad, want) < 1e-5, name


@pytest.mark.parametrize("epochs, mean, std", [(20, 15, 1), (50, 30, 30), (50, 45, 5), (20, 6, 10), (3, 2, 1)])
def test_gpa_weights_are_the_released_ones(epochs, mean, std):
    """`build_model`: the Gaussian at epochs 1..N (numbered from 1), normalised over them."""
    ours, want = np.array(gpa_weights(epochs, mean, std)), _promptsrc.gpa_weights(epochs, mean, std)
    assert np.abs(ours - want).max() <= 1e-12 * want.max()
    assert ours.argmax() == min(max(round(mean), 1), epochs) - 1


def test_gpa_far_from_every_epoch_weighs_the_nearest():
    """Where every released density underflows (a NaN model there), the weight is on the nearest epoch."""
    with np.errstate(invalid="ignore"):
        assert np.isnan(_promptsrc.gpa_weights(20, 100, 1)).all()
    weights = gpa_weights(20, 100, 1)
    assert weights[-1] == 1.0 and max(weights[:-1]) < 1e-30


def _epoch_states(model, epochs):
    """Prompt states standing for epochs 1..N (random, as training would leave them)."""
    g = torch.Generator().manual_seed(11)
    return [{k: torch.randn(v.shape, generator=g) for k, v in model.prompt_state_dict().items()} for _ in range(epochs)]


def test_end_epoch_aggregates_the_prompts_as_released(clip):
    """After the last epoch the model holds the released GPA of the epochs' prompts (prompts only)."""
    model = _model(clip, gpa_mean=2.0, gpa_std=1.0)
    states = _epoch_states(model, 3)
    for epoch, state in enumerate(states, start=1):
        model.load_prompt_state_dict(state)
        model.end_epoch(epoch, 3)
        if epoch < 3:  # the model trains on its own prompts until the last epoch
            assert all(torch.equal(model.prompt_state_dict()[k], v) for k, v in state.items())
    want = _promptsrc.gpa(states, _promptsrc.gpa_weights(3, 2.0, 1.0))
    for name, p in model.prompt_state_dict().items():
        assert relative_error(p, want[name]) < 1e-6, name
        assert relative_error(p, states[-1][name]) > 0.1, name  # not the last epoch's


def test_a_gpa_state_resumed_from_training_state_ends_on_the_same_prompts(clip):
    """Epochs 1..3 in one model, and epoch 1 in another whose prompts and `training_state()` a third
    model loads to run epochs 2..3 (a resumed run): bit-equal prompts at the end."""
    states = _epoch_states(_model(clip), 3)
    whole, first, resumed = (_model(clip, gpa_mean=2.0, gpa_std=1.0) for _ in range(3))
    for epoch, state in enumerate(states, start=1):
        whole.load_prompt_state_dict(state)
        whole.end_epoch(epoch, 3)
    first.load_prompt_state_dict(states[0])
    first.end_epoch(1, 3)
    saved = {k: v.clone() for k, v in first.training_state().items()}
    assert set(saved) == {f"gpa.{k}" for k in first.prompt_state_dict()}
    resumed.load_training_state(saved)
    for epoch, state in enumerate(states[1:], start=2):
        resumed.load_prompt_state_dict(state)
        resumed.end_epoch(epoch, 3)
    for name, p in whole.prompt_state_dict().items():
        assert torch.equal(resumed.prompt_state_dict()[name], p), name
    with pytest.raises(fastprompt.FastpromptError, match="no GPA sum of epochs 1..1 to add epoch 2 to"):
        _model(clip).end_epoch(2, 3)
    with pytest.raises(ValueError, match="the checkpoint's PromptSRC GPA sum holds nothing, this run's prompts need gpa"):
        _model(clip).load_training_state({})


@pytest.mark.parametrize("options, message", [
    ({"csc": True}, "csc=True: PromptSRC learns one context shared by every class"),
    ({"gpa_std": 0.0}, "gpa_std=0.0 must be > 0"),
    ({"text_weight": -1.0}, "text_weight=-1.0 must be a number >= 0"),
    ({"gpa_mean": float("nan")}, "gpa_mean=nan must be a finite number"),
    ({"text_depth": 3}, "text_depth=3 does not fit the text tower's 2 layers"),
])
def test_bad_options_name_the_fix(options, message, tiny_clip):
    with pytest.raises(fastprompt.FastpromptError, match=message):
        _model(tiny_clip, **options)
