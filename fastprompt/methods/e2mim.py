"""E2MIM: MI-based ensemble and exploration (Zhang, "Generalizable Prompt Tuning for VLMs").

Only the abstract and figure 1 are public; this is our reading of them (docs/methods.md):
- two textual views of every class: soft features W_s (CoOp context through the text
  tower) and hand-crafted features W_h (cached template features, frozen);
- class-wise visual mixup: each image is paired with one of another class (a permutation
  whose labels differ), `x_mix = λ x_a + (1-λ) x_b` on the normalised image features,
  λ ~ Beta(α, α) per pair, soft target λ y_a + (1-λ) y_b;
- a learnable MI critic: heads h_s, h_h (2-layer MLPs: Linear K→e, ReLU, Linear e→e, e =
  `mi_dim`) map each view's prediction [K] to a shared space; InfoNCE over the M rows (positive:
  the same sample's two views; negatives: the other rows) with a learnable temperature (init
  1/0.07); I_NCE = log M - L_NCE is the lower bound being maximised. The prediction a head
  reads is `mi_input`: "probs" (default) softmax(τ cos(x, W)), the views' prediction
  probabilities, which is what the paper's figure 1 draws ("augmented dual views of the
  prediction probability"; a default follows the paper where it speaks); "logits"
  the logits τ cos(x, W) themselves (our earlier reading, kept as the option);
- loss: CE(τ cos(x, W_s), y) over original and mixed samples + mi_weight · L_NCE;
- inference: `soft` (W_s only) or `ensemble` (mean of both views' probabilities, returned
  as log-probabilities so that argmax and softmax behave as for logits).

Options (default; source): `mixup` (True), `mixup_alpha` α (1.0), `mi_weight` λ_mi (1.0),
`infer` ("ensemble"), `mi_dim` e (128), `mi_input` ("probs": figure 1); all our
reading, the paper's code being unpublished; CoOp's `n_ctx` / `csc` / `ctx_init` for W_s.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastprompt.losses import cosine_ce, info_nce
from fastprompt.methods.base import PromptModel, add_coop
from fastprompt.methods.registry import register_method
from fastprompt.methods.specs import E2mimConfig


def _mlp(inp: int, out: int, device=None) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, out), nn.ReLU(), nn.Linear(out, out)).to(device)


class MutualInformationCritic(nn.Module):
    """h_s, h_h and the InfoNCE temperature (`e2mim.*` in the prompt state)."""

    def __init__(self, num_classes: int, dim: int, device=None):
        super().__init__()
        self.soft_head = _mlp(num_classes, dim, device)
        self.hand_head = _mlp(num_classes, dim, device)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))

    def nce(self, soft: torch.Tensor, hand: torch.Tensor, backend: str,
            valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L_NCE over the M rows of the two views' predictions [M, K] (logits or probabilities);
        `valid` [M] (bool): only those rows take part, as anchors and as negatives."""
        zs = self.soft_head(soft)  # (M, e)
        zh = self.hand_head(hand)  # (M, e)
        return info_nce(zs, zh, self.logit_scale.exp(), backend, valid)


def classwise_pairs(labels: torch.Tensor, generator: Optional[torch.Generator] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs (a, b) of batch indices [B] each and `keep` [B] (bool): the pairs whose labels differ.

    Samples are grouped by label in random order and paired with the sample `m` places
    further (m = size of the largest class), which always lands in another class when
    m <= B/2: then every sample is an `a` once and a `b` once and `keep` is all True. In a
    batch dominated by one class (m > B/2) only the pairs that differ are kept; a one-class
    batch keeps none. Static shapes and no value read back to the host: every batch of size
    B gives B pairs, so the step is one graph (CUDA graphs); callers weigh the pairs by `keep`.
    """
    batch = labels.shape[0]
    where = labels.device if generator is None else generator.device
    perm = torch.randperm(batch, generator=generator, device=where).to(labels.device)  # (B,)
    order = perm[torch.argsort(labels[perm], stable=True)]  # (B,): grouped by label
    largest = (labels[:, None] == labels[None, :]).sum(1).max()  # 0-d: size of the largest class, on the device
    ahead = (torch.arange(batch, device=labels.device) + largest) % batch  # (B,): order.roll(-largest) as a gather
    partner = order[ahead]  # (B,)
    keep = labels[order] != labels[partner]  # (B,)
    return order, partner, keep


@register_method("e2mim")  # options, groups, frozen image tower: fastprompt.methods.specs
class E2mim(PromptModel):
    def __init__(self, bundle, classnames, templates, backend, config: E2mimConfig):
        super().__init__(bundle, classnames, templates, backend, config)
        add_coop(self, config)
        self.e2mim = MutualInformationCritic(self.num_classes, config.mi_dim,
                                             device=self.bundle.device)

    def may_skip_parameters(self) -> bool:
        return self.config.mi_weight == 0  # the critic takes no part in the loss then

    def training_only_names(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.startswith("e2mim.")}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.image_features(images)  # (B, D)
        soft = self.logit_scale() * x @ self.text_features().t()  # (B, K)
        if self.config.infer == "soft":
            return soft
        hand = self.logit_scale() * x @ self.template_features.t()  # (B, K)
        probs = 0.5 * (soft.softmax(-1) + hand.softmax(-1))  # (B, K)
        return probs.log()  # (B, K): log of the ensemble's probabilities

    def mix(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Original + class-wise mixed features [M, D], their targets [M, K] and which rows count
        (`valid` [M], bool; None without mixup). M = 2B always (static shapes): a mixed row whose
        pair shares a label (`classwise_pairs`' keep is False) has an all-zero target and
        valid False, so it adds nothing to either term; kept rows' targets sum to 1."""
        onehot = F.one_hot(labels, self.num_classes).float()  # (B, K)
        if not self.config.mixup:
            return x, onehot, None
        a, b, keep = classwise_pairs(labels)  # (B,) each
        alpha = torch.tensor(float(self.config.mixup_alpha), device=x.device)
        beta = torch.distributions.Beta(alpha, alpha, validate_args=False)  # validation reads values back
        lam = beta.sample((a.shape[0], 1))  # (B, 1)
        x_mix = lam * x[a] + (1 - lam) * x[b]  # (B, D)
        t_mix = (lam * onehot[a] + (1 - lam) * onehot[b]) * keep[:, None]  # (B, K): zero rows for pairs not kept
        valid = torch.cat([torch.ones_like(keep), keep])  # (M,)
        return torch.cat([x, x_mix]), torch.cat([onehot, t_mix]), valid  # (M, D), (M, K), (M,)

    def loss_and_logits(self, images: Optional[torch.Tensor], labels: torch.Tensor,
                        features: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CE over original + mixed samples + mi_weight · L_NCE; logits of the soft view.
        `features` [B, D]: cached frozen-tower features in place of `images`."""
        self._check_labels(labels, images if features is None else features)
        x = self.image_features(images, {"features": features})  # (B, D), frozen tower
        feats, targets, valid = self.mix(x, labels)  # (M, D), (M, K), (M,) or None
        soft_w = self.text_features()  # (K, D)
        tau = self.logit_scale()
        loss = cosine_ce(feats, soft_w, targets, tau, self.backend)  # mean over M rows; zero-target rows add 0
        if valid is not None:  # the mean over the valid rows, without reading their count back
            loss = loss * (valid.shape[0] / valid.sum().to(loss.dtype))
        if self.config.mi_weight > 0:
            xn = F.normalize(feats, dim=-1)  # (M, D)
            soft = tau * xn @ soft_w.t()  # (M, K)
            hand = tau * xn @ self.template_features.t()  # (M, K)
            if self.config.mi_input == "probs":
                soft, hand = soft.softmax(dim=-1), hand.softmax(dim=-1)  # (M, K) each
            loss = loss + self.config.mi_weight * self.e2mim.nce(soft, hand, self.backend, valid)
        return loss, self._detached_logits(x, soft_w)
