"""Test-suite setup.

Without CUDA, Triton kernels run in interpreter mode: TRITON_INTERPRET must be set before
any `@triton.jit` function is defined, so it is set here, before fastprompt is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep the hand-crafted feature cache of the test run out of the user's cache dir.
os.environ.setdefault("FASTPROMPT_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "fastprompt"))
torch.set_num_threads(min(2, os.cpu_count() or 1))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip():
    """A random-init fastprompt-tiny CLIP (64 px input), the same weights for the whole session."""
    from fastprompt.models.clip import load_clip

    torch.manual_seed(0)
    return load_clip("fastprompt-tiny", None).model


@pytest.fixture
def images():
    """Four normalised-looking 64 px images with labels covering three classes."""
    g = torch.Generator().manual_seed(123)
    return torch.randn(4, 3, 64, 64, generator=g)


@pytest.fixture
def labels():
    return torch.tensor([0, 1, 2, 0])

