"""`fastprompt plot tsne`: t-SNE of test image features, zero-shot CLIP vs a run (E2MIM's Figure 2 style).

Both panels embed the normalised image features [N, D] of the same test images (spread over
the classes, at most `max_images`) with scikit-learn's t-SNE (PCA init, a fixed random state,
perplexity 30 or less for small sets), coloured by ground-truth class; a legend names the
classes when there are at most 20. Text-only methods leave the image features at zero-shot's;
the figure then says so (their right panel would only repeat the left one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from fastprompt.errors import FastpromptError
from fastprompt.models import vision
from fastprompt.viz.attention import spread_indices
from fastprompt.viz.figures import check_format, figures_dir, pyplot, save_figure
from fastprompt.viz.runs import LoadedRun, load_run

FIGSIZE = (10.0, 4.5)  # inches: 1000 x 450 px at figures.DPI
LEGEND_MAX_CLASSES = 20


@torch.no_grad()
def test_features(run: LoadedRun, max_images: int, *, num_workers: Optional[int] = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(zero-shot features [N, D], run features [N, D], labels [N]) of up to `max_images` test images."""
    if max_images < 2:
        raise FastpromptError(f"--max-images {max_images} must be at least 2 (t-SNE needs points)")
    indices = run.test_indices()
    picked = spread_indices(run.data.labels, indices, min(max_images, len(indices)))
    zero_shot, trained, labels = [], [], []
    for images, y, _ in run.test_batches(picked, num_workers=num_workers):
        zs = F.normalize(vision.encode(run.model.clip.visual, images, backend=run.model.backend), dim=-1)  # (B, D)
        zero_shot.append(zs.cpu())
        trained.append(run.model.image_features(images).cpu() if run.changes_image_tower else zs.cpu())  # (B, D)
        labels.append(y.cpu())
    return torch.cat(zero_shot).numpy(), torch.cat(trained).numpy(), torch.cat(labels).numpy()


def embed_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """t-SNE of features [N, D] -> [N, 2]."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, (len(features) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def draw_tsne(zero_shot: np.ndarray, trained: np.ndarray, labels: np.ndarray, classnames: list[str],
              method: str, changes_tower: bool):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE)
    cmap = plt.get_cmap("tab20" if len(classnames) <= 20 else "hsv", max(len(classnames), 1))
    titles = ("zero-shot CLIP", method if changes_tower else f"{method} (image tower unchanged: = zero-shot)")
    for ax, points, title in zip(axes, (zero_shot, trained), titles):
        for c in np.unique(labels):
            mask = labels == c
            ax.scatter(points[mask, 0], points[mask, 1], s=8, color=cmap(int(c)), label=classnames[int(c)])
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classnames) <= LEGEND_MAX_CLASSES:
        axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, markerscale=1.5, frameon=False)
    fig.suptitle(f"t-SNE of {len(labels)} test image features, coloured by class", fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.8, bottom=0.03, top=0.88, wspace=0.05)
    return fig


def plot_tsne(run_dir: str, *, max_images: int = 1000, out: Optional[str] = None, fmt: str = "png",
              device: str = "cpu", num_workers: Optional[int] = None, seed: int = 0) -> Path:
    """Write the t-SNE figure of a run; returns its path."""
    check_format(fmt)
    run = load_run(run_dir, device=device)
    zero_shot, trained, labels = test_features(run, max_images, num_workers=num_workers)
    zs_2d = embed_2d(zero_shot, seed)
    tr_2d = embed_2d(trained, seed) if run.changes_image_tower else zs_2d
    fig = draw_tsne(zs_2d, tr_2d, labels, list(run.model.classnames), run.method, run.changes_image_tower)
    return save_figure(fig, figures_dir(run.path, out), f"tsne-test-features-zeroshot-vs-{run.method}", fmt)
