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
