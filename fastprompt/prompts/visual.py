"""VPT's learnable visual prompts (Jia et al., "Visual Prompt Tuning"), N(0, 0.02) init."""

from __future__ import annotations

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
