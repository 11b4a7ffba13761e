"""Contrastive pretraining of a small CLIP on synthetic image-caption pairs: `fastprompt prepare demo-clip`.

Why it exists: prompt tuning adapts what a pretrained CLIP already knows. With *random*
weights there is nothing to adapt; measured on the demo set with `fastprompt-tiny`, VPT
stays at chance (10 %) even when asked to memorise 20 images, because prompts shared by
all images cannot map a random image tower onto random class-name features. Real CLIP
weights cannot be downloaded on every machine (tests, CI, air-gapped users), so this module
makes a small CLIP that *knows something* in well under a minute on two CPU cores (300 steps:
17-25 s of training measured on the shared 2-core container; 600 steps took 75 s quiet).
300 steps is the default since issue 16: the demo's zero-shot accuracy is then 42 % (600:
59 %), leaving a clear lift for few-shot tuning to show, at half the wait.

What it learns: `CaptionedShapes` pairs (colour x shape images, captions such as "a photo
of a red square.") for every colour-shape pair of the demo's vocabulary *except the ten
demo classes*. So the resulting CLIP has seen every word of the demo's class names but none
of its classes, and the demo is a genuine transfer task for it.

The recipe is CLIP's (Radford et al., 2021): both towers and the temperature trained from
random init with the symmetric InfoNCE loss (through `fastprompt.losses.info_nce`), AdamW,
linear warm-up then cosine decay. Each step draws `batch_size` *distinct* concepts, so no
caption in a batch is a false negative for another image. Augmentation: random resized
crop and horizontal flip, applied batch-wise with one `grid_sample`.

The output is a plain state dict of the open_clip model, written atomically; it loads as a
local checkpoint: `--clip fastprompt-tiny --pretrained PATH` (or `load_clip(..., pretrained=PATH)`).
Training is deterministic for a given seed on one machine (CPU, one thread count).
"""

from __future__ import annotations

import errno
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from fastprompt.data.demo import CAPTION_TEMPLATES, PRETRAIN_CONCEPTS, CaptionedShapes
from fastprompt.data.pipelines import CLIP_MEAN, CLIP_STD
from fastprompt.errors import FastpromptError
from fastprompt.files import atomic_write
from fastprompt.losses import info_nce
from fastprompt.models.clip import TINY, load_clip
from fastprompt.models.text import encode_tokens, eot_positions
from fastprompt.validation import check_int, check_number

_MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100


@dataclass(frozen=True)
class PretrainConfig:
    """How `pretrain_clip` trains; the defaults are what `fastprompt prepare demo-clip` runs."""

    clip: str = TINY  # an open_clip model name (random init); must take the demo's ViT layout
    steps: int = 300  # optimiser steps
    batch_size: int = 64  # distinct concepts per step (at most the 90 concepts)
    images_per_concept: int = 32  # images drawn per concept (the step samples among them)
    lr: float = 2e-3  # peak AdamW learning rate
    warmup_steps: Optional[int] = None  # linear warm-up from 0; None: min(50, steps // 10)
    weight_decay: float = 0.05
    crop_scale: tuple[float, float] = (0.35, 1.0)  # random resized crop: area fraction range
    seed: int = 0  # weights, images and sampling are functions of the seed

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "images_per_concept"):
            check_int(name, getattr(self, name))
        check_int("seed", self.seed, minimum=0)
        if self.warmup_steps is None:
            object.__setattr__(self, "warmup_steps", min(50, self.steps // 10))  # frozen dataclass
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        if self.warmup_steps >= self.steps:
            raise FastpromptError(f"warmup_steps={self.warmup_steps} leaves none of the {self.steps} steps for the cosine decay; lower it")
        check_number("lr", self.lr, strict=True)
        check_number("weight_decay", self.weight_decay)
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise FastpromptError(f"crop_scale={self.crop_scale!r} must satisfy 0 < low <= high <= 1")
        concepts = len(PRETRAIN_CONCEPTS)
        if self.batch_size > concepts:
            raise FastpromptError(f"batch_size={self.batch_size} exceeds the {concepts} concepts (a batch holds distinct ones); lower it")

    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (0-based): linear warm-up, then cosine to 0."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = self.steps - self.warmup_steps
        return 0.5 * self.lr * (1 + math.cos(math.pi * (step - self.warmup_steps) / span))


@dataclass(frozen=True)
class PretrainSummary:
    out: str
    steps: int
    seconds: float
    final_loss: float  # mean symmetric InfoNCE of the last 20 steps
    retrieval_accuracy: float  # image -> caption top-1 over the last 20 steps' batches, percent

    def line(self) -> str:
        return (f"wrote {self.out}: {self.steps} steps in {self.seconds:.0f} s, final loss {self.final_loss:.3f}, "
                f"in-batch image->caption accuracy {self.retrieval_accuracy:.1f} %")


def _check_out(out: str, overwrite: bool) -> Path:
    path = Path(out)
    if path.suffix not in (".pt", ".pth"):
        raise FastpromptError(f"--out {out} must end in .pt (it is loaded back as a checkpoint file); e.g. demo-clip.pt")
    if path.is_dir():
        raise FastpromptError(f"--out {out} is a directory; give a file name such as {path / 'demo-clip.pt'}")
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FastpromptError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{path.name}.probe"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise FastpromptError(f"cannot write {out} ({err.strerror}); pick a writable location") from None
    return path


def _augment(images: torch.Tensor, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (area fraction in `scale`, aspect 3/4..4/3) and horizontal flip per image,
    as one affine `grid_sample` over the batch. images: (B, 3, S, S) float -> (B, 3, S, S)."""
    b = images.shape[0]
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)  # (B,)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)  # (B,)
    ratio = log_ratio.exp()  # (B,)
    sx = (area * ratio).sqrt().clamp(max=1.0)  # (B,) crop width / image width
    sy = (area / ratio).sqrt().clamp(max=1.0)  # (B,)
    tx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sx)  # (B,) crop centre, in [-1, 1] units
    ty = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sy)  # (B,)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)  # (B,)
    theta = torch.zeros(b, 2, 3)  # (B, 2, 3)
    theta[:, 0, 0] = sx * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, S, S, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (B, 3, S, S)


def pretrain_clip(out: str, config: PretrainConfig = PretrainConfig(),
                  progress: Optional[Callable[[int, float], None]] = None, overwrite: bool = False) -> PretrainSummary:
    """Pretrain `config.clip` from random init on `CaptionedShapes` and save its state dict to `out`
    (an existing `out` only with `overwrite`; checked before training).

    `progress(step, loss)` is called after every step. Runs on CPU. Returns a summary."""
    path = _check_out(out, overwrite)
    torch.manual_seed(config.seed)
    bundle = load_clip(config.clip, pretrained=None, device="cpu")  # random init under the seed, checked layout
    model = bundle.model
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    size = bundle.image_size

    # the whole image set, drawn once (a few seconds): (N, K, 3, S, S) in CLIP's normalisation
    data = CaptionedShapes(images_per_concept=config.images_per_concept, image_size=size, seed=config.seed)
    n_concepts, per = len(data.concepts), config.images_per_concept
    pixels = np.stack([data.image(j, k) for j in range(n_concepts) for k in range(per)])  # (N*K, S, S, 3) uint8
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)  # (N*K, 3, S, S)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    images = ((images - mean) / std).view(n_concepts, per, 3, size, size)  # (N, K, 3, S, S)
    captions = [t.format(name) for name, _, _ in data.concepts for t in CAPTION_TEMPLATES]
    tokens = bundle.tokenizer(captions)  # (N*T, 77)
    tokens = tokens[:, : int(eot_positions(tokens).max()) + 1].reshape(n_concepts, len(CAPTION_TEMPLATES), -1)  # (N, T, L)

    # The token embedding stays at its random init: the captions use a few dozen of its 49,408
    # rows, and AdamW over all of them cost more than the rest of a step (measured 34 ms of ~85).
    model.token_embedding.weight.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embedding" not in n]
    keep = [p for n, p in trainable if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": keep, "weight_decay": 0.0}], lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    hits: list[float] = []
    start = time.perf_counter()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        concept = torch.randperm(n_concepts, generator=generator)[: config.batch_size]  # (B,) distinct concepts
        which = torch.randint(per, (config.batch_size,), generator=generator)  # (B,)
        template = torch.randint(len(CAPTION_TEMPLATES), (config.batch_size,), generator=generator)  # (B,)
        batch = _augment(images[concept, which], config.crop_scale, generator)  # (B, 3, S, S)
        image_features = model.encode_image(batch)  # (B, e)
        text_features = encode_tokens(model, tokens[concept, template])  # (B, e), EOS-truncated
        scale = model.logit_scale.exp().clamp(max=_MAX_LOGIT_SCALE)
        loss = 0.5 * (info_nce(image_features, text_features, scale, "fast")
                      + info_nce(text_features, image_features, scale, "fast"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FastpromptError(f"pretraining loss became {value} at step {step + 1}; lower lr (now {config.lr})")
        losses.append(value)
        with torch.no_grad():
            sim = F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T  # (B, B)
            hits.append(float((sim.argmax(-1) == torch.arange(len(concept))).float().mean()))
        if progress is not None:
            progress(step + 1, value)
    seconds = time.perf_counter() - start

    model.eval()

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: a full disk raises OSError (a path gives a bare RuntimeError)
            torch.save(model.state_dict(), f)

    try:
        atomic_write(path, save)
    except OSError as err:  # a full or read-only disk at the end: one line naming the path (nothing is left there)
        fix = "free space on that disk" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "make its folder writable"
        raise FastpromptError(f"cannot write {out} ({err.strerror or err}); {fix} or choose another --out, and run "
                              "`fastprompt prepare demo-clip` again") from None
    tail = slice(-min(20, len(losses)), None)
    return PretrainSummary(out=str(path), steps=config.steps, seconds=round(seconds, 1),
                           final_loss=float(np.mean(losses[tail])), retrieval_accuracy=100.0 * float(np.mean(hits[tail])))

