"""VPT on CLIP's image tower with cached hand-crafted text features (the CAVPT paper's eqs. 4-6).

`placement` says where layer 1's prompts enter: after `ln_pre` (default; fanrena/DPT, the CAVPT
authors' code) or before it (muzairkhattak/multimodal-prompt-learning `clip/model.py`: MaPLe's
VPT trainer); see `fastprompt.models.vision`."""

from __future__ import annotations

from fastprompt.methods.base import PromptModel, add_visual_prompts
from fastprompt.methods.registry import register_method
from fastprompt.methods.specs import VptConfig, VptDeepConfig


@register_method("vpt-shallow")  # options, groups, frozen image tower: fastprompt.methods.specs
class VptShallow(PromptModel):
    """P prompts inserted after the embedding and carried through every layer."""

    def __init__(self, bundle, classnames, templates, backend, config: VptConfig):
        super().__init__(bundle, classnames, templates, backend, config)
        add_visual_prompts(self, "shallow", config.n_prompts, placement=config.placement)


@register_method("vpt-deep")  # options, groups, frozen image tower: fastprompt.methods.specs
class VptDeep(PromptModel):
    """P learnable prompts per layer, replaced at every layer (eq. 6); with `vision_depth` N < L
    in the first N layers only, what layer N writes into them carried above (MaPLe's VPT)."""

    def __init__(self, bundle, classnames, templates, backend, config: VptDeepConfig):
        super().__init__(bundle, classnames, templates, backend, config)
        add_visual_prompts(self, "deep", config.n_prompts, layers=config.vision_depth, placement=config.placement,
                           carry=True)
