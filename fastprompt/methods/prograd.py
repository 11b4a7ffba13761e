"""ProGrad: CoOp stepped along the cross-entropy gradient less its part against the
distillation gradient (Zhu et al., "Prompt-aligned Gradient for Prompt Tuning", ICCV 2023).

Matches BeierZhu/Prompt-align `ProGrad.public/trainers/prograd.py` (`ProGradLoss`, `ProGrad.
forward_backward`, `PromptLearner.__init__`) and `Dassl.ProGrad.pytorch/dassl/engine/trainer.py`
(`prograd_backward_and_update`):
- the objective's two terms: `xe = CE(logits, y)` and the distillation "KL", a soft
  cross-entropy `-Σ_k softmax(z/T)_k log softmax(logits/T)_k · T²`, meaned over the batch,
  where z are zero-shot CLIP's logits (`LOSS.T`);
- the step (`prograd_combine`), per trained tensor, with a = ∇xe and b = ∇kl: when
  `cos(a, b) < 0`, `a - λ (a · b̂) b̂` (b̂ = b / ‖b‖, `LOSS.LAMBDA`), else a; b itself is never added;
- the context init: 16 vectors, zeros but for the last w slots, which take the template
  phrase's first w token embeddings (`fastprompt.prompts.coop`, `fill="last"`).
Zero-shot logits: the run's cached template features (`template_features`) against the
same frozen-tower image features the step computes (the released code runs the image tower
a second time for them; the frozen tower gives the same features). Both gradients come from
one forward (`GradientRule`; the trainer's `term_gradients`).
Differences from the release: the teacher's template is the run's (the dataset's, CoOp's),
the released code rewrote some datasets' templates ("a type of pet, a photo of a {}.").
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F

from fastprompt.errors import FastpromptError
from fastprompt.losses import loss_dtype
from fastprompt.methods.base import GradientRule, PromptModel
from fastprompt.methods.registry import register_method
from fastprompt.methods.specs import ProgradConfig
from fastprompt.prompts.coop import CoopContext


def template_phrase(templates: tuple[str, ...]) -> str:
    """ProGrad's init phrase from the template: `template.replace(" {}.", "")` (CTX_INIT True)."""
    if len(templates) != 1 or not templates[0].endswith(" {}."):
        raise FastpromptError(f"template_init needs one template ending in ' {{}}.' (ProGrad drops it to get the init "
                              f"phrase); got {list(templates)}: pass --coop.ctx-init PHRASE with "
                              "--prograd.no-template-init, or one such --template")
    return templates[0][: -len(" {}.")]


def distillation(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """ProGradLoss's "KL": `(-softmax(teacher/T) · log_softmax(logits/T) · T²).sum(1).mean()`."""
    t = temperature
    target = F.softmax(teacher / t, dim=-1)  # (B, K)
    return (-target * F.log_softmax(logits / t, dim=-1) * t * t).sum(1).mean()


def prograd_combine(grads: dict[str, list[torch.Tensor]], weight: float) -> list[torch.Tensor]:
    """`prograd_backward_and_update` per tensor: a = ∇loss (cross-entropy), b = ∇kl; where the
    normalised dot product is negative, `a - λ (a · b̂) b̂`, else a (a select: no host read)."""
    out = []
    for a, b in zip(grads["loss"], grads["kl"]):
        b_hat = b / torch.linalg.norm(b)
        a_hat = a / torch.linalg.norm(a)
        conflict = torch.dot(a_hat.flatten(), b_hat.flatten()) < 0  # () bool
        out.append(torch.where(conflict, a - weight * torch.dot(a.flatten(), b_hat.flatten()) * b_hat, a))
    return out


@register_method("prograd")  # options, groups, frozen image tower: fastprompt.methods.specs
class Prograd(PromptModel):

    def __init__(self, bundle, classnames, templates, backend, config: ProgradConfig):
        super().__init__(bundle, classnames, templates, backend, config)
        phrase = template_phrase(self.templates) if config.template_init else config.ctx_init
        self.text = CoopContext(bundle, self.classnames, n_ctx=config.n_ctx, csc=config.csc, ctx_init=phrase,
                                fill="last")

    def gradient_rule(self) -> Optional[GradientRule]:
        return GradientRule(terms=("loss", "kl"), combine=partial(prograd_combine, weight=self.config.projection_weight))

    def loss_terms(self, images: Optional[torch.Tensor], labels: torch.Tensor,
                   features: Optional[torch.Tensor] = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """{"loss": cross-entropy, "kl": distillation to zero-shot CLIP}, logits [B, K]."""
        self._check_labels(labels, images if features is None else features)
        x = self.image_features(images, {"features": features})  # (B, D), normalised, frozen tower
        w = self.text_features()  # (K, D)
        with torch.autocast(x.device.type, enabled=False):
            dtype = loss_dtype(self.backend, x, w)
            tau = self.logit_scale().to(dtype)
            x = x.to(dtype)
            logits = tau * x @ w.to(dtype).t()  # (B, K)
            with torch.no_grad():
                teacher = tau * x @ self.template_features.to(dtype).t()  # (B, K): zero-shot CLIP
            terms = {"loss": F.cross_entropy(logits, labels), "kl": distillation(logits, teacher, self.config.temperature)}
        return terms, logits.detach()

    def loss_and_logits(self, images: Optional[torch.Tensor], labels: torch.Tensor,
                        features: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy, logits): the reported loss; training steps by `gradient_rule`, not its gradient."""
        terms, logits = self.loss_terms(images, labels, features=features)
        return terms["loss"], logits
