"""Named protocols: every default a published table used, in one word (`--protocol NAME`).

A protocol is one table of settings, each with the file or paper section it comes from:
- `TrainConfig` fields (`clip`, `shots`, `classes`, `epochs`, `batch_size`, `lr`, ...);
- `lr.GROUP` / `warmup_epochs.GROUP`: one parameter group's recipe (applied in
  `config.resolve_recipe` to the groups the run trains; a group it does not name keeps its
  own default);
- `options.NAME`: a method option (applied to the methods that have it);
- `method`: the default method, used when the command line gives no `--method` (`--methods`).
A setting may differ per dataset (`by_dataset`, keyed by the sidecar's dataset name, e.g.
CAVPT's K_N or the ImageNet warm-up); `TrainConfig.from_protocol` resolves it from the
dataset's name. A flag given explicitly always wins over the protocol.

A protocol sets the data and the recipe of a published table; the `--method` given decides
what trains under it: `--protocol cocoop-b2n --method coop` trains CoOp on CoCoOp's
base-to-new recipe, `--protocol cavpt --method vpt-deep` VPT-deep on CAVPT's. A protocol whose
table is one method's names it as its default method (`method`: `--protocol maple-b2n` alone
trains MaPLe); `--method` (sweep's `--methods`) given explicitly wins, as every other flag.
`fastprompt protocols` prints these tables; docs/methods.md explains them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from fastprompt.errors import FastpromptError

METHOD_KEY = "method"  # the default method: trains when the command line names none
GROUP_KEYS = ("lr", "warmup_epochs")  # "lr.GROUP", "warmup_epochs.GROUP"
# TrainConfig fields a protocol may set (what a published recipe fixes; not how a run executes)
TRAIN_FIELDS = ("clip", "pretrained", "template", "shots", "classes", "epochs", "batch_size", "optimizer", "lr",
                "warmup_epochs", "warmup_lr", "momentum", "weight_decay")


@dataclass(frozen=True)
class Setting:
    value: Any  # the value on every dataset not in by_dataset
    source: str  # paper section or file of the published code
    by_dataset: Mapping[str, Any] = field(default_factory=dict)  # sidecar dataset name -> value there
    shown: str = ""  # how the table shows the value where the value alone does not say it (e.g. None)

    def at(self, dataset: str) -> Any:
        return self.by_dataset.get(dataset, self.value)

    def text(self) -> str:
        base = self.shown or ("the dataset's" if self.value is None else str(self.value))
        if not self.by_dataset:
            return base
        return base + "; " + ", ".join(f"{name} {value}" for name, value in self.by_dataset.items())


@dataclass(frozen=True)
class Protocol:
    name: str  # the --protocol value
    title: str  # the published table it reproduces
    settings: Mapping[str, Setting]  # key -> setting (keys: see the module docstring)
    notes: tuple[str, ...] = ()  # where fastprompt or the published code differ, what is left to the user

    @property
    def method(self) -> Optional[str]:
        """The method this protocol trains when the command line names none, or None."""
        setting = self.settings.get(METHOD_KEY)
        return None if setting is None else setting.value

    def train_fields(self, dataset: str) -> dict[str, Any]:
        """The `TrainConfig` fields this protocol sets on `dataset`."""
        return {k: s.at(dataset) for k, s in self.settings.items() if k in TRAIN_FIELDS}

    def options(self, dataset: str) -> dict[str, Any]:
        """The method options this protocol sets on `dataset` (every method's; filter by method)."""
        return {k.removeprefix("options."): s.at(dataset) for k, s in self.settings.items() if k.startswith("options.")}

    def group_value(self, what: str, group: str, dataset: str) -> Optional[Any]:
        """This protocol's `what` ("lr" or "warmup_epochs") of parameter group `group` on
        `dataset`, or None where it names no value for that group."""
        setting = self.settings.get(f"{what}.{group}")
        return None if setting is None else setting.at(dataset)


def _check(protocol: Protocol) -> Protocol:
    for key in protocol.settings:
        head, _, tail = key.partition(".")
        ok = key in (*TRAIN_FIELDS, METHOD_KEY) or (head == "options" and tail) or (head in GROUP_KEYS and tail)
        if not ok:
            raise ValueError(f"protocol {protocol.name}: unknown setting {key!r}")
        if key == METHOD_KEY and protocol.settings[key].by_dataset:
            raise ValueError(f"protocol {protocol.name}: the default method is one method on every dataset")
        if head in GROUP_KEYS and tail and head in protocol.settings:
            raise ValueError(f"protocol {protocol.name}: {key} and {head} both set; give one group recipe or every group's")
    return protocol


# ---------------------------------------------------------------------------------- sources
_DASSL_OPTIM = "Dassl.pytorch dassl/config/defaults.py (OPTIM.MOMENTUM, OPTIM.WEIGHT_DECAY)"
_COOP_RN50 = "KaiyangZhou/CoOp configs/trainers/CoOp/rn50.yaml"
_COOP_MD = "KaiyangZhou/CoOp COOP.md"
_COCOOP = "KaiyangZhou/CoOp configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml"
_COCOOP_SH = "KaiyangZhou/CoOp scripts/cocoop/base2new_train.sh"
_DPT_YAML = "fanrena/DPT configs/trainers/VPT/vit_b32_deep.yaml"
_DPT_TRAINER = "fanrena/DPT trainers/DPT.py (DPT.build_model)"
_CAVPT = "CAVPT paper"

# K_N per dataset: the best K_N of the paper's analysis ("Analysis on the length of input text
# class tokens in CAVPT", K_N in {5, 10, 20, 50, 100} on VPT-CLIP-CAVPT); OxfordPets' 37 is all its classes.
CAVPT_TOPK = {"eurosat": 5, "caltech101": 50, "oxford_flowers": 5, "food101": 5, "fgvc_aircraft": 20, "dtd": 5,
              "oxford_pets": 37, "stanford_cars": 100}

_SGD = {
    "optimizer": Setting("sgd", "every recipe here: OPTIM.NAME sgd"),
    "momentum": Setting(0.9, _DASSL_OPTIM),
    "weight_decay": Setting(5e-4, _DASSL_OPTIM),
    "warmup_lr": Setting(1e-5, "OPTIM.WARMUP_CONS_LR of the recipe's config"),
}

COOP = _check(Protocol(
    "coop",
    "CoOp few-shot (Zhou et al., IJCV 2022): Figure 3 / Table 1, RN50",
    {
        "clip": Setting("RN50", f"{_COOP_RN50} MODEL.BACKBONE.NAME (the paper's headline backbone)"),
        "pretrained": Setting("openai", "CLIP's released weights"),
        "template": Setting(None, "KaiyangZhou/CoOp trainers/coop.py CUSTOM_TEMPLATES (the sidecar's template)",
                            shown="the dataset's (CoOp's CUSTOM_TEMPLATES)"),
        "shots": Setting(16, "KaiyangZhou/CoOp scripts/coop/main.sh SHOTS (CoOp runs 1, 2, 4, 8, 16: pass --shots)"),
        "classes": Setting("all", "KaiyangZhou/CoOp scripts/coop/main.sh (every class)"),
        "epochs": Setting(None, f"{_COOP_MD}: rn50_ep50.yaml for 1 shot, rn50_ep100.yaml for 2-4, rn50.yaml for 8-16, "
                                "*_ep50.yaml for ImageNet", shown="by shots: 1 -> 50, 2-4 -> 100, 8-16 -> 200; ImageNet 50"),
        "batch_size": Setting(32, f"{_COOP_RN50} DATALOADER.TRAIN_X.BATCH_SIZE"),
        "lr": Setting(0.002, f"{_COOP_RN50} OPTIM.LR (every group)"),
        "warmup_epochs": Setting(1, f"{_COOP_RN50} OPTIM.WARMUP_EPOCH (every group)"),
        **_SGD,
        "options.n_ctx": Setting(16, f"{_COOP_MD}: `main.sh DATASET rn50 end 16 SHOTS False` (NCTX=16)"),
        "options.csc": Setting(False, f"{_COOP_MD}: CSC False (the unified context of the main results)"),
        "options.ctx_init": Setting(None, f"{_COOP_RN50} (no CTX_INIT: random N(0, 0.02) context)", shown="none"),
    },
    notes=(
        "Class token at the end (CoOp's CLASS_TOKEN_POSITION end, its main results); --coop.class-position middle or "
        "front for the paper's other rows.",
        "RN50 has no ViT tower: with a method that prompts the image tower (vpt-*, vlp, cavpt) add --clip ViT-B-16 "
        "(CoOp's vit_b16 configs share this recipe).",
        "CoOp trains in fp16 (CLIP's half weights); fastprompt's --precision auto is bf16 autocast on CUDA.",
    ),
))

COCOOP_B2N = _check(Protocol(
    "cocoop-b2n",
    "CoCoOp base-to-new generalisation (Zhou et al., CVPR 2022): Table 1, ViT-B/16, train on base, test base and new",
    {
        "method": Setting("cocoop", f"{_COCOOP_SH} TRAINER=CoCoOp (trainers/cocoop.py)"),
        "clip": Setting("ViT-B-16", f"{_COCOOP} MODEL.BACKBONE.NAME"),
        "pretrained": Setting("openai", "CLIP's released weights"),
        "template": Setting(None, "the sidecar's template (CoOp's CUSTOM_TEMPLATES)", shown="the dataset's (CoOp's CUSTOM_TEMPLATES)"),
        "shots": Setting(16, f"{_COCOOP_SH} SHOTS=16"),
        "classes": Setting("base", f"{_COCOOP_SH} DATASET.SUBSAMPLE_CLASSES base (new: `fastprompt eval --classes new`, "
                                   "done at the end of training)"),
        "epochs": Setting(10, f"{_COCOOP} OPTIM.MAX_EPOCH"),
        "batch_size": Setting(1, f"{_COCOOP} DATALOADER.TRAIN_X.BATCH_SIZE"),
        "lr": Setting(0.002, f"{_COCOOP} OPTIM.LR (every group)"),
        "warmup_epochs": Setting(1, f"{_COCOOP} OPTIM.WARMUP_EPOCH (every group)"),
        **_SGD,
        "options.n_ctx": Setting(4, f"{_COCOOP} TRAINER.COCOOP.N_CTX"),
        "options.ctx_init": Setting("a photo of a", f"{_COCOOP} TRAINER.COCOOP.CTX_INIT"),
        "options.csc": Setting(False, "CoCoOp's context is shared"),
    },
    notes=(
        "CoCoOp's own row trains the cocoop method (the default); --method coop, vlp, vpt-deep, cavpt train theirs "
        "on the same recipe. CoOp's row of CoCoOp's Table 1 is CoOp on its own recipe (--protocol coop on ViT-B-16: "
        "MaPLe's README lists that row with 200 epochs; `fastprompt reproduce cocoop-b2n` trains it so).",
        "One learning rate (0.002) and warm-up (1 epoch) for every group, as CoCoOp's single optimiser.",
        "CoCoOp trains in fp16; fastprompt's --precision auto is bf16 autocast on CUDA.",
    ),
))

_KGCOOP = "htyao89/KgCoOp KgCoOp/configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml"
_KGCOOP_SH = "htyao89/KgCoOp KgCoOp/scripts/base2new_train.sh"
_KGCOOP_DASSL = "htyao89/KgCoOp Dassl.ProGrad.pytorch/dassl/config/defaults.py"

KGCOOP_B2N = _check(Protocol(
    "kgcoop-b2n",
    "KgCoOp base-to-new generalisation (Yao et al., CVPR 2023): Table 1, ViT-B/16, train on base, test base and new",
    {
        "method": Setting("kgcoop", f"{_KGCOOP_SH} TRAINER=KgCoOp (trainers/kgcoop.py)"),
        "clip": Setting("ViT-B-16", f"{_KGCOOP} MODEL.BACKBONE.NAME (the script's CFG=vit_b16_ep100_ctxv1)"),
        "pretrained": Setting("openai", "CLIP's released weights"),
        "template": Setting(None, "htyao89/KgCoOp KgCoOp/trainers/kgcoop.py CUSTOM_TEMPLATES (the sidecar's template)",
                            shown="the dataset's (CoOp's CUSTOM_TEMPLATES)"),
        "shots": Setting(16, f"{_KGCOOP_SH} SHOTS=16"),
        "classes": Setting("base", f"{_KGCOOP_SH} DATASET.SUBSAMPLE_CLASSES base (new: `fastprompt eval --classes new`, "
                                   "done at the end of training)"),
        "epochs": Setting(100, f"{_KGCOOP} OPTIM.MAX_EPOCH"),
        "batch_size": Setting(128, f"{_KGCOOP} DATALOADER.TRAIN_X.BATCH_SIZE"),
        "lr": Setting(0.002, f"{_KGCOOP} OPTIM.LR"),
        "warmup_epochs": Setting(1, f"{_KGCOOP} OPTIM.WARMUP_EPOCH (constant)"),
        "optimizer": Setting("sgd", f"{_KGCOOP} OPTIM.NAME"),
        "momentum": Setting(0.9, f"{_KGCOOP_DASSL} OPTIM.MOMENTUM"),
        "weight_decay": Setting(5e-4, f"{_KGCOOP_DASSL} OPTIM.WEIGHT_DECAY"),
        "warmup_lr": Setting(1e-5, f"{_KGCOOP} OPTIM.WARMUP_CONS_LR"),
        "options.n_ctx": Setting(4, f"{_KGCOOP_SH} NCTX=4 (TRAINER.COOP.N_CTX; CTX_INIT's 'a photo of a' is 4 tokens)"),
        "options.ctx_init": Setting("a photo of a", f"{_KGCOOP} TRAINER.COOP.CTX_INIT True (trainers/kgcoop.py then "
                                                    "always uses 'a photo of a')"),
        "options.csc": Setting(False, f"{_KGCOOP_SH} CSC=False"),
        "options.weight": Setting(8.0, "htyao89/KgCoOp KgCoOp/README.md and scripts/run.sh: `bash base2new_train.sh "
                                       "DATASET 8.0` (the script's WEIGHT=$2, TRAINER.COOP.W)"),
    },
    notes=(
        "KgCoOp's own row trains the kgcoop method (the default); --method coop gives CoOp on KgCoOp's recipe.",
        "The reported model is the last epoch's (htyao89/KgCoOp scripts/base2new_test.sh --load-epoch 100): "
        "--final-model last, the default.",
        "KgCoOp trains in fp16 (PREC's default; its hand-crafted features from a second fp16 CLIP); fastprompt's "
        "--precision auto is bf16 autocast on CUDA.",
    ),
))

_PROGRAD = "BeierZhu/Prompt-align ProGrad.public/configs/trainers/ProGrad/rn50_ep100.yaml"
_PROGRAD_SH = "BeierZhu/Prompt-align ProGrad.public/scripts/base2new_train_prograd.sh"

PROGRAD_B2N = _check(Protocol(
    "prograd-b2n",
    "ProGrad base-to-new generalisation (Zhu et al., ICCV 2023): RN50, train on base, test base and new",
    {
        "method": Setting("prograd", f"{_PROGRAD_SH} TRAINER=ProGrad (trainers/prograd.py)"),
        "clip": Setting("RN50", f"{_PROGRAD} MODEL.BACKBONE.NAME"),
        "pretrained": Setting("openai", "CLIP's released weights"),
        "template": Setting(None, "the sidecar's template (CoOp's CUSTOM_TEMPLATES)", shown="the dataset's (CoOp's CUSTOM_TEMPLATES)"),
        "shots": Setting(4, f"{_PROGRAD_SH} SHOTS=4"),
        "classes": Setting("base", f"{_PROGRAD_SH} DATASET.SUBSAMPLE_CLASSES base (new: `fastprompt eval --classes new`, "
                                   "done at the end of training)"),
        "epochs": Setting(100, f"{_PROGRAD} OPTIM.MAX_EPOCH (CFG=rn50_ep100; ImageNet: rn50_ep50, the README)",
                          by_dataset={"imagenet": 50}),
        "batch_size": Setting(32, f"{_PROGRAD} DATALOADER.TRAIN_X.BATCH_SIZE"),
        "lr": Setting(0.002, f"{_PROGRAD} OPTIM.LR"),
        "warmup_epochs": Setting(1, f"{_PROGRAD} OPTIM.WARMUP_EPOCH"),
        **_SGD,
        "options.n_ctx": Setting(16, f"{_PROGRAD_SH} NCTX=16"),
        "options.csc": Setting(False, f"{_PROGRAD_SH} CSC=False"),
        "options.template_init": Setting(True, f"{_PROGRAD} TRAINER.COOP.CTX_INIT True (the template's words in the last slots)"),
    },
    notes=(
        "ProGrad's own options keep their defaults, the script's: --prograd.projection-weight 1.0 (LAMBDA=1.0; the README's "
        "8- and 16-shot Flowers102, DTD and EuroSAT use 0.8) and --prograd.temperature 1.0 (LOSS.T).",
        "The released code rewrote some templates to end in the class ('a type of pet, a photo of a {}.'); fastprompt "
        "keeps the dataset's (CoOp's): where it has words after the class, template_init refuses and names the fix.",
        "--method coop gives CoOp's row on the same recipe (base2new_train_main.sh).",
        "ProGrad trains in fp16 (train.py TRAINER.COOP.PREC fp16: CLIP's half weights, the zero-shot teacher in fp32); "
        "fastprompt's --precision auto is bf16 autocast on CUDA, its loss terms in fp32.",
    ),
))

_PROMPTSRC_REPO = "muzairkhattak/PromptSRC"
_PROMPTSRC_B2N_YAML = f"{_PROMPTSRC_REPO} configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml"
_PROMPTSRC_B2N_SH = f"{_PROMPTSRC_REPO} scripts/promptsrc/base2new_train.sh"
_PROMPTSRC_FS_YAML = f"{_PROMPTSRC_REPO} configs/trainers/PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml"
_PROMPTSRC_FS_SH = f"{_PROMPTSRC_REPO} scripts/promptsrc/few_shot.sh"
# the few-shot config's GPA: GPA_MEAN 30, GPA_STD 30 "for ImageNet, Caltech101, OxfordPets, Food101, UCF101 and SUN397",
# its commented-out 45 and 5 "for StanfordCars, Flowers102, FGVCAircraft, DTD and EuroSAT"
_PROMPTSRC_FS_45_5 = ("stanford_cars", "oxford_flowers", "fgvc_aircraft", "dtd", "eurosat")


def _promptsrc_recipe(yaml: str, script: str, *, shots: Setting, classes: Setting, epochs: int, gpa_mean: Setting,
                      gpa_std: Setting) -> dict:
    """The settings PromptSRC's base-to-novel and few-shot configs share (Dassl's SGD, ViT-B/16, batch 4,
    lr 0.0025 with 1 constant warm-up epoch, IVLP's 4 + 4 prompts to depth 9, the loss weights)."""
    return {
        "method": Setting("promptsrc", f"{script} TRAINER=PromptSRC (trainers/promptsrc.py)"),
        "clip": Setting("ViT-B-16", f"{yaml} MODEL.BACKBONE.NAME"),
        "pretrained": Setting("openai", "CLIP's released weights"),
        "shots": shots,
        "classes": classes,
        "epochs": Setting(epochs, f"{yaml} OPTIM.MAX_EPOCH"),
        "batch_size": Setting(4, f"{yaml} DATALOADER.TRAIN_X.BATCH_SIZE"),
        "lr": Setting(0.0025, f"{yaml} OPTIM.LR (every group: one optimiser)"),
        "warmup_epochs": Setting(1, f"{yaml} OPTIM.WARMUP_EPOCH (every group)"),
        **_SGD,
        "options.n_ctx": Setting(4, f"{yaml} TRAINER.PROMPTSRC.N_CTX_TEXT"),
        "options.ctx_init": Setting("a photo of a", f"{yaml} TRAINER.PROMPTSRC.CTX_INIT"),
        "options.csc": Setting(False, f"{_PROMPTSRC_REPO} trainers/promptsrc.py (one shared context)"),
        "options.text_depth": Setting(9, f"{yaml} TRAINER.PROMPTSRC.PROMPT_DEPTH_TEXT"),
        "options.n_prompts": Setting(4, f"{yaml} TRAINER.PROMPTSRC.N_CTX_VISION"),
        "options.placement": Setting("before-ln-pre", f"{_PROMPTSRC_REPO} clip/model.py (VisionTransformer.forward: "
                                                      "layer 1's visual prompts appended before ln_pre)"),
        "options.vision_depth": Setting(9, f"{yaml} TRAINER.PROMPTSRC.PROMPT_DEPTH_VISION"),
        "options.text_weight": Setting(25.0, f"{yaml} TRAINER.PROMPTSRC.TEXT_LOSS_WEIGHT"),
        "options.image_weight": Setting(10.0, f"{yaml} TRAINER.PROMPTSRC.IMAGE_LOSS_WEIGHT"),
        "options.gpa_mean": gpa_mean,
        "options.gpa_std": gpa_std,
    }


_PROMPTSRC_NOTES = (
    "Depth 9 needs 9 layers in each tower; with a smaller one (--clip fastprompt-tiny) pass --coop.text-depth and "
    "--vpt.vision-depth.",
    "The reported model is GPA's (the Gaussian-weighted average of every epoch's prompts, made after the last epoch), "
    "as the released scripts' --load-epoch of the last epoch: --final-model last, the default.",
    "PromptSRC trains in fp16 (PREC fp16; its text target from an fp32 CLIP); fastprompt's --precision auto is bf16 "
    "autocast on CUDA, its losses in fp32.",
)

PROMPTSRC_B2N = _check(Protocol(
    "promptsrc-b2n",
    "PromptSRC base-to-novel generalisation (Khattak et al., ICCV 2023), ViT-B/16, train on base, test base and new",
    _promptsrc_recipe(
        _PROMPTSRC_B2N_YAML, _PROMPTSRC_B2N_SH,
        shots=Setting(16, f"{_PROMPTSRC_B2N_SH} SHOTS=16"),
        classes=Setting("base", f"{_PROMPTSRC_B2N_SH} DATASET.SUBSAMPLE_CLASSES base (new: `fastprompt eval --classes "
                                "new`, done at the end of training)"),
        epochs=20,
        gpa_mean=Setting(15.0, f"{_PROMPTSRC_B2N_YAML} TRAINER.PROMPTSRC.GPA_MEAN"),
        gpa_std=Setting(1.0, f"{_PROMPTSRC_B2N_YAML} TRAINER.PROMPTSRC.GPA_STD"),
    ),
    notes=("One recipe on every dataset, ImageNet included (its docs/TRAIN.md trains ImageNet for 20 epochs).",
           "--method ivlp gives PromptSRC's independent V-L baseline on the same recipe (4 + 4 prompts to depth 9, no "
           "self-regularisation, no GPA).",
           *_PROMPTSRC_NOTES),
))

PROMPTSRC_FEWSHOT = _check(Protocol(
    "promptsrc-fewshot",
    "PromptSRC few-shot learning (Khattak et al., ICCV 2023), ViT-B/16, all classes, 1 to 16 shots",
    _promptsrc_recipe(
        _PROMPTSRC_FS_YAML, _PROMPTSRC_FS_SH,
        shots=Setting(16, f"{_PROMPTSRC_FS_SH} SHOTS=$2 (docs/TRAIN.md runs 1, 2, 4, 8, 16: pass --shots)"),
        classes=Setting("all", f"{_PROMPTSRC_FS_SH} (no DATASET.SUBSAMPLE_CLASSES: train.py's 'all')"),
        epochs=50,
        gpa_mean=Setting(30.0, f"{_PROMPTSRC_FS_YAML} TRAINER.PROMPTSRC.GPA_MEAN (30 for ImageNet, Caltech101, "
                               "OxfordPets, Food101, UCF101, SUN397; 45 for the others, as its comment says)",
                         by_dataset={name: 45.0 for name in _PROMPTSRC_FS_45_5}),
        gpa_std=Setting(30.0, f"{_PROMPTSRC_FS_YAML} TRAINER.PROMPTSRC.GPA_STD (30; 5 for StanfordCars, Flowers102, "
                              "FGVCAircraft, DTD, EuroSAT, as its comment says)",
                        by_dataset={name: 5.0 for name in _PROMPTSRC_FS_45_5}),
    ),
    notes=("One run per shot count and seed (few_shot.sh: seeds 1, 2, 3): `fastprompt sweep --shots 1,2,4,8,16`.",
           *_PROMPTSRC_NOTES),
))

_CAVPT_SETTINGS = {
    "clip": Setting("ViT-B-32", f"{_CAVPT} §Implementation ('ViT-Base/32'); {_DPT_YAML} MODEL.BACKBONE.NAME"),
    "pretrained": Setting("openai", "CLIP's released weights"),
    "template": Setting(None, "the sidecar's template (CoOp's CUSTOM_TEMPLATES, as fanrena/DPT)",
                        shown="the dataset's (CoOp's CUSTOM_TEMPLATES)"),
    "shots": Setting(16, f"{_CAVPT} §Experiments ('we also adopt the 16 shot')"),
    "classes": Setting("all", f"{_CAVPT} Table 1 (all classes, full test set)"),
    "epochs": Setting(200, f"{_CAVPT} §Implementation ('The maximum epoch is set to 200'; {_DPT_YAML} has "
                           "MAX_EPOCH 100, train_single.sh 60 for 1 shot)"),
    "batch_size": Setting(32, f"{_DPT_YAML} DATALOADER.TRAIN_X.BATCH_SIZE"),
    **_SGD,
    "lr.text": Setting(0.002, f"{_CAVPT} §Implementation (text prompts 'the same as CoOp'); {_DPT_TRAINER}: optim2 LR 0.002"),
    "warmup_epochs.text": Setting(1, f"{_DPT_TRAINER}: optim2 WARMUP_EPOCH 1"),
    "lr.visual": Setting(0.01, f"{_DPT_YAML} OPTIM.LR; fanrena/DPT train_single.sh OPTIM.LR 0.01"),
    "warmup_epochs.visual": Setting(10, f"{_CAVPT} §Implementation ('the first 10 epochs'); {_DPT_TRAINER}: "
                                        "WARMUP_EPOCH 1 when DATASET.NAME is ImageNet", by_dataset={"imagenet": 1}),
    "lr.cavpt": Setting(0.01, f"{_DPT_TRAINER}: the extractor's optimiser takes OPTIM.LR ({_DPT_YAML}: 0.01)"),
    "warmup_epochs.cavpt": Setting(10, f"{_DPT_TRAINER}: the extractor's schedule is the visual prompts'",
                                   by_dataset={"imagenet": 1}),
    "options.variant": Setting("released", "the authors' code (fanrena/DPT trainers/DPT.py), which Table 1's numbers come from"),
    "options.topk": Setting(5, f"{_CAVPT} 'Analysis on the length of input text class tokens': best K_N per dataset "
                               "(fanrena/DPT train.py CPN 5, train_single.sh CPN 10)", by_dataset=CAVPT_TOPK),
    "options.layers": Setting(1, f"{_CAVPT} (CAVPT in the last layer); fanrena/DPT train.py BOTTOMLIMIT 12 of 12"),
    "options.alpha": Setting(1.0, f"{_CAVPT} eq. 12; fanrena/DPT train.py TRAINER.ALPHA 1.0 (fanrena/DPT train_single.sh 0.3)"),
    "options.n_prompts": Setting(10, f"{_CAVPT} §Implementation ('prompt length is set to 10'); fanrena/DPT train_single.sh VPT.N_CTX 10"),
    "options.n_ctx": Setting(16, f"{_CAVPT} §Implementation ('16 context length'); fanrena/DPT train_single.sh COOP.N_CTX 16"),
    "options.csc": Setting(False, "fanrena/DPT train_single.sh TRAINER.COOP.CSC False"),
    "options.ctx_init": Setting(None, "fanrena/DPT train.py COOP.CTX_INIT '' (random context)", shown="none"),
    "options.guidance_epochs": Setting(0, f"{_CAVPT} describes no guidance; fanrena/DPT train.py PRETRAIN.C 30 "
                                          "(pass --cavpt.guidance-epochs 30 with --cavpt.text-prompt)"),
}
_CAVPT_NOTES = (
    "Table 1's rows are methods: VPT-CLIP-Deep is --method vpt-deep, VLP-CLIP-Deep --method vlp, VPT-CLIP-CAVPT "
    "--method cavpt, VLP-CLIP-CAVPT --method cavpt --cavpt.text-prompt.",
    "fanrena/DPT trains in fp16; fastprompt's --precision auto is bf16 autocast on CUDA.",
    "The paper has no ImageNet column; on ImageNet the visual and cavpt groups warm up 1 epoch (fanrena/DPT).",
)

CAVPT = _check(Protocol(
    "cavpt",
    "CAVPT / DPT (Xing et al.): Table 1, ViT-B/32, 16 shots, the released CAVPT module",
    _CAVPT_SETTINGS, notes=_CAVPT_NOTES,
))

CAVPT_PAPER = _check(Protocol(
    "cavpt-paper",
    "CAVPT / DPT (Xing et al.): Table 1's recipe with the CAVPT module as the paper's equations 9-12 print it",
    {**_CAVPT_SETTINGS, "options.variant": Setting("paper", f"{_CAVPT} eqs. 9-12 as printed")},
    notes=_CAVPT_NOTES,
))

_MAPLE_REPO = "muzairkhattak/multimodal-prompt-learning"
_IVLP_YAML = f"{_MAPLE_REPO} configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml"
_IVLP_SH = f"{_MAPLE_REPO} scripts/independent-vlp/base2new_train_ivlp.sh"
_MAPLE_YAML = f"{_MAPLE_REPO} configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml"
_MAPLE_SH = f"{_MAPLE_REPO} scripts/maple/base2new_train_maple.sh"
_MAPLE_XD_YAML = f"{_MAPLE_REPO} configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml"
_MAPLE_XD_SH = f"{_MAPLE_REPO} scripts/maple/xd_train_maple.sh"
_MAPLE_XD_TEST = f"{_MAPLE_REPO} scripts/maple/xd_test_maple.sh"


def _maple_recipe(yaml: str, script: str, *, classes: str, classes_source: str, lr: float, epochs: int, n_ctx: str) -> dict:
    """The settings MaPLe's repository shares between its trainers' configs and scripts
    (Dassl's SGD, ViT-B/16, 16 shots, batch 4, 1 constant warm-up epoch, MaPLe's placement)."""
    return {
        "clip": Setting("ViT-B-16", f"{yaml} MODEL.BACKBONE.NAME"),
        "pretrained": Setting("openai", "CLIP's released weights"),
        "shots": Setting(16, f"{script} SHOTS=16"),
        "classes": Setting(classes, classes_source),
        "epochs": Setting(epochs, f"{yaml} OPTIM.MAX_EPOCH"),
        "batch_size": Setting(4, f"{yaml} DATALOADER.TRAIN_X.BATCH_SIZE"),
        "lr": Setting(lr, f"{yaml} OPTIM.LR (every group: one optimiser)"),
        "warmup_epochs": Setting(1, f"{yaml} OPTIM.WARMUP_EPOCH (every group)"),
        **_SGD,
        "options.n_ctx": Setting(2, f"{yaml} {n_ctx}"),
        "options.ctx_init": Setting("a photo of a", f"{yaml} CTX_INIT (the first n_ctx words learned, the rest kept)"),
        "options.csc": Setting(False, f"{_MAPLE_REPO} train.py (no class-specific context: one shared context)"),
        "options.placement": Setting("before-ln-pre", f"{_MAPLE_REPO} clip/model.py (VisionTransformer*.forward: layer 1's "
                                                      "visual prompts appended before ln_pre)"),
    }


_B2N_CLASSES = "DATASET.SUBSAMPLE_CLASSES base (new: `fastprompt eval --classes new`, done at the end of training)"
_MAPLE_FP16 = "MaPLe's repository trains in fp16 (PREC fp16); fastprompt's --precision auto is bf16 autocast on CUDA."

IVLP_B2N = _check(Protocol(
    "ivlp-b2n",
    "Independent V-L prompting base-to-new generalisation (MaPLe, Khattak et al., CVPR 2023: its IVLP baseline), "
    "ViT-B/16, train on base, test base and new",
    {
        "method": Setting("ivlp", f"{_IVLP_SH} TRAINER=IVLP (trainers/independentVL.py)"),
        **_maple_recipe(_IVLP_YAML, _IVLP_SH, classes="base", classes_source=f"{_IVLP_SH} {_B2N_CLASSES}",
                        lr=0.0035, epochs=5, n_ctx="TRAINER.IVLP.N_CTX_TEXT"),
        "options.text_depth": Setting(12, f"{_IVLP_YAML} TRAINER.IVLP.PROMPT_DEPTH_TEXT"),
        "options.n_prompts": Setting(2, f"{_IVLP_YAML} TRAINER.IVLP.N_CTX_VISION"),
        "options.vision_depth": Setting(12, f"{_IVLP_YAML} TRAINER.IVLP.PROMPT_DEPTH_VISION"),
    },
    notes=(
        "Depth 12 is every layer of ViT-B/16; a tower with fewer layers refuses it: pass --coop.text-depth and "
        "--vpt.vision-depth (e.g. with --clip fastprompt-tiny).",
        "PromptSRC's IVLP baseline (4 + 4 tokens, depth 9): add --coop.n-ctx 4 --vpt.n-prompts 4 --coop.text-depth 9 "
        "--vpt.vision-depth 9.",
        _MAPLE_FP16,
    ),
))

MAPLE_B2N = _check(Protocol(
    "maple-b2n",
    "MaPLe base-to-novel generalisation (Khattak et al., CVPR 2023), ViT-B/16, train on base, test base and new",
    {
        "method": Setting("maple", f"{_MAPLE_SH} TRAINER=MaPLe (trainers/maple.py)"),
        **_maple_recipe(_MAPLE_YAML, _MAPLE_SH, classes="base", classes_source=f"{_MAPLE_SH} {_B2N_CLASSES}",
                        lr=0.0035, epochs=5, n_ctx="TRAINER.MAPLE.N_CTX"),
        "options.prompt_depth": Setting(9, f"{_MAPLE_YAML} TRAINER.MAPLE.PROMPT_DEPTH"),
    },
    notes=(
        "One recipe on every dataset, ImageNet included (5 epochs: MaPLe's docs/RUN.md).",
        "Depth 9 needs 9 layers in each tower; with a smaller one (--clip fastprompt-tiny) pass --maple.prompt-depth.",
        "Under this recipe --method ivlp, vlp or vpt-deep take MaPLe's placement, 2 context tokens and its init phrase "
        "where they have those options.",
        _MAPLE_FP16,
    ),
))

MAPLE_XD = _check(Protocol(
    "maple-xd",
    "MaPLe cross-dataset transfer and domain generalisation (Khattak et al., CVPR 2023), ViT-B/16: train on "
    "ImageNet (16 shots, all classes), evaluate on other datasets and on ImageNet's variants",
    {
        "method": Setting("maple", f"{_MAPLE_XD_SH} TRAINER=MaPLe (trainers/maple.py)"),
        **_maple_recipe(_MAPLE_XD_YAML, _MAPLE_XD_SH, classes="all",
                        classes_source=f"{_MAPLE_XD_SH} (no DATASET.SUBSAMPLE_CLASSES: train.py's 'all')",
                        lr=0.0026, epochs=2, n_ctx="TRAINER.MAPLE.N_CTX"),
        "options.prompt_depth": Setting(3, f"{_MAPLE_XD_YAML} TRAINER.MAPLE.PROMPT_DEPTH"),
    },
    notes=(
        "The source dataset is ImageNet (`xd_train_maple.sh imagenet SEED`): pass ImageNet's .beton as --data; the "
        "protocol trains on the --data given.",
        f"Targets ({_MAPLE_XD_TEST}, the model of the last epoch): `fastprompt eval RUN --data TARGET.beton` (or "
        "`fastprompt sweep --eval-on`) on caltech101, oxford_pets, stanford_cars, ... (cross-dataset) and imagenetv2, "
        "imagenet_sketch, imagenet_a, imagenet_r (domain generalisation).",
        "Depth 3 needs 3 layers in each tower; with a smaller one (--clip fastprompt-tiny) pass --maple.prompt-depth.",
        _MAPLE_FP16,
    ),
))

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (COOP, COCOOP_B2N, KGCOOP_B2N, PROGRAD_B2N, PROMPTSRC_B2N, PROMPTSRC_FEWSHOT,
                                                         CAVPT, CAVPT_PAPER, IVLP_B2N, MAPLE_B2N, MAPLE_XD)}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise FastpromptError(f"unknown protocol '{name}'; choose one of: {', '.join(PROTOCOLS)} (`fastprompt protocols` lists them)")
    return PROTOCOLS[name]


def resolve_method(given: Optional[str], protocol: Optional[str], flag: str = "--method") -> str:
    """The method a command line trains: `given` (`--method`), else the default method of
    `protocol`; FastpromptError naming the fix where there is neither."""
    if given is not None:
        return given
    with_method = ", ".join(p.name for p in PROTOCOLS.values() if p.method is not None)
    if protocol is None:
        raise FastpromptError(f"{flag} is missing; pass {flag} NAME (`fastprompt methods`), or a --protocol that names "
                              f"its method ({with_method})")
    method = get_protocol(protocol).method
    if method is None:
        raise FastpromptError(f"--protocol {protocol} names no default method (it sets the recipe for the method given); "
                              f"pass {flag} NAME (`fastprompt methods`)")
    return method


def flag_of(key: str) -> str:
    """The `fastprompt train` flag of a protocol setting: `--batch-size`, `--lr.visual`, `--cavpt.topk`."""
    head, _, tail = key.partition(".")
    if head == "options":
        from fastprompt.methods.registry import option_flags

        return next((fl.flag for fl in option_flags() if fl.field == tail), f"options.{tail}")
    return "--" + head.replace("_", "-") + (f".{tail}" if tail else "")


def protocol_tables(names: Optional[list[str]] = None) -> list:
    """One rich Table per protocol (setting, value, source), then its notes as the caption."""
    from rich.table import Table

    tables = []
    for name in names or list(PROTOCOLS):
        p = get_protocol(name)
        table = Table(title=f"--protocol {p.name}: {p.title}", title_justify="left", caption_justify="left",
                      caption="\n".join(f"- {note}" for note in p.notes) or None)
        table.add_column("setting", no_wrap=True)
        table.add_column("value")
        table.add_column("source")
        for key, setting in p.settings.items():
            table.add_row(flag_of(key), setting.text(), setting.source)
        tables.append(table)
    return tables


def protocol_markdown() -> str:
    """The protocols as the Markdown docs/methods.md holds them (a test keeps the two equal)."""
    parts = []
    for p in PROTOCOLS.values():
        rows = [f"#### `--protocol {p.name}`", "", p.title + ".", "", "| setting | value | source |", "|---|---|---|"]
        rows += [f"| `{flag_of(k)}` | {s.text()} | {s.source} |" for k, s in p.settings.items()]
        rows += [""] + [f"- {note}" for note in p.notes]
        parts.append("\n".join(rows))
    return "\n\n".join(parts) + "\n"
