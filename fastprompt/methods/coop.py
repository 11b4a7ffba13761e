"""CoOp: learnable text context, frozen image tower (Zhou et al., IJCV 2022)."""

from __future__ import annotations

from dataclasses import dataclass

from fastprompt.methods.base import TEXT_GROUP, PromptModel, add_coop
from fastprompt.methods.options import CoopOptions, TextDepthOptions
from fastprompt.methods.registry import register_method


@dataclass
class CoopConfig(TextDepthOptions, CoopOptions):
    pass


@register_method("coop")
class Coop(PromptModel):
    options = CoopConfig
    groups = (TEXT_GROUP,)
    frozen_image_tower = True

    def __init__(self, bundle, classnames, templates, backend, config: CoopConfig):
        super().__init__(bundle, classnames, templates, backend, config)
        add_coop(self, config)
