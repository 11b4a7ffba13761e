"""`torch.compile` of the training step, with a persistent compile cache.

`compile_step(model)` returns `step(images, labels, **extra) -> (loss, logits)` that runs
`model.loss_and_logits` under `torch.compile` with static shapes (`dynamic=False`). Only the
forward is compiled explicitly; calling `loss.backward()` afterwards runs the backward graph
that AOTAutograd traced and inductor compiled together with the forward; the optimiser step
is one fused kernel per param group outside the compiled region.

Compiled code is cached on disk (inductor's FX graph cache and AOTAutograd's cache) under
`TORCHINDUCTOR_CACHE_DIR`, which defaults here to `$FASTPROMPT_CACHE/inductor` (or
`~/.cache/fastprompt/inductor`) unless the user already set it; a second run of the same
model and shapes skips code generation and the C++/Triton compile, leaving dynamo's
tracing (seconds) as the start-up cost.

The whole training step and CUDA graphs (`--compile reduce-overhead`, the trainer):
- forward and backward: one dynamo graph per method (`fullgraph=True` holds for every method
  and variant, tested), split by AOTAutograd into a forward and a backward graph, each
  captured as a CUDA graph by inductor's cudagraph trees;
- no Python branch on a tensor value and no host read inside the step: CAVPT's gt-only term
  is a masked mean, E2MIM's class-wise pairs have a static count with a keep mask, and the
  trainer keeps its running sums and non-finite check on the device (read once per epoch);
- static shapes: every batch of a run has one shape (the loader and the feature cache drop
  the ragged last batch, Dassl's rule; a subset smaller than one batch is one smaller batch
  every epoch, again one shape), so one graph per run; CAVPT released's guidance switches
  off after `guidance_epochs` (a Python attribute): one recompile, one more graph;
- the optimiser is fused (`torch.optim.SGD/AdamW(fused=True)`: one kernel per param group)
  with each group's lr a device tensor filled in place per epoch, so the step outside the
  graphs is a few kernel launches and the lr never recompiles; the trainer zeroes gradients
  before each forward and calls `torch.compiler.cudagraph_mark_step_begin()`.
What only a GPU can confirm (the CPU suite cannot run CUDA graphs): that cudagraph trees
capture both graphs without "skipping cudagraphs" (e.g. for a CPU tensor input or a mutated
input), that E2MIM's random draws (`randperm`, the Beta sample) replay correctly inside a
graph, the fused kernels' tensor-lr path, and the speed-up itself.

Limits:
- static shapes: a new batch size or class count compiles again;
- `mode="reduce-overhead"` uses CUDA graphs on GPU: the returned tensors are overwritten
  by the next call, so read the loss before stepping again;
- CPU inductor needs a C++ compiler (`g++`, or `$CXX`), checked up front;
- data-dependent Python control flow in a method splits the region into several graphs
  (allowed unless `fullgraph=True`); `graph_breaks()` lists where. See the test
  `tests/training/test_compiled.py`: every method compiles as one graph;
- under DistributedDataParallel dynamo splits the graph at gradient buckets by design;
- a method with a gradient rule (ProGrad, `PromptModel.gradient_rule`): the trainer compiles
  its `loss_terms` forward and runs one AOTAutograd backward per term (`torch.autograd.grad`,
  the graph retained in between); `reduce-overhead` is refused for it (CUDA graphs replay one
  backward per step).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from fastprompt.errors import FastpromptError
from fastprompt.files import cache_dir

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
Step = Callable[..., tuple[torch.Tensor, torch.Tensor]]



def _inductor_default_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default
    except ImportError:  # private API moved: the value it has had for years
        import getpass
        import tempfile

        return os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    return inductor_default()


def user_cache_dir() -> Optional[str]:
    """`TORCHINDUCTOR_CACHE_DIR` when the user set it. Inductor writes its own default into the
    environment the first time it needs the folder (importing open_clip already does), so
    that value does not count as the user's."""
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not value or os.path.abspath(value) == os.path.abspath(_inductor_default_dir()):
        return None
    return value


def default_cache_dir() -> Path:
    """`$FASTPROMPT_CACHE/inductor`, else `$XDG_CACHE_HOME/fastprompt/inductor` or `~/.cache/fastprompt/inductor`."""
    return cache_dir() / "inductor"


def configure_compile_cache(cache_dir: Optional[str] = None) -> Path:
    """Turn on inductor's persistent caches and point them at fastprompt's cache folder.

    An explicit `cache_dir` wins; else a `TORCHINDUCTOR_CACHE_DIR` the user set is kept;
    else `default_cache_dir()`. Returns the folder in use."""
    if cache_dir is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    elif user_cache_dir() is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(default_cache_dir())
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True  # compiled kernels + wrapper, keyed by graph and inputs
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True  # the joint forward/backward split, too
    path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    log.debug("torch.compile cache in %s", path)
    return path


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _check_compiler(device: torch.device) -> None:
    """CPU inductor writes C++; fail now, with the fix, rather than deep inside the compile."""
    if device.type != "cpu":
        return
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None and shutil.which("c++") is None:
        raise FastpromptError(
            f"torch.compile on CPU needs a C++ compiler and none was found ({cxx}); install g++ "
            "(e.g. apt-get install g++) or switch compilation off (--compile off; mode=None in Python)"
        )


def compile_fn(fn: Callable, mode: Optional[str] = "default", *, device: torch.device = torch.device("cpu"),
               fullgraph: bool = False, backend: str = "inductor", cache_dir: Optional[str] = None) -> Callable:
    """`torch.compile(fn)` with fastprompt's settings (static shapes, cache); `mode=None` returns `fn`.

    mode: inductor's mode (`default`, `reduce-overhead`, `max-autotune`); backend: `inductor`,
    or another dynamo backend such as `aot_eager` (tests; only with mode `default`);
    fullgraph=True makes any graph break an error instead of a split."""
    if mode is None:
        return fn
    if mode not in COMPILE_MODES:
        raise FastpromptError(f"compile mode {mode!r} is not known; use one of {', '.join(COMPILE_MODES)}, or None for eager")
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise FastpromptError(f"torch.compile backend {backend!r} is not known; use inductor (or aot_eager to debug)")
    if backend != "inductor" and mode != "default":
        raise FastpromptError(f"mode={mode!r} is an inductor setting; backend {backend!r} takes mode 'default'")
    if backend == "inductor":
        _check_compiler(device)
        configure_compile_cache(cache_dir)
    kwargs = {"mode": mode} if backend == "inductor" and mode != "default" else {}
    return torch.compile(fn, backend=backend, dynamic=False, fullgraph=fullgraph, **kwargs)


def compile_step(model: torch.nn.Module, mode: Optional[str] = "default", *, fullgraph: bool = False,
                 backend: str = "inductor", cache_dir: Optional[str] = None) -> Step:
    """The compiled training step of a `PromptModel`: `step(images, labels, **extra) -> (loss, logits)`.

    Equals `model.loss_and_logits` (tested: loss, logits and every prompt gradient); call
    `loss.backward()` on the result as usual. `extra` carries method inputs such as CAVPT's
    `topk`. mode=None gives the eager step (compilation off)."""
    if not hasattr(model, "loss_and_logits"):
        raise FastpromptError(f"compile_step needs a fastprompt PromptModel (with loss_and_logits), got {type(model).__name__}")

    def step(images: torch.Tensor, labels: torch.Tensor, **extra) -> tuple[torch.Tensor, torch.Tensor]:
        return model.loss_and_logits(images, labels, **extra)

    return compile_fn(step, mode, device=_model_device(model), fullgraph=fullgraph, backend=backend,
                      cache_dir=cache_dir)


def graph_breaks(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, **extra) -> list[str]:
    """Where dynamo splits `model.loss_and_logits` on these inputs: `file:line: reason` per break
    (innermost frame of fastprompt code first); an empty list means one graph."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.loss_and_logits)(images, labels, **extra)
    torch._dynamo.reset()
    found: dict[str, None] = {}  # ordered set: dynamo reports a break again on every restart
    for brk in explained.break_reasons:
        frames = [f for f in brk.user_stack if "fastprompt" in f.filename] or list(brk.user_stack)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        reason = " ".join(str(brk.reason).split()).split(" Explanation:")[0][:160]
        found[f"{where}: {reason}"] = None
    return list(found)


def compile_cache_is_warm() -> bool:
    """Whether the compile cache in use already holds compiled graphs (FX graph cache entries):
    a first compile on this machine costs minutes, a cached one seconds."""
    folder = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()).expanduser() / "fxgraph"
    return folder.is_dir() and any(folder.iterdir())
