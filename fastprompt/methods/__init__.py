"""The method registry and `create_model`, the library's front door.

Importing this package does not import torch: the registry and every method's declaration
(`specs`) are torch-free, so the CLI checks a command line first. `create_model` and
`PromptModel` load torch (and the method's module) on first use.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Optional, Sequence, Union

from fastprompt.errors import FastpromptError
from fastprompt.methods import specs  # noqa: F401  declares the built-in methods (list_methods' order)
from fastprompt.methods.registry import (METHODS, MethodSpec, ParamGroup, method_class, method_spec, register_method,
                                         unregister_method)

if TYPE_CHECKING:
    import torch

    from fastprompt.methods.base import PromptModel
    from fastprompt.models.clip import ClipBundle

log = logging.getLogger(__name__)

__all__ = ["METHODS", "MethodSpec", "ParamGroup", "PromptModel", "create_model", "create_model_and_transforms",
           "list_methods", "method_class", "method_config", "method_spec", "register_method", "unregister_method"]


def __getattr__(name):  # PEP 562: the torch half on first use
    if name == "PromptModel":
        from fastprompt.methods.base import PromptModel

        return PromptModel
    raise AttributeError(f"module 'fastprompt.methods' has no attribute {name!r}")


def list_methods() -> list[str]:
    return list(METHODS)


def method_config(method: str, **options):
    """The validated options dataclass of `method` (unknown names are errors)."""
    config_cls = method_spec(method).options
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
    clip: Union[str, "torch.nn.Module", "ClipBundle"] = "ViT-B-32",
    pretrained: Optional[str] = "openai",
    template: Union[str, Sequence[str], None] = None,
    backend: str = "fast",
    device: Union[str, "torch.device"] = "cpu",
    trust_pickle: bool = False,
    **options,
) -> "PromptModel":
    """Build a prompt-tuning model around a frozen CLIP.

    method: a name from `list_methods()`; classnames: the K class names; clip: an open_clip
    model name (or `fastprompt-tiny`), a CLIP instance, or a `ClipBundle` already loaded (used
    as it is: `pretrained` and `trust_pickle` are not read; a pack's runs share one); pretrained: open_clip tag, local
    checkpoint file, or None for random weights; template: one template, a list (ensemble)
    or "ensemble"; backend: "fast" or "reference" (the eager oracle; same function);
    trust_pickle: let a checkpoint file that needs a full unpickle load (it can run code);
    options: the method's options (see `fastprompt.methods.options`).
    """
    from fastprompt.settings import BACKENDS
    from fastprompt.models.clip import ClipBundle, load_clip
    from fastprompt.prompts.templates import resolve_templates, validate_classnames

    config = method_config(method, **options)
    names = validate_classnames(classnames)
    templates = resolve_templates(template)
    if backend not in BACKENDS:
        raise FastpromptError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")
    bundle = clip if isinstance(clip, ClipBundle) else load_clip(clip, pretrained, device=device, trust_pickle=trust_pickle)
    return method_class(method)(bundle, names, templates, backend, config)


def create_model_and_transforms(
    method: str,
    classnames: Sequence[str],
    clip: Union[str, "torch.nn.Module"] = "ViT-B-32",
    pretrained: Optional[str] = "openai",
    **options,
):
    """(model, train transform, eval transform), in open_clip's `create_model_and_transforms` order.

    The model is `create_model(method, classnames, clip, pretrained, **options)` (every keyword
    of `create_model` is accepted); each transform takes a PIL image and returns a float32
    tensor (3, S, S) at the model's input size S, with the pixels the loaders feed it
    (`fastprompt.data.transforms`: eval is CLIP's eval transform as `prepare` stores val/test;
    train is Dassl's random resized crop + flip of the image as `prepare` stores it).
    """
    from fastprompt.data.transforms import EvalTransform, TrainTransform

    model = create_model(method, classnames, clip=clip, pretrained=pretrained, **options)
    size = model.bundle.image_size
    return model, TrainTransform(size), EvalTransform(size)
