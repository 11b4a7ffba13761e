"""Hand-crafted prompt templates and their validation."""

from __future__ import annotations

from typing import Sequence, Union

from fastprompt.errors import FastpromptError

DEFAULT_TEMPLATE = "a photo of a {}."

# `template="ensemble"`: the seven ImageNet templates CLIP's authors selected for prompt
# ensembling (CLIP notebook "Prompt_Engineering_for_ImageNet"), as Tip-Adapter/CoOp users know them.
ENSEMBLE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def resolve_templates(template: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    """One template, a list (an ensemble), or "ensemble" -> a tuple of validated templates."""
    if template is None:
        return (DEFAULT_TEMPLATE,)
    if isinstance(template, str):
        templates = ENSEMBLE_TEMPLATES if template == "ensemble" else (template,)
    else:
        templates = tuple(template)
    if not templates:
        raise FastpromptError("template list is empty; pass a template such as 'a photo of a {}.' or 'ensemble'")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise FastpromptError(
                f"template {t!r} must contain '{{}}' exactly once where the class name goes, e.g. 'a photo of a {{}}.'"
            )
    return templates


def validate_classnames(classnames: Sequence[str]) -> tuple[str, ...]:
    if isinstance(classnames, str):
        raise FastpromptError("classnames must be a list of class names, not one string; e.g. classnames=['forest', 'river']")
    names = tuple(classnames)
    if not names:
        raise FastpromptError("classnames is empty; pass the list of class names, e.g. classnames=['forest', 'river']")
    for n in names:
        if not isinstance(n, str) or not n.strip():
            raise FastpromptError(f"class name {n!r} is not a non-empty string; every class needs a name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise FastpromptError(f"class names repeat: {', '.join(dup)}; every class needs a distinct name")
    return tuple(n.strip() for n in names)
