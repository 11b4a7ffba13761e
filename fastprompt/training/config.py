"""The typed run configuration of `fastprompt train`, validated field by field.

Defaults follow the papers' code: SGD (momentum 0.9, weight decay 5e-4) with one param
group per trainable part, each with its own peak lr and warm-up (the method's `ParamGroup`
defaults: text 0.002 / 1 epoch as CoOp; visual prompts and the CAVPT module 0.01 / 10
epochs, 1 on ImageNet, as the CAVPT authors), Dassl's schedule (`dassl_lr`), batch 32, and
CoOp's epochs by shots (`default_epochs`).

A `TrainConfig` holds what the user asked for; `resolve_recipe` fills in what depends on the
dataset and the method (epochs, every group's lr and warm-up, every method option), once per
run, called by `fastprompt.training.plan.plan_run`; the result is what a run directory's
config.json holds. `TrainConfig.from_protocol(NAME, ...)` (the
CLI's `--protocol NAME`) starts from a published recipe (`fastprompt.training.protocols`)
instead of these defaults; what is given explicitly wins. docs/methods.md lists the sources.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from fastprompt.data.decoded import parse_cache_setting
from fastprompt.errors import FastpromptError
from fastprompt.methods.registry import METHODS, ParamGroup
from fastprompt.settings import BACKENDS, DEVICES, PRECISIONS, SEED_MAX
from fastprompt.validation import check_int, check_number, require

CLASS_CHOICES = ("all", "base", "new")
TRAIN_CLASSES = ("all", "base")  # training: every class, or the base half (base-to-new)
OPTIMIZERS = ("sgd", "adamw")
COMPILE_CHOICES = ("auto", "off", "default", "reduce-overhead", "max-autotune")  # the last three: inductor modes
NAN_POLICIES = ("stop", "skip")
FINAL_MODELS = ("last", "best-val")  # the model results.json reports (Dassl's TEST.FINAL_MODEL last_step | best_val)
COMPILE_BACKENDS = ("inductor", "aot_eager")  # aot_eager: dynamo + AOTAutograd without code generation (tests, debugging)
# The largest batch: 2**21 images, more than ImageNet-1k's 1.28 M training images, so no dataset's whole training split
# is refused; a larger number is a typo. (A batch larger than the run's training subset is the subset: the Trainer's
# loader never allocates more.)
MAX_BATCH = 2**21
# The largest learning rate: each group's lr is a float32 tensor on the device (the fused optimisers read it there)
MAX_LR = float(np.finfo(np.float32).max)


def _check_lr(name: str, value: Any, strict: bool = True, allow_none: bool = False) -> None:
    """A learning rate: a finite number > 0 (>= 0 unless `strict`) that a float32 holds."""
    check_number(name, value, strict=strict, allow_none=allow_none)
    require(value is None or value <= MAX_LR,
            f"{name}={value!r} must be a number {'>' if strict else '>='} 0 and at most {MAX_LR:.4g} (a float32 holds it)")


def default_epochs(shots: Optional[int], dataset: str) -> int:
    """CoOp's epochs by shots (its README and configs rn50_ep50 / rn50_ep100 / rn50): 1 shot 50,
    2 and 4 shots 100, 8 and 16 shots 200, ImageNet 50 at every shot count. Counts CoOp never
    ran: 3 takes 100, 5-7 and more than 16 (or every image, shots=None) take 200."""
    if dataset == "imagenet":
        return 50
    shots = 16 if shots is None else shots
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


def dassl_lr(epoch: int, *, lr: float, warmup_epochs: int, epochs: int, warmup_lr: float) -> float:
    """The learning rate of 0-based `epoch` under Dassl's schedule:

        lr(e) = warmup_lr                              for e < W
        lr(e) = ½ · lr · (1 + cos(π · (e − W) / E))    for e ≥ W,   E = epochs

    Source: Dassl.pytorch dassl/optim/lr_scheduler.py, `ConstantWarmupScheduler(successor=
    CosineAnnealingLR(optimizer, T_max=MAX_EPOCH), warmup_epoch=W, cons_lr=WARMUP_CONS_LR)`
    with WARMUP_RECOUNT=True (the default), stepped once at the end of every epoch: epochs
    0..W-1 train at cons_lr; the cosine starts at its epoch 0 (the full lr) in epoch W and
    its T_max is the total epoch count, so it never reaches zero within the run."""
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


@dataclass
class TrainConfig:
    method: str  # a name from fastprompt.list_methods()
    data: str  # path of a .beton (its sidecar .json beside it)
    out: str  # run directory: config.json, metrics.jsonl, checkpoint.json (+ tensors), prompts.safetensors, results.json
    protocol: Optional[str] = None  # the named recipe the settings come from (`from_protocol`); resolve_recipe takes its group recipe
    clip: str = "ViT-B-32"  # open_clip model name, or fastprompt-tiny
    pretrained: Optional[str] = "openai"  # open_clip tag, checkpoint file, or None / "none" (random weights)
    template: Optional[str] = None  # hand-crafted template; None: the dataset's; "ensemble": CLIP's 7 templates
    shots: Optional[int] = 16  # training images per class; None: every training image
    seed: int = 1  # few-shot sample, prompt init, data order and augmentation
    classes: str = "all"  # "all", or "base" (train on base, evaluate base and new: base-to-new)
    epochs: Optional[int] = None  # None: CoOp's by shots (1: 50, 2-4: 100, 8-16: 200; ImageNet 50)
    batch_size: int = 32  # global batch (split over ranks under torchrun)
    optimizer: str = "sgd"  # "sgd" (the papers', with momentum) or "adamw"
    lr: Optional[float] = None  # peak lr of every group; None: each group's default (text 0.002, visual 0.01, ...)
    warmup_epochs: Optional[int] = None  # warm-up epochs of every group; None: each group's default
    group_lr: dict = field(default_factory=dict)  # one group's peak lr, e.g. {"visual": 0.01}; resolved: every group
    group_warmup_epochs: dict = field(default_factory=dict)  # one group's warm-up, e.g. {"visual": 10}; resolved: every group
    warmup_lr: float = 1e-5  # constant learning rate during warm-up (Dassl's WARMUP_CONS_LR)
    momentum: float = 0.9  # SGD momentum, every group
    weight_decay: float = 5e-4  # every group
    device: str = "auto"  # auto: cuda when available
    precision: str = "auto"  # auto: bf16 autocast on cuda, fp32 on cpu
    backend: str = "fast"  # "fast" or "reference" (the eager oracle)
    num_workers: Optional[int] = None  # loader threads; None: the available cores
    checkpoint_every: int = 1  # epochs between checkpoints (0: only at the end)
    eval_batch_size: int = 128
    feature_cache: int = 0  # coop / e2mim: cache V augmented views of the frozen image features (0: off)
    decoded_cache: str = "auto"  # decode the training subset once: auto (fits a quarter of free RAM), off, or a size (8G)
    compile: str = "auto"  # torch.compile of the training step: auto (default mode on cuda, off on cpu), off, or a mode
    compile_backend: str = "inductor"  # dynamo backend; aot_eager skips code generation (tests)
    options: dict = field(default_factory=dict)  # method options, e.g. {"topk": 5, "n_prompts": 10}
    trust_pickle: bool = False  # let a --pretrained file that needs a full unpickle load (it can run code)
    nan_policy: str = "stop"  # non-finite loss: "stop" (exit 2 naming epoch and step) or "skip" the step
    final_model: str = "last"  # the model results.json reports: "last" epoch's, or "best-val" (best val accuracy)
    eval_every: int = 0  # val accuracy every E epochs and after the last (metrics.jsonl `val_accuracy`); 0: never

    def __post_init__(self) -> None:
        from fastprompt.methods import method_config, method_spec

        # types first: a config.json read back (`runfiles.read_run_config`) is checked by this same code
        for name in ("method", "clip"):
            value = getattr(self, name)
            require(isinstance(value, str) and value != "", f"{name}={value!r} must be a non-empty string")
        for name in ("data", "out"):
            value = getattr(self, name)
            require(isinstance(value, (str, os.PathLike)), f"{name}={value!r} must be a path (a string)")
        for name in ("protocol", "pretrained", "template"):
            value = getattr(self, name)
            require(value is None or isinstance(value, str), f"{name}={value!r} must be a string or null")
        require(isinstance(self.options, dict) and all(isinstance(k, str) for k in self.options),
                f"options={self.options!r} must be a dict of option name -> value, e.g. {{\"n_ctx\": 4}}")
        method_cls = method_spec(self.method)
        if not method_cls.groups:
            raise FastpromptError(f"{self.method} has nothing to train; evaluate it with `fastprompt zeroshot --data ...`")
        method_config(self.method, **self.options)  # unknown or bad method options fail here, before any file is written
        if self.protocol is not None:
            from fastprompt.training.protocols import get_protocol

            get_protocol(self.protocol)
        check_int("shots", self.shots, allow_none=True)
        check_int("seed", self.seed, minimum=0, maximum=SEED_MAX)
        if self.classes not in TRAIN_CLASSES:
            raise FastpromptError(
                f"classes={self.classes!r}: training takes 'all' or 'base' (base-to-new); evaluate on 'new' with `fastprompt eval`"
            )
        check_int("epochs", self.epochs, allow_none=True)
        check_int("batch_size", self.batch_size, maximum=MAX_BATCH)
        check_int("eval_batch_size", self.eval_batch_size, maximum=MAX_BATCH)
        _check_lr("lr", self.lr, allow_none=True)
        check_int("warmup_epochs", self.warmup_epochs, allow_none=True, minimum=0)
        known = {g.name for g in method_cls.groups}
        for what, values in (("lr", self.group_lr), ("warmup_epochs", self.group_warmup_epochs)):
            require(isinstance(values, dict), f"group_{what}={values!r} must be a dict of group name -> value")
            for name, value in values.items():
                require(name in known, f"{what}.{name}: {self.method} trains no '{name}' group (its groups: "
                                       f"{', '.join(sorted(known))}); drop --{what.replace('_', '-')}.{name}")
                if what == "lr":
                    _check_lr(f"lr.{name}", value)
                else:
                    check_int(f"warmup_epochs.{name}", value, minimum=0)
        _check_lr("warmup_lr", self.warmup_lr, strict=False)
        check_number("momentum", self.momentum)
        require(self.momentum < 1, f"momentum={self.momentum!r} must be a number in [0, 1) (at 1 or more SGD's velocity "
                                   "sums every gradient and never decays)")
        check_number("weight_decay", self.weight_decay)
        check_int("checkpoint_every", self.checkpoint_every, minimum=0)
        check_int("num_workers", self.num_workers, allow_none=True)
        check_int("feature_cache", self.feature_cache, minimum=0)
        parse_cache_setting("decoded_cache", self.decoded_cache)
        if self.feature_cache and not method_cls.frozen_image_tower:
            frozen = [name for name, spec in METHODS.items() if spec.frozen_image_tower and spec.groups]
            raise FastpromptError(
                f"feature_cache needs a frozen image tower ({', '.join(frozen)}); {self.method} prompts it, drop --feature-cache"
            )
        if self.compile not in COMPILE_CHOICES:
            raise FastpromptError(f"compile={self.compile!r} must be one of {', '.join(COMPILE_CHOICES)}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise FastpromptError(f"compile_backend={self.compile_backend!r} must be one of {', '.join(COMPILE_BACKENDS)}")
        if self.compile_backend != "inductor" and self.compile not in ("default", "off", "auto"):
            raise FastpromptError(f"compile={self.compile!r} is an inductor mode; compile_backend={self.compile_backend!r} takes 'default'")
        if self.nan_policy not in NAN_POLICIES:
            raise FastpromptError(f"nan_policy={self.nan_policy!r} must be one of {', '.join(NAN_POLICIES)}")
        check_int("eval_every", self.eval_every, minimum=0)
        if self.final_model not in FINAL_MODELS:
            raise FastpromptError(f"final_model={self.final_model!r} must be one of {', '.join(FINAL_MODELS)}")
        if self.final_model == "best-val" and not self.eval_every:
            raise FastpromptError("final_model='best-val' reports the epoch with the best val accuracy, so it needs "
                                  "validation: pass --eval-every E (1: every epoch, as Dassl), or --final-model last")
        if not isinstance(self.trust_pickle, bool):
            raise FastpromptError(f"trust_pickle={self.trust_pickle!r} must be True or False")
        if self.optimizer not in OPTIMIZERS:
            raise FastpromptError(f"optimizer={self.optimizer!r} must be one of {', '.join(OPTIMIZERS)}")
        if self.device not in DEVICES:
            raise FastpromptError(f"device={self.device!r} must be one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise FastpromptError(f"precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if self.backend not in BACKENDS:
            raise FastpromptError(f"backend={self.backend!r} must be one of {', '.join(BACKENDS)}")
        if isinstance(self.pretrained, str) and self.pretrained.lower() == "none":
            self.pretrained = None

    @classmethod
    def from_protocol(cls, protocol: str, *, dataset: Optional[str] = None, **given: Any) -> "TrainConfig":
        """A config that follows the named protocol (`fastprompt.training.protocols`): every
        field it sets, for `dataset` (default: the name in the sidecar of `given["data"]`), except
        the fields in `given`, which win; its default method where `given` names none; its method
        options for the method's fields, under the options in `given`. Its per-group lr and
        warm-up are taken by `resolve_recipe`."""
        from fastprompt.methods import method_spec
        from fastprompt.training.protocols import get_protocol, resolve_method

        proto = get_protocol(protocol)
        require("data" in given, "from_protocol needs data=")
        given["method"] = resolve_method(given.get("method"), protocol)
        option_cls = method_spec(given["method"]).options
        if dataset is None:
            from fastprompt.data import open_dataset

            dataset = open_dataset(given["data"], tables=False).name  # the sidecar: torch-free
        given_options = given.pop("options", None) or {}
        options = {k: v for k, v in proto.options(dataset).items() if k in option_cls.field_names()}
        unused = option_cls.unused_fields({**options, **given_options})  # e.g. CAVPT's text side without text_prompt
        options = {**{k: v for k, v in options.items() if k not in unused}, **given_options}
        settings = {k: v for k, v in proto.train_fields(dataset).items() if k not in given}
        return cls(**settings, **given, options=options, protocol=protocol)

    def resolve(self, dataset: str, groups: Sequence[ParamGroup], options: dict) -> "TrainConfig":
        """This config with every default filled in (`resolve_recipe`, without the sources)."""
        return resolve_recipe(self, dataset, groups, options)[0]

    def compile_mode(self, device_type: str) -> Optional[str]:
        """The torch.compile mode of the training step on this device, or None for eager.

        auto compiles on CUDA only: on CPU a cold inductor compile costs a minute or two of
        C++ compilation (measured), longer than a whole few-shot run of the tiny config."""
        if self.compile == "off" or (self.compile == "auto" and device_type != "cuda"):
            return None
        return "default" if self.compile == "auto" else self.compile

    def validates_after(self, epoch: int) -> bool:
        """Whether the val split is scored after 1-based `epoch`: every `eval_every` epochs and
        after the last (so --final-model best-val always weighs the last epoch too)."""
        return bool(self.eval_every) and (epoch % self.eval_every == 0 or epoch == self.epochs)

    def lr_at(self, group: str, epoch: int) -> float:
        """Learning rate of `group` in 0-based `epoch` (a resolved config): Dassl's schedule."""
        return dassl_lr(epoch, lr=self.group_lr[group], warmup_epochs=self.group_warmup_epochs[group],
                        epochs=self.epochs, warmup_lr=self.warmup_lr)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def resolve_recipe(request: TrainConfig, dataset: str, groups: Sequence[ParamGroup], options: dict,
                   sources: Optional[dict] = None) -> tuple[TrainConfig, dict[str, str]]:
    """`request` with every default filled in, and where each filled value came from: `epochs`
    by shots and dataset, every trained group's lr and warm-up (flag for the group > flag for
    all groups > the protocol's value for the group > the group's default), and the method's
    full `options`. Idempotent: a resolved config resolves to itself. The one resolution of a
    run's recipe; `fastprompt.training.plan.plan_run` calls it once per run.

    `sources`: where the request's own fields came from (field -> "cli" | "protocol" |
    "default"); a value derived from `lr`, `warmup_epochs` or `epochs` takes its source. The
    returned sources name `epochs`, `lr.GROUP` and `warmup_epochs.GROUP` for every trained group.

    A warm-up of E or more epochs is an error: under Dassl's schedule the whole run would
    train at warmup_lr and the cosine would never start (Dassl runs it; we refuse it)."""
    sources = dict(sources or {})
    given = lambda name: sources.get(name, "cli")  # noqa: E731  (a field set without a recorded source: given)
    out: dict[str, str] = {}
    if request.epochs is not None:
        epochs, out["epochs"] = request.epochs, given("epochs")
    else:  # CoOp's by shots; ImageNet's 50 is the dataset's
        epochs = default_epochs(request.shots, dataset)
        out["epochs"] = "dataset" if epochs != default_epochs(request.shots, "") else "default"
    trained = {g.name for g in groups}
    for what, values in (("lr", request.group_lr), ("warmup-epochs", request.group_warmup_epochs)):
        for name in values:
            require(name in trained, f"{what}.{name}: this {request.method} run trains no '{name}' group with these "
                                     f"options (it trains: {', '.join(sorted(trained))}); drop --{what}.{name}")
    proto = None
    if request.protocol is not None:
        from fastprompt.training.protocols import get_protocol

        proto = get_protocol(request.protocol)
    group_lr, group_warmup = {}, {}
    for g in groups:
        if g.name in request.group_lr:
            lr, source = request.group_lr[g.name], given(f"lr.{g.name}")
        elif request.lr is not None:
            lr, source = request.lr, given("lr")
        elif proto is not None and proto.group_value("lr", g.name, dataset) is not None:
            lr, source = proto.group_value("lr", g.name, dataset), "protocol"
        else:
            lr, source = g.lr, "default"
        group_lr[g.name], out[f"lr.{g.name}"] = float(lr), source
        if g.name in request.group_warmup_epochs:
            warmup, source, flag = request.group_warmup_epochs[g.name], given(f"warmup_epochs.{g.name}"), \
                f"--warmup-epochs.{g.name}"
        elif request.warmup_epochs is not None:
            warmup, source, flag = request.warmup_epochs, given("warmup_epochs"), "--warmup-epochs"
        elif proto is not None and proto.group_value("warmup_epochs", g.name, dataset) is not None:
            warmup, source, flag = proto.group_value("warmup_epochs", g.name, dataset), "protocol", \
                f"--protocol {request.protocol}"
        else:
            warmup = g.default_warmup(dataset)
            source = "dataset" if warmup != g.warmup_epochs else "default"
            flag = f"the {g.name} group's default"
        warmup = int(warmup)
        if warmup >= epochs:
            raise FastpromptError(
                f"group {g.name}: warm-up of {warmup} epochs ({flag}) leaves none of the {epochs} epochs for the cosine "
                f"schedule; pass --warmup-epochs.{g.name} (or --warmup-epochs) below {epochs}, or more --epochs"
            )
        group_warmup[g.name], out[f"warmup_epochs.{g.name}"] = warmup, source
    resolved = dataclasses.replace(request, epochs=epochs, group_lr=group_lr, group_warmup_epochs=group_warmup,
                                   options=dict(options))
    return resolved, out
