"""The method registry and `create_model`, the library's front door."""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import torch

from fastprompt.errors import FastpromptError
from fastprompt.methods.base import PromptModel
from fastprompt.methods.cavpt import Cavpt, CavptConfig
from fastprompt.methods.coop import Coop, CoopConfig
from fastprompt.methods.e2mim import E2mim, E2mimConfig
from fastprompt.methods.vlp import Vlp, VlpConfig
from fastprompt.methods.vpt import VptConfig, VptDeep, VptShallow
from fastprompt.methods.zeroshot import ZeroShot, ZeroShotConfig
from fastprompt.models.clip import load_clip
from fastprompt.models.text import BACKENDS
from fastprompt.prompts.templates import resolve_templates, validate_classnames

log = logging.getLogger(__name__)

# name -> (model class, options dataclass); the order is the order of list_methods()
METHODS = {
    "zeroshot": (ZeroShot, ZeroShotConfig),
    "coop": (Coop, CoopConfig),
    "vpt-shallow": (VptShallow, VptConfig),
    "vpt-deep": (VptDeep, VptConfig),
    "vlp": (Vlp, VlpConfig),
    "cavpt": (Cavpt, CavptConfig),
    "e2mim": (E2mim, E2mimConfig),
}


def list_methods() -> list[str]:
    return list(METHODS)


def method_config(method: str, **options):
    """The validated options dataclass of `method` (unknown names are errors)."""
    if method not in METHODS:
        raise FastpromptError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)}")
    config_cls = METHODS[method][1]
    valid = config_cls.field_names()
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
    **options,
) -> PromptModel:
    """Build a prompt-tuning model around a frozen CLIP.

    method: a name from `list_methods()`; classnames: the K class names; clip: an open_clip
    model name (or `fastprompt-tiny`) or a CLIP instance; pretrained: open_clip tag, local
    checkpoint file, or None for random weights; template: one template, a list (ensemble)
    or "ensemble"; backend: "fast" or "reference" (the eager oracle; same function);
    options: the method's options (see `fastprompt.methods.options`).
    """
    config = method_config(method, **options)
    names = validate_classnames(classnames)
    templates = resolve_templates(template)
    if backend not in BACKENDS:
        raise FastpromptError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")
    bundle = load_clip(clip, pretrained, device=device)
    model_cls = METHODS[method][0]
    return model_cls(bundle, names, templates, backend, config)
