"""Zero-shot CLIP: cached hand-crafted class features against the frozen image tower."""

from __future__ import annotations

from dataclasses import dataclass

from fastprompt.methods.base import PromptModel
from fastprompt.methods.options import Options
from fastprompt.methods.registry import register_method


@dataclass
class ZeroShotConfig(Options):
    """Zero-shot CLIP has no options."""


@register_method("zeroshot")
class ZeroShot(PromptModel):
    options = ZeroShotConfig
    groups = ()  # trains nothing
    frozen_image_tower = True
