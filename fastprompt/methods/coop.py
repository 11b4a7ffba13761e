"""CoOp: learnable text context, frozen image tower (Zhou et al., IJCV 2022)."""

from __future__ import annotations

from dataclasses import dataclass

from fastprompt.methods.base import PromptModel, add_coop
from fastprompt.methods.options import CoopOptions


@dataclass
class CoopConfig(CoopOptions):
    pass


class Coop(PromptModel):
    method = "coop"

    def __init__(self, bundle, classnames, templates, backend, config: CoopConfig):
        super().__init__(bundle, classnames, templates, backend, config)
        add_coop(self, config)
