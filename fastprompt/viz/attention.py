"""`fastprompt plot attention`: where the class token looks, zero-shot CLIP vs a run (CAVPT Figs. 1/4).

What is drawn: the *last layer's* class-token attention over patches (not attention
rollout): softmax(q kᵀ / sqrt(hd)) of the class-token query in the image tower's last
block, averaged over heads, kept on the patch keys and renormalised to sum to one
(`fastprompt.models.vision.class_attention`). Prompt tokens are not image regions, so their
share is dropped; what remains is how the class token spreads its attention over the image.
For text-only methods (coop, e2mim) the image tower is zero-shot CLIP's, so the run's map
equals zero-shot's; the figure then draws it once and says so.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fastprompt.errors import FastpromptError
from fastprompt.models import vision
from fastprompt.viz.figures import check_format, figures_dir, pyplot, save_figure
from fastprompt.viz.runs import LoadedRun, load_run

PANEL_INCHES = 2.0  # every panel is a square of this side: the PNG is (cols x rows) x 200 px
FONT_PT = 8  # captions and panel titles
LINE_INCHES = FONT_PT * 1.3 / 72  # one line of that text


@dataclass
class AttentionMaps:
    """N test images with zero-shot and run attention over patches and both predictions."""

    images: np.ndarray  # (N, S, S, 3) float in [0, 1], for display
    labels: np.ndarray  # (N,) ground truth
    zero_shot: np.ndarray  # (N, g, g) attention over the g x g patches, sums to 1
    trained: np.ndarray  # (N, g, g); equals zero_shot for text-only methods
    zero_shot_pred: np.ndarray  # (N,)
    trained_pred: np.ndarray  # (N,)


def spread_indices(labels: np.ndarray, indices: np.ndarray, n: int) -> np.ndarray:
    """`n` of `indices`, taking classes in turn (first image of each class, then the second, ...)."""
    if n > len(indices):
        raise FastpromptError(f"--images {n} exceeds the {len(indices)} test images; pick at most {len(indices)}")
    by_class: dict[int, list[int]] = {}
    for i in indices:
        by_class.setdefault(int(labels[i]), []).append(int(i))
    picked: list[int] = []
    rank = 0
    while len(picked) < n:
        for members in by_class.values():
            if rank < len(members) and len(picked) < n:
                picked.append(members[rank])
        rank += 1
    return np.sort(np.asarray(picked, dtype=np.int64))


def tower_prompts(model, images: torch.Tensor) -> Optional[dict]:
    """The image tower's prompts of `model` for `images` as `vision.encode` keywords; None when
    the method leaves the tower unprompted."""
    return model.tower_prompts(images, model.prompt_context())


def run_attention(run: LoadedRun, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero-shot attention [B, Np], run attention [B, Np]) for normalised `images` [B, 3, S, S]."""
    visual = run.model.clip.visual
    _, zero_shot = vision.class_attention(visual, images)  # (B, Np)
    prompts = tower_prompts(run.model, images)
    if prompts is None:
        return zero_shot, zero_shot
    _, trained = vision.class_attention(visual, images, **prompts)  # (B, Np)
    return zero_shot, trained


@torch.no_grad()
def attention_maps(run: LoadedRun, n_images: int, *, num_workers: Optional[int] = None) -> AttentionMaps:
    """Attention maps and predictions of `n_images` test images, spread over the classes."""
    if n_images < 1:
        raise FastpromptError(f"--images {n_images} must be at least 1")
    picked = spread_indices(run.data.labels, run.test_indices(), n_images)
    images, labels, _ = run.test_batch(picked, num_workers=num_workers)  # (N, 3, S, S), (N,)
    zs_pred = run.zero_shot()(images).argmax(-1)  # (N,)
    tr_pred = run.model(images).argmax(-1)  # (N,)
    zs_att, tr_att = run_attention(run, images)  # (N, Np) each
    grid = math.isqrt(zs_att.shape[-1])
    return AttentionMaps(images=_denormalise(images.cpu()), labels=labels.cpu().numpy(),
                         zero_shot=zs_att.view(-1, grid, grid).cpu().numpy(),  # (N, g, g)
                         trained=tr_att.view(-1, grid, grid).cpu().numpy(),  # (N, g, g)
                         zero_shot_pred=zs_pred.cpu().numpy(), trained_pred=tr_pred.cpu().numpy())


def _denormalise(images: torch.Tensor) -> np.ndarray:
    """Loader images [N, 3, S, S] (CLIP-normalised) -> [N, S, S, 3] in [0, 1] for display."""
    from fastprompt.data.pipelines import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (N, S, S, 3)


def _wrap(text: str, inches: float) -> str:
    """`text` wrapped to lines that fit `inches` at FONT_PT (a character of DejaVu Sans is at most
    about 0.6 em wide on average: a line of n characters takes n * 0.6 * FONT_PT points)."""
    chars = max(8, int(inches * 72 / (0.6 * FONT_PT)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def draw_attention(maps: AttentionMaps, classnames: list[str], method: str, changes_tower: bool):
    """The figure: one row per image; columns image | zero-shot attention | run attention (the
    last column is left out for text-only methods, whose attention equals zero-shot's). The
    caption and the panel titles are wrapped to the figure's and the panels' width, and the
    space above each row is as tall as its titles (a two-column CoOp figure once clipped its
    caption at both edges)."""
    plt = pyplot()
    n, size = len(maps.labels), maps.images.shape[1]
    cols = 3 if changes_tower else 2
    width, height = cols * PANEL_INCHES, n * PANEL_INCHES
    fig, axes = plt.subplots(n, cols, figsize=(width, height), squeeze=False)
    title_lines = 1
    for i in range(n):
        truth = classnames[maps.labels[i]]
        zs, tr = classnames[maps.zero_shot_pred[i]], classnames[maps.trained_pred[i]]
        panels = [(None, f"true: {truth}")]
        if changes_tower:
            panels += [(maps.zero_shot[i], f"zero-shot: {zs}"), (maps.trained[i], f"{method}: {tr}")]
        else:
            panels += [(maps.zero_shot[i], f"zero-shot: {zs}\n{method}: {tr}")]
        top = float(max(maps.zero_shot[i].max(), maps.trained[i].max()))  # one colour scale per row
        for ax, (heat, title) in zip(axes[i], panels):
            ax.imshow(maps.images[i], interpolation="nearest")
            if heat is not None:  # one block per patch: the attention is over patches, not pixels
                ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=top, interpolation="nearest",
                          extent=(0, size, size, 0))
            title = _wrap(title, 0.95 * PANEL_INCHES)
            title_lines = max(title_lines, title.count("\n") + 1)
            ax.set_title(title, fontsize=FONT_PT)
            ax.axis("off")
    if changes_tower:
        caption = f"last-layer class-token attention over patches: zero-shot CLIP | {method}"
    else:
        caption = f"{method} leaves the image tower unchanged: its attention equals zero-shot CLIP's"
    caption = _wrap(caption, 0.96 * width)
    margin = 0.05  # inches above the caption
    fig.suptitle(caption, fontsize=FONT_PT, y=1 - margin / height, va="top")
    titles = title_lines * LINE_INCHES + 0.08  # inches a row's titles take above its panels
    top = 1 - (margin + (caption.count("\n") + 1) * LINE_INCHES + titles) / height
    rows_inches = top * height - 0.01 * height  # the panels and the gaps between them
    gap = titles / ((rows_inches - (n - 1) * titles) / n)  # hspace: a fraction of a panel's height
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.01, top=top, wspace=0.05, hspace=gap)
    return fig


def plot_attention(run_dir: str, *, images: int = 8, out: Optional[str] = None, fmt: str = "png",
                   device: str = "cpu", num_workers: Optional[int] = None) -> Path:
    """Write the attention figure of `images` test images of a run; returns its path."""
    check_format(fmt)
    run = load_run(run_dir, device=device)
    maps = attention_maps(run, images, num_workers=num_workers)
    fig = draw_attention(maps, list(run.model.classnames), run.method, run.changes_image_tower)
    stem = f"attention-zeroshot-vs-{run.method}-{images}-test-images"
    return save_figure(fig, figures_dir(run.path, out), stem, fmt)
