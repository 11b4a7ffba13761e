"""Test-suite setup.

Without CUDA, Triton kernels run in interpreter mode: TRITON_INTERPRET must be set before
any `@triton.jit` function is defined, so it is set here, before fastprompt is imported.
"""

import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# fastprompt's caches (hand-crafted text features, image features) start empty in every test
# session, out of the user's cache dir: a cached value is whatever the run that first computed it
# got, and fp32 results depend on the thread count (reduction order), so a folder filled by an
# earlier run (under `-n 0`: 2 threads a process; `-n 2`: 1) fed other numbers to this one
# (issue 21: a fresh clone failed where an older folder passed). The first process makes the
# folder; xdist workers and the subprocesses tests start inherit it; its maker removes it at exit.
if "FASTPROMPT_TEST_SESSION_CACHE" not in os.environ:
    os.environ["FASTPROMPT_TEST_SESSION_CACHE"] = tempfile.mkdtemp(prefix="fastprompt-test-cache-")
    atexit.register(shutil.rmtree, os.environ["FASTPROMPT_TEST_SESSION_CACHE"], ignore_errors=True)
os.environ["FASTPROMPT_CACHE"] = os.environ["FASTPROMPT_TEST_SESSION_CACHE"]
# torch.compile's cache stays across sessions and clones (a cold compile costs minutes; in the
# clone's .pytest_cache every fresh clone paid them), in the user's cache folder, like pip's wheel cache: inductor keys an entry by the graph, its inputs,
# torch's version and config, and a hit is the code a fresh compile would make, so no number of an
# earlier run comes back through it.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastprompt", "test-inductor"))
# Under pytest-xdist (scripts/test.sh runs one worker per core) each worker keeps to its share of the cores.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))

from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402


@pytest.fixture(scope="session")
def build_once(tmp_path_factory) -> Callable[[str, Callable[[Path], None]], Path]:
    """`build_once(name, build)`: the path of `name`, made by `build(path)` once per test session.

    Under pytest-xdist the workers of one session share a folder (the parent of each worker's
    base temporary folder) and the first worker to ask builds the file while the others wait:
    a session fixture alone would build it once per worker (the demo CLIP's pretraining takes
    15-30 s). Without xdist it is a fresh temporary folder, as `tmp_path_factory.mktemp`."""

    def build_file(name: str, build: Callable[[Path], None]) -> Path:
        if os.environ.get("PYTEST_XDIST_WORKER") is None:
            path = tmp_path_factory.mktemp(name) / name
            build(path)
            return path
        folder = tmp_path_factory.getbasetemp().parent / "shared" / name
        folder.mkdir(parents=True, exist_ok=True)
        path, done = folder / name, folder / ".done"
        with FileLock(str(folder / ".lock")):
            if not done.is_file():
                build(path)
                done.touch()
        return path

    return build_file


@pytest.fixture(scope="session")
def demo_clip(build_once):
    """fastprompt-tiny pretrained on the synthetic colour-shape captions (never the demo's
    classes), 300 steps (~15-30 s), as `fastprompt prepare demo-clip` runs by default."""
    from fastprompt.training.pretrain import PretrainConfig, pretrain_clip

    return build_once("demo-clip.pt", lambda path: pretrain_clip(str(path), PretrainConfig(steps=300)))  # warm-up: 30 steps


@pytest.fixture(scope="session", autouse=True)
def numba_kernels_cached(build_once, request) -> None:
    """fastprompt's numba decode kernels (`cache=True`: cached beside their sources, so a fresh
    clone has none) compiled and cached before the first test. Every process that decodes a batch
    before they are cached compiles them itself (12-40 s of CPU): under pytest-xdist both workers
    and the `fastprompt` processes that the first tests start (sweeps, kills) did so at once.
    One worker compiles them here, decoding a train and a test batch of a tiny demo set as
    `fastprompt train` does; with a warm cache this loads them.

    The other workers would wait on that compile (28-34 s of CPU cold, one core idle): when a
    collected test needs the demo CLIP, they pretrain it first (`demo_clip`: torch only, no numba
    decode, 15-30 s that one worker pays anyway), so both cores work while the kernels compile.
    Worker gw0 goes straight to the kernels. Should the pretraining fail, only the tests that use
    the demo CLIP fail: pytest keeps a session fixture's error and raises it in each of them."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker not in (None, "gw0") and any("demo_clip" in item.fixturenames for item in request.session.items):
        try:
            request.getfixturevalue("demo_clip")
        except Exception:  # reported by every test that uses demo_clip (above), not by every test of this worker
            pass

    def decode(path: Path) -> None:
        from fastprompt.data import open_dataset, write_demo

        write_demo(str(path), images_per_class=5, seed=0)
        data = open_dataset(path)
        for split in ("train", "test"):
            next(iter(data.loader(split, image_size=64, batch_size=4, num_workers=1)))
        # the few-shot set decoded once (`decoded_cache`, what vlp's and most training loaders take):
        # its kernels too (uncached, every process that reached them compiled them: ≈ 6 s of CPU each)
        next(iter(data.loader("train", shots=2, image_size=64, batch_size=4, num_workers=1, decoded_cache="auto")))

    build_once("numba-kernels.beton", decode)


@pytest.fixture
def failing_writes(monkeypatch) -> Callable[[Path, int], None]:
    """`failing_writes(folder, errno)`: every file or folder created under `folder` fails with
    OSError(errno), as on a read-only (EROFS) or full (ENOSPC) disk. Tests run as root, whom
    chmod 555 does not stop, so the error is injected at Python's openers (builtins and io
    `open`, `os.open` under tempfile) and `os.mkdir`, wherever fastprompt writes."""
    import builtins
    import io

    def arm(folder: Path, code: int) -> None:
        inside = lambda path: Path(os.fsdecode(path)).absolute().is_relative_to(Path(folder).absolute())
        fail = lambda path: OSError(code, os.strerror(code), os.fsdecode(path))
        real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
                raise fail(file)
            return real_open(file, mode, *args, **kwargs)

        def os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
                raise fail(path)
            return real_os_open(path, flags, *args, **kwargs)

        def mkdir(path, *args, **kwargs):
            if inside(path):
                raise fail(path)
            return real_mkdir(path, *args, **kwargs)

        for owner, name, fake in ((builtins, "open", open_), (io, "open", open_), (os, "open", os_open),
                                  (os, "mkdir", mkdir)):
            monkeypatch.setattr(owner, name, fake)

    return arm


@pytest.fixture(scope="session")
def tiny_clip():
    """A random-init fastprompt-tiny CLIP (64 px input), the same weights for the whole session."""
    from fastprompt.models.clip import load_clip

    torch.manual_seed(0)
    return load_clip("fastprompt-tiny", None).model


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """fastprompt-tiny's random-init weights (seed 0) as a checkpoint file: weights that no run's seed
    draws (`--pretrained none` does), so runs of several seeds share them and pack."""
    from fastprompt.models.clip import load_clip

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-weights") / "tiny.pt"
    torch.save(load_clip("fastprompt-tiny", None).model.state_dict(), path)
    return path


@pytest.fixture
def images():
    """Four normalised-looking 64 px images with labels covering three classes."""
    g = torch.Generator().manual_seed(123)
    return torch.randn(4, 3, 64, 64, generator=g)


@pytest.fixture
def labels():
    return torch.tensor([0, 1, 2, 0])

