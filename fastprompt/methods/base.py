"""`PromptModel`: the frozen CLIP plus the prompt parts a method composes.

A method is a subclass, registered with `@register_method(name)`, bound to its torch-free
declaration (`fastprompt.methods.specs`, a `MethodSpec`: read by the trainer, bench and CLI),
which gives the class these facts:
- `options`: its options dataclass (the keywords of `create_model`, the `--prefix.option` flags);
- `groups`: the `ParamGroup`s it may train (`text`, `visual`, ...), each with its default lr
  and warm-up; a trainable tensor `NAME.rest` belongs to group `NAME`;
- `frozen_image_tower`: images pass an unprompted frozen tower, so their features can be cached.
The class itself says:
- `wants_topk_table()`: the trainer should supply per-image zero-shot top-K (CAVPT, cached);
- `gradient_rule()`: None (training backpropagates `loss_and_logits`' loss), or a `GradientRule`:
  the trainer then takes the named terms of one `loss_terms` forward, one gradient per term
  (`term_gradients`, averaged over ranks as DDP would) and writes the rule's combination of them
  as the trained tensors' gradients (ProGrad's projection);
- what it saves: `prompt_state_dict()` (its trainable tensors) of which `training_only_names()`
  stay with the training classes;
- what it does between epochs: `end_epoch(epoch, epochs)` after each training epoch, and the
  state that carries across epochs, `training_state()` / `load_training_state()`, which every
  checkpoint holds (PromptSRC's running average of the prompts).
Its constructor picks parts:
- `self.text`: None (cached hand-crafted features) or a `CoopContext` (learnable context);
- `self.visual`: None (frozen image tower), shallow or deep `VisualPrompts`;
and, where the method needs more, overrides `extra_prompts` / `forward` / `loss`, or only
`objective` (a loss of the image and class features alone: its runs can still pack).
Logits are always `τ · cos(x, w)` with CLIP's own frozen τ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastprompt.errors import FastpromptError
from fastprompt.losses import cosine_ce
from fastprompt.methods.options import DERIVED_OPTIONS
from fastprompt.methods.registry import MethodSpec, ParamGroup
from fastprompt.methods.specs import TEXT_GROUP, VISUAL_GROUP  # noqa: F401  (the shared groups; methods import them here)
from fastprompt.models import vision
from fastprompt.models.clip import ClipBundle, require_vit
from fastprompt.prompts.coop import CoopContext
from fastprompt.prompts.handcrafted import template_features
from fastprompt.prompts.visual import VisualPrompts

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class GradientRule:
    """How a method turns its loss terms into the trained tensors' gradients, in place of
    `loss.backward()`: `combine({term: [grad of each trained tensor]})` -> [gradient of each
    trained tensor], given the gradient of each of `terms` (names of `loss_terms`' dict)."""

    terms: tuple[str, ...]  # the loss terms whose gradients it combines
    combine: Callable[[dict[str, list[torch.Tensor]]], list[torch.Tensor]]


def term_gradients(terms: dict[str, torch.Tensor], names: Sequence[str],
                   params: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """The gradient of each named term w.r.t. `params`, from the one forward that made them (the
    graph is kept until the last term's backward); a tensor a term does not reach gets zeros."""
    grads = {}
    for i, name in enumerate(names):
        got = torch.autograd.grad(terms[name], list(params), retain_graph=i < len(names) - 1, allow_unused=True)
        grads[name] = [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]
    return grads


class PromptModel(nn.Module):
    """Base of every method: `model(images) -> logits [B, K]`, `model.loss(images, labels)`."""

    method: ClassVar[str] = ""  # set by @register_method
    spec: ClassVar[Optional[MethodSpec]] = None  # its declaration, set by @register_method
    options: ClassVar[Optional[type]] = None  # the options dataclass
    groups: ClassVar[Optional[tuple[ParamGroup, ...]]] = None  # the parameter groups it may train
    frozen_image_tower: ClassVar[Optional[bool]] = None  # True: features of the unprompted tower can be cached

    def __init__(self, bundle: ClipBundle, classnames: Sequence[str], templates: Sequence[str], backend: str, config):
        super().__init__()
        self.clip = bundle.model  # frozen; its parameters never require grad
        self.bundle = bundle
        self.classnames = tuple(classnames)
        self.templates = tuple(templates)
        self.backend = backend
        self.config = config
        self.text: Optional[CoopContext] = None
        self.visual: Optional[VisualPrompts] = None
        self.visual_mode: Optional[str] = None  # None | "shallow" | "deep"
        self.register_buffer("template_features", template_features(bundle, self.classnames, self.templates),
                             persistent=False)  # (K, D), normalised
        self._eval_text: Optional[torch.Tensor] = None

    # ----------------------------------------------------------------- parts
    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def logit_scale(self) -> torch.Tensor:
        """CLIP's τ = exp(logit_scale), frozen (0-d)."""
        return self.clip.logit_scale.exp()

    def text_features(self) -> torch.Tensor:
        """Class features [K, D], normalised. Learnable context runs through the text tower once
        per call (once per training step); in eval mode under no_grad it runs once and is kept
        until the model trains again or loads new prompts."""
        if self.text is None:
            return self.template_features
        if self.training or torch.is_grad_enabled():
            return F.normalize(self.text(self.clip, self.backend), dim=-1)
        if self._eval_text is None:
            self._eval_text = F.normalize(self.text(self.clip, self.backend), dim=-1)  # (K, D)
        return self._eval_text

    def set_epoch(self, epoch: int) -> None:
        """The trainer calls this before each epoch (0-based); methods whose objective changes
        with the epoch (CAVPT's released guidance) override it."""

    def end_epoch(self, epoch: int, epochs: int) -> None:
        """The trainer calls this after training epoch `epoch` (1-based) of `epochs`, before that
        epoch's validation and checkpoint; methods that fold each epoch's prompts into a state
        of their own (PromptSRC's Gaussian prompt aggregation) override it."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """Tensors besides the prompts and the optimiser that an exact resume needs (what
        `end_epoch` has accumulated); every checkpoint saves them. None here."""
        return {}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `training_state()` from a checkpoint (ValueError when it does not fit)."""
        if state:
            raise ValueError(f"{self.method} keeps no training state, the checkpoint has {', '.join(sorted(state))}")

    def prompt_context(self) -> dict:
        """What the image tower's per-sample prompt callback reads besides the images (CAVPT:
        the class features its queries come from); `extra_prompts(images, prompt_context())`."""
        return {}

    def extra_prompts(self, images: torch.Tensor, context: dict) -> Optional[vision.ExtraPrompts]:
        """Per-sample prompt callback for the image tower (CAVPT overrides it)."""
        return None

    def may_skip_parameters(self) -> bool:
        """Whether a training step can leave a trainable tensor out of the loss (DDP must then
        look for such tensors every step, `find_unused_parameters`, an extra pass over the
        graph, and warns from every rank when it finds none). False: every step uses all."""
        return False

    def wants_topk_table(self) -> bool:
        """True when training wants the per-image zero-shot top-K table from the trainer
        (then the model has `k_n` and `zero_shot_topk(images)`, and its loss takes `topk`)."""
        return False

    def gradient_rule(self) -> Optional[GradientRule]:
        """None: training backpropagates the loss of `loss_and_logits`. A rule: training takes the
        terms of `loss_terms` and writes `rule.combine` of their gradients (see `GradientRule`)."""
        return None

    def loss_terms(self, images: Optional[torch.Tensor], labels: torch.Tensor,
                   **extra) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({name: 0-d loss term}, detached logits [B, K]) of one forward; "loss" is the value the
        trainer reports (and, without a gradient rule, backpropagates)."""
        loss, logits = self.loss_and_logits(images, labels, **extra)
        return {"loss": loss}, logits

    @classmethod
    def trained_groups(cls, config) -> tuple[ParamGroup, ...]:
        """The groups a model built with options `config` trains (its declaration's
        `MethodSpec.trained_groups`); `param_groups()` checks the model agrees."""
        return cls.spec.trained_groups(config)

    def param_groups(self) -> list[tuple[ParamGroup, list[tuple[str, nn.Parameter]]]]:
        """The declared groups that hold trainable tensors here, with their (name, tensor) pairs;
        a group the options leave empty (CAVPT's `text` without text_prompt) is left out."""
        declared = {g.name: g for g in self.groups}
        members: dict[str, list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            group = name.split(".", 1)[0]
            if group not in declared:
                raise TypeError(f"{type(self).__qualname__} trains {name}, which belongs to no declared group "
                                f"({', '.join(declared) or 'none'}); add ParamGroup({group!r}, ...) to its `groups`")
            members.setdefault(group, []).append((name, p))
        found = [(g, members[g.name]) for g in self.groups if g.name in members]
        if [g.name for g, _ in found] != [g.name for g in self.trained_groups(self.config)]:
            raise TypeError(f"{type(self).__qualname__} trains groups {[g.name for g, _ in found]}, but its trained_groups() "
                            f"says {[g.name for g in self.trained_groups(self.config)]}; make them agree")
        return found

    def resolved_options(self) -> dict:  # derives DERIVED_OPTIONS
        """Every option as this model was built, defaults and derived values filled in
        (CoOp's `n_ctx` from `ctx_init`, a depth left to the tower from its layers): what
        rebuilds this exact model."""
        options = self.config.to_dict()
        if self.text is not None and "n_ctx" in options:
            options["n_ctx"] = self.text.n_ctx
        if self.text is not None and "text_depth" in options:
            options["text_depth"] = self.text.depth
        if self.visual is not None and "vision_depth" in options:
            options["vision_depth"] = self.visual.prompts.shape[0]
        return options

    def tower_prompts(self, images: torch.Tensor, context: dict) -> Optional[dict]:
        """The image tower's prompts for `images` as keywords of `vision.encode` (and of
        `vision.class_attention`, the figures'); None when the tower is unprompted."""
        if self.visual is None:
            return None
        where = {"placement": self.visual.placement}
        if self.visual_mode == "shallow":
            return {"shallow": self.visual.prompts[0], **where}
        return {"deep": self.visual.prompts, "carry": self.visual.carry, "extra": self.extra_prompts(images, context),
                **where}

    def image_features(self, images: Optional[torch.Tensor], context: Optional[dict] = None) -> torch.Tensor:
        """Image features [B, D], normalised, through the (prompted) image tower; for a frozen
        tower `context["features"]` may hold precomputed features [B, D] instead of images."""
        context = self.prompt_context() if context is None else context
        if context.get("features") is not None:
            if not self.frozen_image_tower:
                raise FastpromptError(f"{self.method} prompts its image tower; it needs images, not cached features")
            return F.normalize(context["features"], dim=-1)  # (B, D)
        self._check_images(images)
        prompts = self.tower_prompts(images, context)
        if prompts is None:
            return self.frozen_image_features(images)  # (B, D)
        feats = vision.encode(self.clip.visual, images, backend=self.backend, **prompts)  # (B, D)
        return F.normalize(feats, dim=-1)  # (B, D)

    @torch.no_grad()
    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Image features [B, D], normalised, of the unprompted frozen tower (no gradient)."""
        feats = self.clip.visual(images) if self.backend == "reference" else vision.encode(
            self.clip.visual, images, backend=self.backend)  # (B, D)
        return F.normalize(feats, dim=-1)  # (B, D)

    # ----------------------------------------------------------------- API
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, K] = τ · cos(image, class)."""
        x = self.image_features(images)  # (B, D)
        w = self.text_features()  # (K, D)
        return self.logit_scale() * x @ w.t()  # (B, K)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, **extra) -> torch.Tensor:
        """The method's full training objective (aux / MI terms included)."""
        return self.loss_and_logits(images, labels, **extra)[0]

    def loss_and_logits(self, images: Optional[torch.Tensor], labels: torch.Tensor,
                        features: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(training objective, detached logits [B, K] of the same forward, for accuracy).
        `features` [B, D]: cached frozen-tower features in place of `images`."""
        self._check_labels(labels, images if features is None else features)
        x = self.image_features(images, {"features": features})  # (B, D)
        w = self.text_features()  # (K, D)
        return self.objective(x, w, labels), self._detached_logits(x, w)

    def objective(self, x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss (0-d) of one batch's normalised image features x [B, D] and class
        features w [K, D]: CLIP's cosine cross-entropy. A method whose loss adds terms of x and w
        alone (KgCoOp's knowledge gap) overrides this, and its runs still pack (the pack calls it
        on each run's rows, `fastprompt.training.pack`)."""
        return cosine_ce(x, w, labels, self.logit_scale(), self.backend)

    def _detached_logits(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.logit_scale() * F.normalize(x, dim=-1) @ w.t()  # (B, K)

    def _check_images(self, images: torch.Tensor) -> None:
        """Images must be (B, 3, S, S) at the image tower's input size S (a shape check: no sync)."""
        size = self.bundle.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise FastpromptError(
                f"images of shape {tuple(images.shape)} do not fit this model, which takes (B, 3, {size}, {size}); "
                f"resize them to {size} px (the eval transform of fastprompt.create_model_and_transforms does)"
            )

    def _check_labels(self, labels: torch.Tensor, images: torch.Tensor) -> None:
        if labels.dtype != torch.long or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise FastpromptError(
                f"labels must be int64 of shape [{images.shape[0]}] (one class index per image); got {labels.dtype} {tuple(labels.shape)}"
            )

    # ----------------------------------------------------------------- state
    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen CLIP never switches to train mode (no dropout / patch dropout)
        self._eval_text = None
        return self

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trainable tensors, detached, by their public names (`text.context`, ...)."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def training_only_names(self) -> set[str]:
        """Trainable tensors sized by the class list that only the training loss uses (CAVPT's
        auxiliary classifier, E2MIM's critic); evaluation on other classes leaves them out."""
        return set()

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor], other_classes: bool = False) -> None:
        """Load trainable tensors; names and shapes must match this model exactly.

        other_classes=True loads prompts learned on another class list (base-to-new,
        cross-dataset): the training-only tensors are skipped; class-specific context
        cannot move to other classes and is an error.
        """
        own = {name: p for name, p in self.named_parameters() if p.requires_grad}
        if other_classes:
            skip = self.training_only_names()
            own = {n: p for n, p in own.items() if n not in skip}
            state = {n: t for n, t in state.items() if n not in skip}
            if "text.context" in state and state["text.context"].dim() == 3:
                raise FastpromptError(
                    "class-specific context (csc) belongs to the training classes and cannot be evaluated on other classes; "
                    "train with shared context to evaluate on new classes or another dataset"
                )
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise FastpromptError(
                f"prompt state does not fit this {self.method} model (missing: {missing or 'none'}; unexpected: {unexpected or 'none'}); "
                "load prompts saved from the same method and options"
            )
        for name, p in own.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise FastpromptError(
                    f"prompt tensor {name} has shape {tuple(state[name].shape)}, this model needs {tuple(p.shape)}; "
                    "use the same classes and options as the saved run"
                )
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(state[name].to(p.device, p.dtype))
        self._eval_text = None


def add_coop(model: PromptModel, options) -> None:
    """Give `model` CoOp's learnable text context (in the first `text_depth` layers, where the
    options have that field; else in layer 1, CoOp)."""
    model.text = CoopContext(model.bundle, model.classnames, n_ctx=options.n_ctx, csc=options.csc,
                             ctx_init=options.ctx_init, depth=getattr(options, "text_depth", 1),
                             class_position=getattr(options, "class_position", "end"))


def add_visual_prompts(model: PromptModel, mode: str, n_prompts: int, layers: Optional[int] = None,
                       placement: str = "after-ln-pre", carry: bool = False) -> None:
    """Give `model` shallow (one layer, carried) or deep (every layer, or the first `layers`) visual
    prompts; `placement` and `carry` say how they enter the tower (`fastprompt.models.vision`)."""
    require_vit(model.bundle, model.method)
    if layers is None:
        layers = 1 if mode == "shallow" else model.bundle.vision_layers
    if not 0 <= layers <= model.bundle.vision_layers:
        raise FastpromptError(f"vision_depth={layers} does not fit the image tower's {model.bundle.vision_layers} layers; "
                              f"pick 1..{model.bundle.vision_layers}")
    model.visual = VisualPrompts(layers, n_prompts, model.bundle.vision_width, device=model.bundle.device,
                                 placement=placement, carry=carry)
    model.visual_mode = mode
