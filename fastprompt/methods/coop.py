"""CoOp: learnable text context, frozen image tower (Zhou et al., IJCV 2022)."""

from __future__ import annotations

from fastprompt.methods.base import PromptModel, add_coop
from fastprompt.methods.registry import register_method
from fastprompt.methods.specs import CoopConfig


@register_method("coop")  # options, groups, frozen image tower: fastprompt.methods.specs
class Coop(PromptModel):

    def __init__(self, bundle, classnames, templates, backend, config: CoopConfig):
        super().__init__(bundle, classnames, templates, backend, config)
        add_coop(self, config)
