"""Typed method options: every option of docs/methods.md is a keyword of `create_model`.

Each group validates itself in `__post_init__` with a message that names the field; a
method's config is the union of the groups it uses (dataclass multiple inheritance).
Each group's `flag_prefix` names its CLI flags (`--coop.n-ctx`); the flags, their types,
defaults and help (the comment after each field) are generated from these classes
(`fastprompt.methods.registry.option_flags`), so a new field is a new flag.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from fastprompt.settings import PLACEMENTS
from fastprompt.validation import is_int as _is_int
from fastprompt.validation import require as _require


# options `resolved_options` fills in when the model is built (None until then)
DERIVED_OPTIONS = frozenset({"n_ctx", "text_depth", "vision_depth", "prompt_depth"})


@dataclass
class Options:
    """Base: runs every group's `_validate` method after construction."""

    flag_prefix: ClassVar[str] = ""  # CLI flags of the fields a class defines: --{flag_prefix}.{field}

    def __post_init__(self) -> None:
        for cls in type(self).__mro__:
            check = cls.__dict__.get("_validate")
            if check is not None:
                check(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def unused_fields(cls, options: dict) -> set[str]:
        """The fields that take no part in a model with these `options` (a named protocol
        leaves its values for them out); a method whose options switch a part off says so."""
        return set()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CoopOptions(Options):
    flag_prefix: ClassVar[str] = "coop"

    n_ctx: Optional[int] = None  # context vectors M: 16, or the length of ctx_init
    csc: bool = field(default=False, metadata={"off": "shared"})  # class-specific context ([K, M, width]) instead of one shared context
    ctx_init: Optional[str] = None  # init phrase such as "a photo of a" instead of N(0, 0.02)

    def _validate(self) -> None:
        _require(self.n_ctx is None or (_is_int(self.n_ctx) and 1 <= self.n_ctx <= 60),
                 f"n_ctx={self.n_ctx!r} must be an integer in 1..60 (the text tower holds 77 tokens)")
        _require(isinstance(self.csc, bool), f"csc={self.csc!r} must be True or False")
        _require(self.ctx_init is None or (isinstance(self.ctx_init, str) and self.ctx_init.strip() != ""),
                 f"ctx_init={self.ctx_init!r} must be a non-empty phrase such as 'a photo of a', or None")


CLASS_POSITIONS = ("end", "middle", "front")


@dataclass
class ClassPositionOptions(Options):
    flag_prefix: ClassVar[str] = "coop"

    class_position: str = field(default="end", metadata={"choices": CLASS_POSITIONS})  # where the class name sits among the context tokens: "end" (after them), "middle" (after the first half), "front" (before them); CoOp's CLASS_TOKEN_POSITION

    def _validate(self) -> None:
        _require(self.class_position in CLASS_POSITIONS,
                 f"class_position={self.class_position!r} must be one of {', '.join(CLASS_POSITIONS)}")


@dataclass
class TextDepthOptions(Options):
    flag_prefix: ClassVar[str] = "coop"

    text_depth: Optional[int] = 1  # text layers J with their own learnable context: layer 1's is CoOp's, layers 2..J replace it with their own (MaPLe's PROMPT_DEPTH_TEXT; 1: CoOp)

    def _validate(self) -> None:
        _require(self.text_depth is None or (_is_int(self.text_depth) and self.text_depth >= 1),
                 f"text_depth={self.text_depth!r} must be a positive integer (1: CoOp) or None (every layer of the text tower)")


@dataclass
class VisualDepthOptions(Options):
    flag_prefix: ClassVar[str] = "vpt"

    vision_depth: Optional[int] = None  # image layers N with their own visual prompts; what layer N writes into them is carried through the layers above (MaPLe's PROMPT_DEPTH_VISION; 1: vpt-shallow; default: every layer)

    def _validate(self) -> None:
        _require(self.vision_depth is None or (_is_int(self.vision_depth) and self.vision_depth >= 1),
                 f"vision_depth={self.vision_depth!r} must be a positive integer (1: vpt-shallow) or None (every layer of the image tower)")


@dataclass
class PlacementOptions(Options):
    flag_prefix: ClassVar[str] = "vpt"

    placement: str = field(default="after-ln-pre", metadata={"choices": PLACEMENTS})  # where layer 1's prompts enter: "after-ln-pre" (the CAVPT authors' code) or "before-ln-pre" (MaPLe's code: normalised by ln_pre with the image tokens)

    def _validate(self) -> None:
        _require(self.placement in PLACEMENTS, f"placement={self.placement!r} must be one of {', '.join(PLACEMENTS)}")


@dataclass
class VisualOptions(PlacementOptions):
    flag_prefix: ClassVar[str] = "vpt"

    n_prompts: int = 10  # visual prompts P per layer

    def _validate(self) -> None:
        _require(_is_int(self.n_prompts) and self.n_prompts >= 1,
                 f"n_prompts={self.n_prompts!r} must be a positive integer (the paper uses 10)")


@dataclass
class MapleOptions(Options):
    flag_prefix: ClassVar[str] = "maple"

    prompt_depth: Optional[int] = None  # layers J of both towers with their own prompts, the image tower's coupled to the text's (MaPLe's PROMPT_DEPTH; default: 9, or every layer of a shallower tower)

    def _validate(self) -> None:
        _require(self.prompt_depth is None or (_is_int(self.prompt_depth) and self.prompt_depth >= 1),
                 f"prompt_depth={self.prompt_depth!r} must be a positive integer (MaPLe uses 9)")


AUX_TARGETS = ("eq10", "gt-only")
TOPK_SOURCES = ("cached", "online")
CAVPT_VARIANTS = ("paper", "released")


@dataclass
class CavptOptions(Options):
    flag_prefix: ClassVar[str] = "cavpt"

    variant: str = field(default="paper", metadata={"choices": CAVPT_VARIANTS})  # "paper": eqs. 9-12 as printed; "released": the authors' code (fanrena/DPT trainers/DPT.py)
    topk: int = 5  # K_N classes per image from zero-shot inference (capped at the class count)
    layers: int = 1  # class-aware prompts in the last `layers` layers
    alpha: float = 1.0  # weight of the auxiliary loss (eq. 12)
    aux_target: Optional[str] = field(default=None, metadata={"choices": AUX_TARGETS})  # "eq10" (paper default): one-hot for the ground-truth output, uniform 1/K for the others; "gt-only" (released: the only choice)
    topk_source: Optional[str] = field(default=None, metadata={"choices": TOPK_SOURCES})  # "cached" (paper default): the trainer supplies per-image top-K; "online" (released: the only choice): recomputed per view
    text_prompt: bool = False  # learn CoOp context too (the paper's VLP-CLIP-CAVPT)
    guidance_epochs: int = 0  # released: "general knowledge guidance" loss for the first C epochs (0: off; the authors' script uses 30)

    def _validate(self) -> None:
        _require(self.variant in CAVPT_VARIANTS, f"variant={self.variant!r} must be one of {', '.join(CAVPT_VARIANTS)}")
        _require(_is_int(self.topk) and self.topk >= 1, f"topk={self.topk!r} must be a positive integer (the paper uses 5)")
        _require(_is_int(self.layers) and self.layers >= 1, f"layers={self.layers!r} must be a positive integer (default 1: the last layer)")
        _require(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha >= 0,
                 f"alpha={self.alpha!r} must be a number >= 0")
        _require(isinstance(self.text_prompt, bool), f"text_prompt={self.text_prompt!r} must be True or False")
        _require(_is_int(self.guidance_epochs) and self.guidance_epochs >= 0,
                 f"guidance_epochs={self.guidance_epochs!r} must be an integer >= 0 (0: no guidance)")
        released = self.variant == "released"
        # the variant decides the defaults it has no choice about (resolved here, so a saved config holds them)
        if self.aux_target is None:
            self.aux_target = "gt-only" if released else "eq10"
        if self.topk_source is None:
            self.topk_source = "online" if released else "cached"
        _require(self.aux_target in AUX_TARGETS, f"aux_target={self.aux_target!r} must be one of {', '.join(AUX_TARGETS)}")
        _require(self.topk_source in TOPK_SOURCES, f"topk_source={self.topk_source!r} must be one of {', '.join(TOPK_SOURCES)}")
        if released:
            _require(self.aux_target == "gt-only",
                     "aux_target='eq10' belongs to variant='paper'; the released code trains its auxiliary classifier on the "
                     "ground-truth rows only: drop aux_target or use variant='paper'")
            _require(self.topk_source == "online",
                     "topk_source='cached' belongs to variant='paper'; the released code recomputes the top-K for every "
                     "augmented view: drop topk_source or use variant='paper'")
            _require(self.guidance_epochs == 0 or self.text_prompt,
                     f"guidance_epochs={self.guidance_epochs} needs text_prompt=True (the guidance pulls the learned text "
                     "toward the zero-shot image features); set text_prompt=True or guidance_epochs=0")
        else:
            _require(self.guidance_epochs == 0,
                     f"guidance_epochs={self.guidance_epochs} is part of variant='released' (the paper does not describe it); "
                     "use variant='released' or guidance_epochs=0")


INFER_MODES = ("ensemble", "soft")
MI_INPUTS = ("probs", "logits")


@dataclass
class E2mimOptions(Options):
    flag_prefix: ClassVar[str] = "e2mim"

    mixup: bool = True  # class-wise visual mixup (False: the --e2mim.no-mixup ablation)
    mixup_alpha: float = 1.0  # λ ~ Beta(mixup_alpha, mixup_alpha)
    mi_weight: float = 1.0  # λ_mi, weight of the InfoNCE term (0 switches it off)
    infer: str = field(default="ensemble", metadata={"choices": INFER_MODES})  # "ensemble": mean of both views' probabilities; "soft": soft view only
    mi_dim: int = 128  # width of the critic heads' shared space
    mi_input: str = field(default="probs", metadata={"choices": MI_INPUTS})  # what the critic heads read of each view: "probs" (softmax; the paper's figure 1) or "logits"

    def _validate(self) -> None:
        _require(isinstance(self.mixup, bool), f"mixup={self.mixup!r} must be True or False")
        _require(isinstance(self.mixup_alpha, (int, float)) and not isinstance(self.mixup_alpha, bool) and self.mixup_alpha > 0,
                 f"mixup_alpha={self.mixup_alpha!r} must be a number > 0")
        _require(isinstance(self.mi_weight, (int, float)) and not isinstance(self.mi_weight, bool) and self.mi_weight >= 0,
                 f"mi_weight={self.mi_weight!r} must be a number >= 0")
        _require(self.infer in INFER_MODES, f"infer={self.infer!r} must be one of {', '.join(INFER_MODES)}")
        _require(_is_int(self.mi_dim) and self.mi_dim >= 1, f"mi_dim={self.mi_dim!r} must be a positive integer")
        _require(self.mi_input in MI_INPUTS, f"mi_input={self.mi_input!r} must be one of {', '.join(MI_INPUTS)}")


@dataclass
class KgcoopOptions(Options):
    flag_prefix: ClassVar[str] = "kgcoop"

    weight: float = 8.0  # w of w·(1 - mean_k cos(t_k, t_k^clip)), the pull toward the hand-crafted class features (8.0: the released scripts' WEIGHT)

    def _validate(self) -> None:
        _require(isinstance(self.weight, (int, float)) and not isinstance(self.weight, bool) and self.weight >= 0,
                 f"weight={self.weight!r} must be a number >= 0 (--kgcoop.weight; 0 trains plain CoOp)")


@dataclass
class ProgradOptions(Options):
    flag_prefix: ClassVar[str] = "prograd"

    projection_weight: float = 1.0  # λ: how much of the cross-entropy gradient's component against the distillation gradient is removed when they conflict (ProGrad's LOSS.LAMBDA)
    temperature: float = 1.0  # T of the distillation term, a soft cross-entropy to zero-shot CLIP's logits, times T² (ProGrad's LOSS.T)
    template_init: bool = True  # the dataset template's words before "{}" fill the last context slots, the rest zeros (ProGrad's CTX_INIT True); False: N(0, 0.02), or --coop.ctx-init's phrase in the last slots

    def _validate(self) -> None:
        for name in ("projection_weight", "temperature"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
                     f"{name}={value!r} must be a number >= 0 (ProGrad uses 1.0)")
        _require(self.temperature > 0, f"temperature={self.temperature!r} must be > 0 (ProGrad uses 1.0)")
        _require(isinstance(self.template_init, bool), f"template_init={self.template_init!r} must be True or False")


@dataclass
class PromptsrcOptions(Options):
    flag_prefix: ClassVar[str] = "promptsrc"

    text_weight: float = 25.0  # λ_text of the L1 between the learned class features and the frozen ones averaged over PromptSRC's 60 templates (TEXT_LOSS_WEIGHT)
    image_weight: float = 10.0  # λ_image of the L1 between the prompted and the frozen image features (IMAGE_LOSS_WEIGHT)
    gpa_mean: float = 15.0  # mean (in epochs, numbered from 1) of the Gaussian whose weights average the prompts over epochs (GPA_MEAN)
    gpa_std: float = 1.0  # standard deviation (in epochs) of that Gaussian (GPA_STD)

    def _validate(self) -> None:
        for name in ("text_weight", "image_weight", "gpa_mean", "gpa_std"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                     f"{name}={value!r} must be a finite number (PromptSRC's base-to-new config: text_weight 25, "
                     "image_weight 10, gpa_mean 15, gpa_std 1)")
        for name in ("text_weight", "image_weight"):
            _require(getattr(self, name) >= 0, f"{name}={getattr(self, name)!r} must be a number >= 0 (0 drops the term)")
        _require(self.gpa_std > 0, f"gpa_std={self.gpa_std!r} must be > 0 (--promptsrc.gpa-std; PromptSRC uses 1 over 20 epochs)")
