"""VPT's learnable visual prompts (Jia et al., "Visual Prompt Tuning"), N(0, 0.02) init."""

from __future__ import annotations

import torch
from torch import nn


class VisualPrompts(nn.Module):
    """`prompts` [L, P, width]: L = 1 for shallow (inserted once, carried), L = depth for deep."""

    def __init__(self, layers: int, n_prompts: int, width: int, init_std: float = 0.02, device=None):
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(layers, n_prompts, width, device=device).normal_(0.0, init_std))
