"""The method registry and `create_model`, the library's front door."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence, Union

import torch

from fastprompt.errors import FastpromptError
from fastprompt.methods.base import PromptModel
from fastprompt.methods.registry import METHODS, ParamGroup, method_class, register_method, unregister_method
from fastprompt.models.clip import load_clip
from fastprompt.models.text import BACKENDS
from fastprompt.prompts.templates import resolve_templates, validate_classnames

# The built-in methods register themselves on import; this order is list_methods()'s.
from fastprompt.methods import zeroshot, coop, vpt, vlp, cavpt, e2mim, cocoop, ivlp, maple  # noqa: E402,F401  isort: skip

log = logging.getLogger(__name__)

__all__ = ["METHODS", "ParamGroup", "PromptModel", "create_model", "list_methods", "method_class", "method_config",
           "register_method", "unregister_method"]


def list_methods() -> list[str]:
    return list(METHODS)


def method_config(method: str, **options):
    """The validated options dataclass of `method` (unknown names are errors)."""
    config_cls = method_class(method).options
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise FastpromptError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for method '{method}'; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    return config_cls(**options)


def create_model(
    method: str,
    classnames: Sequence[str],
    clip: Union[str, torch.nn.Module] = "ViT-B-32",
    pretrained: Optional[str] = "openai",
    template: Union[str, Sequence[str], None] = None,
    backend: str = "fast",
    device: Union[str, torch.device] = "cpu",
    trust_pickle: bool = False,
    **options,
) -> PromptModel:
    """Build a prompt-tuning model around a frozen CLIP.

    method: a name from `list_methods()`; classnames: the K class names; clip: an open_clip
    model name (or `fastprompt-tiny`) or a CLIP instance; pretrained: open_clip tag, local
    checkpoint file, or None for random weights; template: one template, a list (ensemble)
    or "ensemble"; backend: "fast" or "reference" (the eager oracle; same function);
    trust_pickle: let a checkpoint file that needs a full unpickle load (it can run code);
    options: the method's options (see `fastprompt.methods.options`).
    """
    config = method_config(method, **options)
    names = validate_classnames(classnames)
    templates = resolve_templates(template)
    if backend not in BACKENDS:
        raise FastpromptError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")
    bundle = load_clip(clip, pretrained, device=device, trust_pickle=trust_pickle)
    return method_class(method)(bundle, names, templates, backend, config)
