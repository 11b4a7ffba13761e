"""Shared fixtures of the data-layer tests: small generated image trees and one demo .beton.

FFCV's writer forks processes and the first loader of a session compiles (or loads from
numba's cache) the decode kernels, so datasets are written once per session and shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastprompt.data import open_dataset, write_demo



def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth colour gradient (JPEG keeps it within a few levels): (H, W, 3) uint8."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)  # (H, W) each
    base = rng.uniform(60, 190, size=3)  # (3,)
    gx, gy = rng.uniform(-40, 40, size=(2, 3)) / max(height, width)  # (3,) each
    image = base + xx[..., None] * gx + yy[..., None] * gy  # (H, W, 3)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def write_tree(root: Path, files: dict[str, tuple[int, int]], seed: int = 0) -> dict[str, np.ndarray]:
    """Write PNGs at root/<relative path> with the given (height, width); returns their pixels."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for rel, (h, w) in sorted(files.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = smooth_image(rng, h, w)
        Image.fromarray(image).save(path)
        pixels[rel] = image
    return pixels


def files_in(folder: Path) -> list[str]:
    """Everything under `folder` (hidden files included): what a failed write must not leave."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def make_tree():
    """`write_tree` for tests (conftest helpers are reached through fixtures, not imports)."""
    return write_tree


@pytest.fixture
def list_files():
    """`files_in` for tests."""
    return files_in


@pytest.fixture(scope="session")
def demo_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo.beton"
    write_demo(out)
    return out


@pytest.fixture(scope="session")
def demo(demo_path):
    return open_dataset(demo_path)


@pytest.fixture(scope="session")
def flat_tree(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """3 classes x 10 square 32 px images + one large 200x80 image in class_b (stratified split)."""
    root = tmp_path_factory.mktemp("flat") / "my_shapes"
    files = {f"{c}/{k:02d}.png": (32, 32) for c in ("class_a", "class_b", "class_c") for k in range(10)}
    files["class_b/large.png"] = (80, 200)
    return root, write_tree(root, files)


@pytest.fixture(scope="session")
def coop_tree(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A EuroSAT-like tree with a CoOp split file whose class names are CoOp's cleaned names."""
    base = tmp_path_factory.mktemp("coop")
    root = base / "2750"
    folders = {"AnnualCrop": "Annual Crop Land", "Forest": "Forest", "SeaLake": "Sea or Lake"}
    files = {f"{folder}/{folder}_{k}.png": (24, 24) for folder in folders for k in range(6)}
    write_tree(root, files, seed=1)
    split = {"train": [], "val": [], "test": []}
    for label, (folder, name) in enumerate(folders.items()):
        paths = [f"{folder}/{folder}_{k}.png" for k in range(6)]
        split["train"] += [[p, label, name] for p in paths[:3]]
        split["val"] += [[paths[3], label, name]]
        split["test"] += [[p, label, name] for p in paths[4:]]
    split_json = base / "split_zhou_EuroSAT.json"
    split_json.write_text(json.dumps(split))
    return root, split_json, split
