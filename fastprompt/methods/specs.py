"""The built-in methods' declarations: what each method is, without torch.

One `MethodSpec` per method (`fastprompt.methods.registry`): its options dataclass, the
parameter groups it trains with their default recipe and its source, whether its image tower
stays frozen, whether its runs train packed (`packs`, fastprompt.training.pack), a one-line summary and the paper (`fastprompt methods` prints them). The model
of each method lives in its own module (`fastprompt.methods.NAME`), bound to its spec by
`@register_method(NAME)` and imported on first use. Kept torch-free so that a command line is
parsed and checked (names, flags, values, the whole `TrainConfig`) before torch loads; the
order here is `fastprompt.list_methods()`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from fastprompt.settings import PLACEMENTS
from fastprompt.errors import FastpromptError
from fastprompt.methods.options import (CavptOptions, ClassPositionOptions, CoopOptions, E2mimOptions, KgcoopOptions,
                                        MapleOptions, Options, PlacementOptions, ProgradOptions, PromptsrcOptions,
                                        TextDepthOptions, VisualDepthOptions, VisualOptions)
from fastprompt.methods.registry import MethodSpec, ParamGroup, declare
from fastprompt.validation import require

# ------------------------------------------------------------------ parameter groups
# CoOp's recipe for the learnable text context (CoOp configs/trainers/CoOp/*.yaml).
TEXT_GROUP = ParamGroup("text", lr=0.002, warmup_epochs=1,
                        source="CoOp configs/trainers/CoOp/rn50.yaml: OPTIM.LR 0.002, WARMUP_EPOCH 1, WARMUP_CONS_LR 1e-5")
# The CAVPT authors' recipe for VPT prompts (fanrena/DPT configs/trainers/VPT/vit_b32_deep.yaml),
# with 1 warm-up epoch on ImageNet as in their ImageNet runs.
VISUAL_GROUP = ParamGroup("visual", lr=0.01, warmup_epochs=10, imagenet_warmup_epochs=1,
                          source="fanrena/DPT configs/trainers/VPT/vit_b32_deep.yaml: OPTIM.LR 0.01, WARMUP_EPOCH 10")
# The class-aware module and its auxiliary classifier: the VPT prompts' recipe in the authors'
# code (one optimiser over the whole prompt learner; fanrena/DPT configs/trainers/VPT/vit_b32_deep.yaml).
CAVPT_GROUP = ParamGroup("cavpt", lr=0.01, warmup_epochs=10, imagenet_warmup_epochs=1,
                         source="fanrena/DPT configs/trainers/VPT/vit_b32_deep.yaml: OPTIM.LR 0.01, WARMUP_EPOCH 10")
# The MI critic (heads h_s, h_h and the InfoNCE temperature). No E2MIM code is public; the critic
# is trained jointly with the CoOp context on one objective from the first step, so it takes
# CoOp's text recipe (lr 0.002, 1 warm-up epoch) rather than the visual prompts' larger one:
# one recipe for the whole E2MIM objective, as CoOp-family code trains its prompt learner.
E2MIM_GROUP = ParamGroup("e2mim", lr=0.002, warmup_epochs=1, source="our choice: CoOp's text recipe (no E2MIM code is public)")
_IVLP_YAML = "muzairkhattak/multimodal-prompt-learning configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml"
IVLP_TEXT_GROUP = ParamGroup("text", lr=0.0035, warmup_epochs=1, source=f"{_IVLP_YAML}: OPTIM.LR 0.0035, WARMUP_EPOCH 1")
IVLP_VISUAL_GROUP = ParamGroup("visual", lr=0.0035, warmup_epochs=1, source=f"{_IVLP_YAML}: OPTIM.LR 0.0035, WARMUP_EPOCH 1")
_MAPLE_YAML = "muzairkhattak/multimodal-prompt-learning configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml"
MAPLE_TEXT_GROUP = ParamGroup("text", lr=0.0035, warmup_epochs=1, source=f"{_MAPLE_YAML}: OPTIM.LR 0.0035, WARMUP_EPOCH 1")
MAPLE_VISUAL_GROUP = ParamGroup("visual", lr=0.0035, warmup_epochs=1,
                                source=f"{_MAPLE_YAML}: OPTIM.LR 0.0035, WARMUP_EPOCH 1 (the coupling functions)")


# ------------------------------------------------------------------ options of each method
@dataclass
class ZeroShotConfig(Options):
    """Zero-shot CLIP has no options."""


@dataclass
class CoopConfig(ClassPositionOptions, TextDepthOptions, CoopOptions):
    def _validate(self) -> None:
        if self.class_position != "end" and self.text_depth != 1:
            raise FastpromptError(f"class_position={self.class_position!r} needs text_depth=1 (deeper layers replace the "
                                  "context at CoOp's positions); drop --coop.text-depth or use class_position='end'")


@dataclass
class VptConfig(VisualOptions):
    pass


@dataclass
class VptDeepConfig(VisualDepthOptions, VisualOptions):
    pass


@dataclass
class VlpConfig(VisualDepthOptions, VisualOptions, TextDepthOptions, CoopOptions):
    pass


@dataclass
class CavptConfig(CavptOptions, VisualOptions, CoopOptions):
    def _validate(self) -> None:
        if not self.text_prompt:
            for name in ("n_ctx", "ctx_init"):
                if getattr(self, name) is not None:
                    raise FastpromptError(f"{name} needs text_prompt=True (CAVPT's text side is hand-crafted otherwise)")
            if self.csc:
                raise FastpromptError("csc needs text_prompt=True (CAVPT's text side is hand-crafted otherwise)")

    @classmethod
    def unused_fields(cls, options: dict) -> set[str]:
        return set() if options.get("text_prompt") else set(CoopOptions.field_names())


@dataclass
class E2mimConfig(E2mimOptions, CoopOptions):
    pass


@dataclass
class IvlpConfig(VisualDepthOptions, VisualOptions, TextDepthOptions, CoopOptions):
    n_ctx: Optional[int] = 2  # N_CTX_TEXT
    ctx_init: Optional[str] = "a photo of a"  # CTX_INIT
    text_depth: Optional[int] = None  # PROMPT_DEPTH_TEXT 12: every layer
    n_prompts: int = 2  # N_CTX_VISION
    placement: str = field(default="before-ln-pre", metadata={"choices": PLACEMENTS})  # clip/model.py VisionTransformer
    vision_depth: Optional[int] = None  # PROMPT_DEPTH_VISION 12: every layer


@dataclass
class MapleConfig(PlacementOptions, MapleOptions, CoopOptions):
    n_ctx: Optional[int] = 2  # N_CTX
    ctx_init: Optional[str] = "a photo of a"  # CTX_INIT
    placement: str = field(default="before-ln-pre", metadata={"choices": PLACEMENTS})  # VisionTransformer_MaPLe

    def _validate(self) -> None:
        if self.csc:
            raise FastpromptError("csc=True: MaPLe couples one context shared by every class to the image tower; "
                                  "drop csc (--coop.shared)")


N_CTX = 4  # CoCoOp: vit_b16_c4_ep10_batch1_ctxv1.yaml TRAINER.COCOOP.N_CTX
_COCOOP_YAML = "KaiyangZhou/CoOp configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml"
COCOOP_TEXT_GROUP = ParamGroup("text", lr=0.002, warmup_epochs=1,
                               source=f"{_COCOOP_YAML}: OPTIM.LR 0.002, WARMUP_EPOCH 1 (constant 1e-5)")
COCOOP_META_GROUP = ParamGroup("meta", lr=0.002, warmup_epochs=1,
                               source=f"{_COCOOP_YAML}: OPTIM.LR 0.002, WARMUP_EPOCH 1 (constant 1e-5; the meta-net, "
                                      "in the context's optimiser)")


def context_words(ctx_init: str) -> list[str]:
    """The words CoCoOp counts in `ctx_init` (`ctx_init.replace("_", " ").split(" ")`)."""
    return ctx_init.replace("_", " ").split(" ")


@dataclass
class CocoopConfig(CoopOptions):
    n_ctx: Optional[int] = None  # N_CTX: 4 without ctx_init; with it the phrase's word count
    ctx_init: Optional[str] = "a photo of a"  # CTX_INIT

    def _validate(self) -> None:
        if self.csc is True:
            raise FastpromptError("csc=True: CoCoOp's context is shared by every class (the meta-net shifts it per "
                                  "image); drop csc (--coop.shared)")
        if isinstance(self.ctx_init, str) and self.ctx_init.strip():
            words = context_words(self.ctx_init)
            require(all(words), f"ctx_init={self.ctx_init!r}: CoCoOp learns one context token per word of "
                                "ctx_init.split(' '); separate its words by single spaces")
            require(self.n_ctx is None or self.n_ctx == len(words),
                    f"n_ctx={self.n_ctx!r} contradicts ctx_init={self.ctx_init!r} ({len(words)} words): CoCoOp's "
                    "ctx_init sets the context length, one token per word; drop n_ctx or give a phrase of "
                    f"{self.n_ctx!r} words")


KGCOOP_PHRASE = "a photo of a"  # KgCoOp trainers/kgcoop.py PromptLearner: `temp = 'a photo of a'` whatever CTX_INIT says
KGCOOP_N_CTX = 4  # KgCoOp scripts/base2new_train.sh NCTX=4 (the context length without ctx_init)
_KGCOOP_YAML = "htyao89/KgCoOp KgCoOp/configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml"
KGCOOP_TEXT_GROUP = ParamGroup("text", lr=0.002, warmup_epochs=1,
                               source=f"{_KGCOOP_YAML}: OPTIM.LR 0.002, WARMUP_EPOCH 1 (constant 1e-5)")


@dataclass
class KgcoopConfig(KgcoopOptions, CoopOptions):
    n_ctx: Optional[int] = None  # N_CTX: 4 (the script's NCTX; "a photo of a" is 4 tokens)
    ctx_init: Optional[str] = KGCOOP_PHRASE  # CTX_INIT True: the released code's fixed phrase

    def _validate(self) -> None:
        if self.ctx_init is None:
            return
        require(self.ctx_init.replace("_", " ") == KGCOOP_PHRASE,
                f"ctx_init={self.ctx_init!r}: KgCoOp's released code initialises its context from {KGCOOP_PHRASE!r} "
                f"whatever CTX_INIT says; drop --coop.ctx-init (or pass ctx_init=None for N(0, 0.02) context)")
        require(self.n_ctx is None or self.n_ctx == KGCOOP_N_CTX,
                f"n_ctx={self.n_ctx!r} contradicts ctx_init={self.ctx_init!r} ({KGCOOP_N_CTX} tokens): KgCoOp's phrase sets "
                "the context length; drop n_ctx, or pass ctx_init=None for n_ctx random tokens")
        require(not self.csc, "csc=True with ctx_init: KgCoOp's phrase initialises one context shared by every class "
                              "(the released code ignores CSC then); drop csc (--coop.shared), or pass ctx_init=None")


_PROGRAD_YAML = "BeierZhu/Prompt-align ProGrad.public/configs/trainers/ProGrad/rn50_ep100.yaml"
PROGRAD_TEXT_GROUP = ParamGroup("text", lr=0.002, warmup_epochs=1,
                                source=f"{_PROGRAD_YAML}: OPTIM.LR 0.002, WARMUP_EPOCH 1 (constant 1e-5)")


@dataclass
class ProgradConfig(ProgradOptions, CoopOptions):
    n_ctx: Optional[int] = 16  # N_CTX (scripts/base2new_train_prograd.sh NCTX=16); an init phrase fills its last slots

    def _validate(self) -> None:
        if self.template_init and self.ctx_init is not None:
            raise FastpromptError(f"ctx_init={self.ctx_init!r} and template_init=True both set ProGrad's init phrase; "
                                  "drop --coop.ctx-init (the dataset template's words) or pass --prograd.no-template-init")
        if self.csc and (self.template_init or self.ctx_init is not None):
            raise FastpromptError("csc=True with an init phrase: ProGrad's phrase init is one context shared by every "
                                  "class; drop csc (--coop.shared) or pass --prograd.no-template-init without ctx_init")


PROMPTSRC_DEPTH = 9  # muzairkhattak/PromptSRC vit_b16_c2_ep20_batch4_4+4ctx.yaml PROMPT_DEPTH_TEXT / PROMPT_DEPTH_VISION
_PROMPTSRC_YAML = "muzairkhattak/PromptSRC configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml"
PROMPTSRC_TEXT_GROUP = ParamGroup("text", lr=0.0025, warmup_epochs=1,
                                  source=f"{_PROMPTSRC_YAML}: OPTIM.LR 0.0025, WARMUP_EPOCH 1 (constant 1e-5)")
PROMPTSRC_VISUAL_GROUP = ParamGroup("visual", lr=0.0025, warmup_epochs=1,
                                    source=f"{_PROMPTSRC_YAML}: OPTIM.LR 0.0025, WARMUP_EPOCH 1 (constant 1e-5; one optimiser)")


@dataclass
class PromptsrcConfig(PromptsrcOptions, VisualDepthOptions, VisualOptions, TextDepthOptions, CoopOptions):
    n_ctx: Optional[int] = 4  # N_CTX_TEXT
    ctx_init: Optional[str] = "a photo of a"  # CTX_INIT
    text_depth: Optional[int] = None  # PROMPT_DEPTH_TEXT 9 (every layer of a shallower tower)
    n_prompts: int = 4  # N_CTX_VISION
    placement: str = field(default="before-ln-pre", metadata={"choices": PLACEMENTS})  # clip/model.py VisionTransformer
    vision_depth: Optional[int] = None  # PROMPT_DEPTH_VISION 9 (every layer of a shallower tower)

    def _validate(self) -> None:
        if self.csc:
            raise FastpromptError("csc=True: PromptSRC learns one context shared by every class (its text target is "
                                  "per class, its prompts are not); drop csc (--coop.shared)")


def _cavpt_trains(config: CavptConfig) -> tuple:
    """CAVPT trains the text context only with text_prompt=True."""
    return tuple(g for g in (TEXT_GROUP, VISUAL_GROUP, CAVPT_GROUP) if g is not TEXT_GROUP or config.text_prompt)


# ------------------------------------------------------------------ the methods, in list_methods() order
_M = "fastprompt.methods."
declare(MethodSpec("zeroshot", ZeroShotConfig, groups=(), frozen_image_tower=True, module=_M + "zeroshot",
                   summary="hand-crafted prompts, nothing trained",
                   paper="Radford et al., ICML 2021 (CLIP)"))
declare(MethodSpec("coop", CoopConfig, groups=(TEXT_GROUP,), frozen_image_tower=True, module=_M + "coop",
                   packs=True, summary="learnable text context, frozen image tower",
                   paper="Zhou et al., IJCV 2022 (CoOp; KaiyangZhou/CoOp trainers/coop.py)"))
declare(MethodSpec("vpt-shallow", VptConfig, groups=(VISUAL_GROUP,), frozen_image_tower=False, module=_M + "vpt",
                   packs=True, summary="visual prompts at the image tower's input, carried through every layer",
                   paper="Jia et al., ECCV 2022 (VPT) on CLIP, as in the CAVPT and MaPLe code"))
declare(MethodSpec("vpt-deep", VptDeepConfig, groups=(VISUAL_GROUP,), frozen_image_tower=False, module=_M + "vpt",
                   packs=True, summary="visual prompts replaced in every layer of the image tower",
                   paper="Jia et al., ECCV 2022 (VPT) on CLIP, as in fanrena/DPT trainers/VPT.py"))
declare(MethodSpec("vlp", VlpConfig, groups=(TEXT_GROUP, VISUAL_GROUP), frozen_image_tower=False, module=_M + "vlp",
                   packs=True, summary="CoOp text context and VPT-deep visual prompts learned together",
                   paper="Xing et al., IEEE TMM 2023 (the CAVPT paper's VLP-CLIP)"))
declare(MethodSpec("cavpt", CavptConfig, groups=(TEXT_GROUP, VISUAL_GROUP, CAVPT_GROUP), frozen_image_tower=False,
                   module=_M + "cavpt", trains=_cavpt_trains,
                   summary="class-aware visual prompts from the zero-shot top-K classes' text features",
                   paper="Xing et al., IEEE TMM 2023 (Dual Modality Prompt Tuning; fanrena/DPT trainers/DPT.py)"))
declare(MethodSpec("e2mim", E2mimConfig, groups=(TEXT_GROUP, E2MIM_GROUP), frozen_image_tower=True, module=_M + "e2mim",
                   summary="CoOp context with class-wise mixup and an InfoNCE bound between soft and hand-crafted views",
                   paper="Zhang, Generalizable Prompt Tuning for VLMs (E2MIM; our reading of the abstract)"))
declare(MethodSpec("cocoop", CocoopConfig, groups=(COCOOP_TEXT_GROUP, COCOOP_META_GROUP), frozen_image_tower=True,
                   module=_M + "cocoop",
                   summary="CoOp context shifted per image by a meta-net of the image feature",
                   paper="Zhou et al., CVPR 2022 (CoCoOp; KaiyangZhou/CoOp trainers/cocoop.py)"))
declare(MethodSpec("kgcoop", KgcoopConfig, groups=(KGCOOP_TEXT_GROUP,), frozen_image_tower=True, module=_M + "kgcoop",
                   packs=True, summary="CoOp context pulled toward the hand-crafted class features: CE + w (1 - mean_k cos(t_k, t_k^clip))",
                   paper="Yao et al., CVPR 2023 (KgCoOp; htyao89/KgCoOp KgCoOp/trainers/kgcoop.py)"))
declare(MethodSpec("prograd", ProgradConfig, groups=(PROGRAD_TEXT_GROUP,), frozen_image_tower=True,
                   module=_M + "prograd",
                   summary="CoOp context stepped along the cross-entropy gradient less its part against distillation to zero-shot CLIP",
                   paper="Zhu et al., ICCV 2023 (ProGrad; BeierZhu/Prompt-align ProGrad.public/trainers/prograd.py)"))
declare(MethodSpec("promptsrc", PromptsrcConfig, groups=(PROMPTSRC_TEXT_GROUP, PROMPTSRC_VISUAL_GROUP),
                   frozen_image_tower=False, module=_M + "promptsrc",
                   summary="IVLP deep prompts held to frozen CLIP (L1 on both features, KL on the logits), "
                           "averaged over epochs with Gaussian weights",
                   paper="Khattak et al., ICCV 2023 (PromptSRC; muzairkhattak/PromptSRC trainers/promptsrc.py)"))
declare(MethodSpec("ivlp", IvlpConfig, groups=(IVLP_TEXT_GROUP, IVLP_VISUAL_GROUP), frozen_image_tower=False,
                   module=_M + "ivlp",
                   packs=True, summary="deep text and deep visual prompts learned independently",
                   paper="Khattak et al., CVPR 2023 (MaPLe's IVLP baseline; trainers/independentVL.py)"))
declare(MethodSpec("maple", MapleConfig, groups=(MAPLE_TEXT_GROUP, MAPLE_VISUAL_GROUP), frozen_image_tower=False,
                   module=_M + "maple",
                   summary="deep text prompts, the visual prompts coupled to them by a linear map per layer",
                   paper="Khattak et al., CVPR 2023 (MaPLe; muzairkhattak/multimodal-prompt-learning trainers/maple.py)"))
