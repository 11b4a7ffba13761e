"""Zero-shot CLIP: cached hand-crafted class features against the frozen image tower."""

from __future__ import annotations

from dataclasses import dataclass

from fastprompt.methods.base import PromptModel
from fastprompt.methods.options import Options


@dataclass
class ZeroShotConfig(Options):
    """Zero-shot CLIP has no options."""


class ZeroShot(PromptModel):
    method = "zeroshot"
