"""Zero-shot CLIP: cached hand-crafted class features against the frozen image tower."""

from __future__ import annotations

from fastprompt.methods.base import PromptModel
from fastprompt.methods.registry import register_method
from fastprompt.methods.specs import ZeroShotConfig  # noqa: F401  (its options; trains nothing)


@register_method("zeroshot")  # options, groups, frozen image tower: fastprompt.methods.specs
class ZeroShot(PromptModel):
    """Logits against the cached hand-crafted class features: `PromptModel` without prompt parts."""
