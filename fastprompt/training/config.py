"""The typed run configuration of `fastprompt train`, validated field by field.

Defaults follow SPEC.md: SGD with momentum, cosine decay, a constant warm-up at 1e-5
(10 epochs for visual-prompt methods, as the CAVPT paper; 1 for text-only methods, as
CoOp), CoOp's learning rate 0.002 and batch 32, and CoOp's epochs by shots (200 for 16
shots, 100 for 4-8, 50 for 1-2).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from fastprompt.errors import FastpromptError
from fastprompt.runtime import DEVICES, PRECISIONS
from fastprompt.validation import check_int, check_number

CLASS_CHOICES = ("all", "base", "new")
OPTIMIZERS = ("sgd", "adamw")
COMPILE_CHOICES = ("auto", "off", "default", "reduce-overhead", "max-autotune")  # the last three: inductor modes
COMPILE_BACKENDS = ("inductor", "aot_eager")  # aot_eager: dynamo + AOTAutograd without code generation (tests, debugging)
VISUAL_METHODS = ("vpt-shallow", "vpt-deep", "vlp", "cavpt")
FROZEN_TOWER_METHODS = ("coop", "e2mim")


@dataclass
class TrainConfig:
    method: str  # a name from fastprompt.list_methods()
    data: str  # path of a .beton (its sidecar .json beside it)
    out: str  # run directory: config.json, metrics.jsonl, checkpoint.pt, prompts.safetensors, results.json
    clip: str = "ViT-B-32"  # open_clip model name, or fastprompt-tiny
    pretrained: Optional[str] = "openai"  # open_clip tag, checkpoint file, or None / "none" (random weights)
    template: Optional[str] = None  # hand-crafted template; None: the dataset's; "ensemble": CLIP's 7 templates
    shots: Optional[int] = 16  # training images per class; None: every training image
    seed: int = 1  # few-shot sample, prompt init, data order and augmentation
    classes: str = "all"  # "all", or "base" (train on base, evaluate base and new: base-to-new)
    epochs: Optional[int] = None  # None: CoOp's schedule by shots (200 / 100 / 50)
    batch_size: int = 32  # global batch (split over ranks under torchrun)
    optimizer: str = "sgd"  # "sgd" (the papers', with momentum) or "adamw"
    lr: float = 0.002  # peak learning rate (CoOp)
    warmup_epochs: Optional[int] = None  # None: 10 (visual prompts) or 1 (text only), at most epochs // 10
    warmup_lr: float = 1e-5  # constant learning rate during warm-up
    momentum: float = 0.9
    weight_decay: float = 5e-4
    device: str = "auto"  # auto: cuda when available
    precision: str = "auto"  # auto: bf16 autocast on cuda, fp32 on cpu
    backend: str = "fast"  # "fast" or "reference" (the eager oracle)
    num_workers: Optional[int] = None  # loader threads; None: the available cores
    checkpoint_every: int = 1  # epochs between checkpoints (0: only at the end)
    eval_batch_size: int = 128
    feature_cache: int = 0  # coop / e2mim: cache V augmented views of the frozen image features (0: off)
    compile: str = "auto"  # torch.compile of the training step: auto (default mode on cuda, off on cpu), off, or a mode
    compile_backend: str = "inductor"  # dynamo backend; aot_eager skips code generation (tests)
    options: dict = field(default_factory=dict)  # method options, e.g. {"topk": 5, "n_prompts": 10}

    def __post_init__(self) -> None:
        from fastprompt.methods import list_methods

        if self.method not in list_methods():
            raise FastpromptError(f"unknown method '{self.method}'; choose one of: {', '.join(list_methods())}")
        if self.method == "zeroshot":
            raise FastpromptError("zeroshot has nothing to train; evaluate it with `fastprompt zeroshot --data ...`")
        from fastprompt.methods import method_config

        method_config(self.method, **self.options)  # unknown or bad method options fail here, before any file is written
        check_int("shots", self.shots, allow_none=True)
        check_int("seed", self.seed, minimum=0)
        if self.classes not in ("all", "base"):
            raise FastpromptError(
                f"classes={self.classes!r}: training takes 'all' or 'base' (base-to-new); evaluate on 'new' with `fastprompt eval`"
            )
        check_int("epochs", self.epochs, allow_none=True)
        check_int("batch_size", self.batch_size)
        check_int("eval_batch_size", self.eval_batch_size)
        check_number("lr", self.lr, strict=True)
        check_int("warmup_epochs", self.warmup_epochs, allow_none=True, minimum=0)
        check_number("warmup_lr", self.warmup_lr)
        check_number("momentum", self.momentum)
        check_number("weight_decay", self.weight_decay)
        check_int("checkpoint_every", self.checkpoint_every, minimum=0)
        check_int("num_workers", self.num_workers, allow_none=True)
        check_int("feature_cache", self.feature_cache, minimum=0)
        if self.feature_cache and self.method not in FROZEN_TOWER_METHODS:
            raise FastpromptError(
                f"feature_cache needs a frozen image tower ({', '.join(FROZEN_TOWER_METHODS)}); {self.method} prompts it, drop --feature-cache"
            )
        if self.compile not in COMPILE_CHOICES:
            raise FastpromptError(f"compile={self.compile!r} must be one of {', '.join(COMPILE_CHOICES)}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise FastpromptError(f"compile_backend={self.compile_backend!r} must be one of {', '.join(COMPILE_BACKENDS)}")
        if self.compile_backend != "inductor" and self.compile not in ("default", "off", "auto"):
            raise FastpromptError(f"compile={self.compile!r} is an inductor mode; compile_backend={self.compile_backend!r} takes 'default'")
        if self.optimizer not in OPTIMIZERS:
            raise FastpromptError(f"optimizer={self.optimizer!r} must be one of {', '.join(OPTIMIZERS)}")
        if self.device not in DEVICES:
            raise FastpromptError(f"device={self.device!r} must be one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise FastpromptError(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if isinstance(self.pretrained, str) and self.pretrained.lower() == "none":
            self.pretrained = None
        if self.epochs is None:
            shots = self.shots or 16
            self.epochs = 50 if shots <= 2 else 100 if shots <= 8 else 200
        if self.warmup_epochs is None:
            self.warmup_epochs = min(10 if self.method in VISUAL_METHODS else 1, self.epochs // 10)
        if self.warmup_epochs >= self.epochs:
            raise FastpromptError(
                f"warmup_epochs={self.warmup_epochs} leaves no epoch of the {self.epochs} for the cosine schedule; lower it"
            )

    def compile_mode(self, device_type: str) -> Optional[str]:
        """The torch.compile mode of the training step on this device, or None for eager.

        auto compiles on CUDA only: on CPU a cold inductor compile costs a minute or two of
        C++ compilation (measured), longer than a whole few-shot run of the tiny config."""
        if self.compile == "off" or (self.compile == "auto" and device_type != "cuda"):
            return None
        return "default" if self.compile == "auto" else self.compile

    def lr_at(self, epoch: int) -> float:
        """Learning rate of epoch `epoch` (0-based): constant warm-up, then cosine to 0."""
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        span = self.epochs - self.warmup_epochs
        return 0.5 * self.lr * (1 + math.cos(math.pi * (epoch - self.warmup_epochs) / span))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
