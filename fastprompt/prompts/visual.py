"""Visual prompts: VPT's learnable ones (Jia et al., "Visual Prompt Tuning"), N(0, 0.02) init, and
MaPLe's, produced from the text prompts by its coupling functions."""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from fastprompt.models.vision import PLACEMENTS


class VisualPrompts(nn.Module):
    """`prompts` [L, P, width]: L = 1 for shallow (inserted once, carried), L = depth for deep.

    How they enter the image tower (`fastprompt.models.vision.encode`): `placement`, where
    layer 1's prompts join the sequence; `carry`, whether the slots of the last prompted layer
    stay as tokens in the layers above it (MaPLe's prompt depth) or are dropped."""

    def __init__(self, layers: int, n_prompts: int, width: int, init_std: float = 0.02, device=None,
                 placement: str = "after-ln-pre", carry: bool = False):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r}: pick one of {', '.join(PLACEMENTS)}")
        self.prompts = nn.Parameter(torch.empty(layers, n_prompts, width, device=device).normal_(0.0, init_std))
        self.placement = placement
        self.carry = carry


class CoupledPrompts(nn.Module):
    """MaPLe's coupling functions (muzairkhattak/multimodal-prompt-learning `trainers/maple.py`,
    `MultiModalPromptLearner`): the visual prompts of layers 1..J are linear maps of the text
    prompts of the same layers, so the image tower holds no prompt of its own.

    `first`: text width -> vision width for layer 1's context (the released `proj`, its own
    nn.Linear initialisation); `deep[l]` for the deep context of layer l + 2 (the released
    `compound_prompt_projections`: J - 1 copies of one nn.Linear, `_get_clones`, so they start
    equal). Layer 1's visual prompts enter where `placement` says (MaPLe: before ln_pre); the
    slots of layer J are carried through the layers above (`carry`)."""

    def __init__(self, text_width: int, vision_width: int, depth: int, placement: str = "before-ln-pre",
                 device=None):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r}: pick one of {', '.join(PLACEMENTS)}")
        self.first = nn.Linear(text_width, vision_width, device=device)
        single = nn.Linear(text_width, vision_width, device=device)
        self.deep = nn.ModuleList(copy.deepcopy(single) for _ in range(depth - 1))
        self.placement = placement
        self.carry = True

    def forward(self, context: torch.Tensor, deep_context: Optional[torch.Tensor]) -> torch.Tensor:
        """Visual prompts [J, M, vision width] from layer 1's text context [M, text width] and the
        deep text context [J-1, M, text width] (None when J = 1)."""
        layers = [self.first(context)]  # [(M, dv)]
        if deep_context is not None:
            layers += [f(ctx) for f, ctx in zip(self.deep, deep_context)]  # [(M, dv)] * (J-1)
        return torch.stack(layers)  # (J, M, dv)
