"""A finished run rebuilt from its directory, and the zero-shot CLIP it started from.

One place that loads runs for the figures: `fastprompt.load_run` (config.json +
prompts.safetensors -> the method's model with its prompts) plus the dataset of the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fastprompt.errors import FastpromptError


@dataclass
class LoadedRun:
    """A run's directory, saved config, model (eval mode, prompts loaded) and dataset."""

    path: Path
    config: dict  # config.json: the TrainConfig plus the run's facts (classnames, template, weights_id)
    model: "torch.nn.Module"  # the method's PromptModel
    data: "object"  # fastprompt.data.BetonDataset the run trained on
    device: torch.device

    @property
    def method(self) -> str:
        return str(self.config["method"])

    @property
    def classes(self) -> str:
        """The class subset the run trained on ("all" or "base")."""
        return str(self.config.get("classes", "all"))

    @property
    def changes_image_tower(self) -> bool:
        """False for text-only methods: their image features and attention equal zero-shot CLIP's."""
        return not self.model.frozen_image_tower

    def zero_shot(self) -> "torch.nn.Module":
        """Zero-shot CLIP on the run's classes and template, sharing the run's frozen CLIP."""
        from fastprompt.methods import create_model

        model = create_model("zeroshot", list(self.model.classnames), clip=self.model.clip,
                             template=list(self.model.templates), device=self.device)
        return model.eval()

    def test_batch(self, indices: np.ndarray, *, num_workers: Optional[int] = None):
        """(images [B, 3, S, S] normalised, labels [B], .beton indices [B]) of test images `indices`."""
        return next(iter(self.test_batches(indices, batch_size=len(indices), num_workers=num_workers)))

    def test_batches(self, indices: np.ndarray, *, batch_size: int = 128, num_workers: Optional[int] = None):
        """Batches (images, labels, .beton indices) over test images `indices`, in index order."""
        from fastprompt.data.loaders import make_loader
        from fastprompt.data.pipelines import LoaderConfig

        config = LoaderConfig(train=False, image_size=self.model.bundle.image_size, batch_size=batch_size,
                              device=self.device, num_workers=num_workers, drop_last=False, return_indices=True)
        return make_loader(self.data, np.sort(indices), "test", self.classes, config)

    def test_indices(self) -> np.ndarray:
        """Sorted .beton indices of the run's test split (its classes)."""
        return self.data.indices("test", classes=self.classes)


def load_run(run_dir: str, *, device: str = "cpu") -> LoadedRun:
    """Rebuild a finished `fastprompt train` run (its model with the learned prompts) from `run_dir`
    through `fastprompt.load_run`, with the dataset it trained on."""
    from fastprompt.data import open_dataset
    from fastprompt.runtime import resolve_device
    from fastprompt.training.evaluate import load_run as load_model
    from fastprompt.training.runfiles import read_run_config

    path = Path(run_dir)
    dev = resolve_device(device)
    model = load_model(str(path), device=str(dev))
    saved = read_run_config(path)
    data = open_dataset(saved["data"])
    if data.classnames_for(saved.get("classes", "all")) != saved["classnames"]:
        raise FastpromptError(f"{saved['data']} no longer holds the classes {path} trained on; rewrite it or retrain")
    return LoadedRun(path=path, config=saved, model=model, data=data, device=dev)
