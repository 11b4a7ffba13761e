"""Packed training: N runs of one method, dataset, backbone, options, batch size and epochs
stepped as one (issue 24, part 2).

The runs differ only in their prompts, few-shot draws, orders and random streams, so one step
carries every run's batch through the frozen towers together:
- image tower: the N·B images in one pass. Frozen (`MethodSpec.frozen_image_tower`): one
  no-grad pass (or the runs' cached features). Prompted: each image's own run's prompts
  (`vision.encode` with prompts [N, L, P, d]: the prefix-attention path takes a prefix per
  image; a run's K/V projection of its prompts runs once per step, not per image);
- text tower: hand-crafted class features (`text` None) are the same for every run and used
  once; learnable context runs N·K prompts in one pass (`prompts.coop.packed_features`: N
  prefixes, each shared by its run's K class suffixes);
- loss: each run's `objective` (the cosine cross-entropy, plus KgCoOp's knowledge gap) of its own
  batch against its own class features; the step backpropagates their sum. No operation mixes rows of two runs (the towers are frozen,
  so no weight gradient sums over the batch), so run n's prompts get the gradient of run n's
  loss alone, what a solo run computes (tested: packed == solo, isolation).
Evaluation (`packed_logits`): N runs score one test batch; a frozen tower encodes each test image
once for the whole pack, a prompted one runs it once per run in one pass.
What stays per run: the model (its prompts; the frozen CLIP is one object shared by all), its
optimiser (momentum, weight decay, lr tensors: the engine sets each run's schedule as a solo
run's; the trainer clips no gradient, nor does the pack), its non-finite guard (`--nan-policy`:
a run whose loss goes non-finite fails alone, the others go on) and its running sums.

Which methods pack is declared (`MethodSpec.packs`), not guessed: a method packs when its
forward is the base `PromptModel`'s (text context and/or visual prompts) and its loss a function
of the image and class features alone (`PromptModel.objective`), so this module computes it for
N runs. A method that says `packs=False` (its own loss, a
gradient rule, per-image prompts or top-K tables) trains in packs of one; a method that
declares `packs=True` and still overrides the objective is refused (`check_packable`).

Kernels and compilation: the packed step calls the same Triton kernels as a solo step
(prefix attention with a per-image prefix, the fused cosine cross-entropy per run); with a
compile mode it is compiled as one graph with `training/compiled.py`'s settings (static
shapes: a pack that loses a run compiles once more). Single process: DDP is not packed.

`auto_pack_size` chooses N from measurements: the memory one more run adds (a probe step at 1
and 2 runs) against the device's free memory, and the throughput at that N against 1 run
(1 when N packed runs step slower than one after another: `min_gain`).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastprompt.errors import FastpromptError
from fastprompt.methods.base import PromptModel
from fastprompt.models import vision
from fastprompt.prompts.coop import CoopContext, packed_features
from fastprompt.training.compiled import compile_fn
from fastprompt.training.nonfinite import NonFiniteGuard

log = logging.getLogger(__name__)

# what a packable method computes with the base class's code (the objective this module packs)
OBJECTIVE_HOOKS = ("forward", "loss", "loss_and_logits", "loss_terms", "image_features", "text_features",
                   "tower_prompts", "extra_prompts", "prompt_context", "gradient_rule", "wants_topk_table", "set_epoch")


def packs(model: PromptModel) -> bool:
    """Whether `model`'s method declares that its runs train packed (`MethodSpec.packs`)."""
    spec = type(model).spec
    return bool(spec is not None and spec.packs)


def check_packable(models: Sequence[PromptModel]) -> None:
    """Refuse runs that cannot step as one pack, naming what differs and the fix."""
    if not models:
        raise FastpromptError("a pack needs at least one run")
    first = models[0]
    if not packs(first):
        raise FastpromptError(f"{first.method} does not declare that its runs pack (MethodSpec.packs); train its runs "
                              "one at a time (--pack off)")
    overridden = [name for name in OBJECTIVE_HOOKS if getattr(type(first), name) is not getattr(PromptModel, name)]
    if overridden:
        raise TypeError(f"{type(first).__qualname__} declares packs=True but overrides {', '.join(overridden)}: the pack "
                        "computes the base objective; declare packs=False or drop the overrides")
    if first.text is not None and not isinstance(first.text, CoopContext):
        raise TypeError(f"{type(first).__qualname__}: the pack runs a CoopContext text part, not {type(first.text).__name__}")
    for n, model in enumerate(models[1:], start=1):
        differs = None
        if type(model) is not type(first):
            differs = f"method {model.method}, run 0 {first.method}"
        elif model.clip is not first.clip:
            differs = "another CLIP instance (the runs of a pack share one frozen CLIP object)"
        elif model.backend != first.backend:
            differs = f"backend {model.backend}, run 0 {first.backend}"
        elif model.classnames != first.classnames or model.templates != first.templates:
            differs = "other classes or templates"
        elif model.resolved_options() != first.resolved_options():
            differs = f"options {model.resolved_options()}, run 0 {first.resolved_options()}"
        elif model.text is not None and not torch.equal(model.text.tokens, first.text.tokens):
            differs = "other prompt tokens"
        if differs is not None:
            raise FastpromptError(f"run {n} of the pack has {differs}; pack only runs of one method, CLIP, backend, "
                                  "class list and options")


def packed_loss(models: Sequence[PromptModel], images: Optional[torch.Tensor], labels: torch.Tensor,
                features: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses [N], detached logits [N, B, K]) of N packed runs of the base objective: row n is
    what `models[n].loss_and_logits(images[n], labels[n])` gives alone.

    images: [N, B, 3, S, S] (run n's batch in row n), or None with `features` [N, B, D] (a
    frozen tower's cached features); labels: [N, B] int64."""
    first = models[0]
    n_runs, batch = labels.shape
    if labels.dtype != torch.long or labels.dim() != 2 or n_runs != len(models):
        raise FastpromptError(f"labels must be int64 of shape [{len(models)}, B] (one batch per packed run); got "
                              f"{labels.dtype} {tuple(labels.shape)}")
    scale = first.logit_scale()  # () frozen τ, one CLIP
    if features is not None:  # a frozen tower's cached features
        if not first.frozen_image_tower:
            raise FastpromptError(f"{first.method} prompts its image tower; it needs images, not cached features")
        x = F.normalize(features.reshape(n_runs * batch, -1), dim=-1)  # (N·B, D)
    else:
        if images is None or images.dim() != 5 or tuple(images.shape[:2]) != (n_runs, batch):
            raise FastpromptError(f"images must be [{n_runs}, {batch}, 3, S, S] (one batch per packed run); got "
                                  f"{None if images is None else tuple(images.shape)}")
        x = packed_image_features(models, images.reshape(n_runs * batch, *images.shape[2:]))  # (N·B, D)
    x = x.view(n_runs, batch, -1)  # (N, B, D)
    w = packed_text_features(models)  # (N, K, D)
    losses = torch.stack([m.objective(x[n], w[n], labels[n]) for n, m in enumerate(models)])  # (N,): each run's own
    with torch.no_grad():
        logits = scale * x @ w.transpose(1, 2)  # (N, B, K)
    return losses, logits


def packed_image_features(models: Sequence[PromptModel], images: torch.Tensor) -> torch.Tensor:
    """Normalised image features [N·B, D] of N runs' images [N·B, 3, S, S] (run n's in rows n·B ..)
    in one pass: the frozen tower without grad, or each image through its own run's prompts."""
    first = models[0]
    if first.visual is None:
        return first.image_features(images, {})  # (N·B, D): the frozen tower, no grad, once for every run
    first._check_images(images)
    prompts = torch.stack([m.visual.prompts for m in models])  # (N, L, P, d): each run's own
    where = {"placement": first.visual.placement}
    if first.visual_mode == "shallow":
        kwargs = {"shallow": prompts[:, 0], **where}  # (N, P, d)
    else:
        kwargs = {"deep": prompts, "carry": first.visual.carry, **where}
    return F.normalize(vision.encode(first.clip.visual, images, backend=first.backend, **kwargs), dim=-1)  # (N·B, D)


def packed_text_features(models: Sequence[PromptModel]) -> torch.Tensor:
    """Normalised class features [N, K, D] of N runs: the cached hand-crafted features once, or
    every run's context in one pass of the text tower."""
    first = models[0]
    if first.text is None:
        return first.template_features.expand(len(models), -1, -1)  # (N, K, D): the same for every run
    return F.normalize(packed_features([m.text for m in models], first.clip, first.backend), dim=-1)  # (N, K, D)


@torch.no_grad()
def packed_logits(models: Sequence[PromptModel], images: torch.Tensor,
                  text: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Evaluation logits [N, B, K] of N runs on one batch of images [B, 3, S, S] (a test set all
    runs score): row n equals `models[n](images)`. A frozen image tower encodes each image once
    for the whole pack; a prompted one runs the B images once per run, in one pass. `text`: the
    runs' `packed_text_features` [N, K, D], computed once for a whole test set (eval mode)."""
    n_runs, batch = len(models), images.shape[0]
    w = packed_text_features(models) if text is None else text  # (N, K, D)
    if models[0].visual is None:
        x = packed_image_features(models[:1], images).expand(n_runs, -1, -1)  # (N, B, D): one pass for all
    else:
        x = packed_image_features(models, images.repeat(n_runs, 1, 1, 1)).view(n_runs, batch, -1)  # (N, B, D)
    return models[0].logit_scale() * x @ w.transpose(1, 2)  # (N, B, K)


class PackedForward(nn.Module):
    """`packed_loss` of a list of models as a module's forward (what `compile_fn` compiles)."""

    def __init__(self, models: Sequence[PromptModel]):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, images: Optional[torch.Tensor], labels: torch.Tensor, features: Optional[torch.Tensor] = None):
        return packed_loss(list(self.models), images, labels, features)


@dataclass
class RunEpoch:
    """One packed run's epoch: what the solo trainer's metrics line and stop checks read."""

    run: int  # index in the pack's runs
    loss: float  # mean training loss over its images
    train_accuracy: float  # %
    images: int
    skipped_steps: Optional[int]  # --nan-policy skip: steps skipped; None under stop
    bad_step: Optional[int]  # --nan-policy stop: first non-finite step (1-based); None when all were finite
    skipped_all: bool  # --nan-policy skip: every step of the epoch was skipped

    @property
    def failed(self) -> bool:
        return self.bad_step is not None or self.skipped_all

    def failure(self, epoch: int) -> Optional[str]:
        """The trainer's words for this run's stop (epoch 1-based), None when it goes on."""
        if self.bad_step is not None:
            return f"the loss became non-finite (NaN or inf) at epoch {epoch} step {self.bad_step}"
        if self.skipped_all:
            return (f"every step of epoch {epoch} had a non-finite loss (NaN or inf) and was skipped (--nan-policy skip): "
                    "the run no longer trains")
        return None


class Pack:
    """N runs trained as one: `step` takes one batch per active run, `end_epoch` reads each run's
    sums and drops the runs that failed. The caller (the engine) owns the loaders, each run's lr
    schedule (its optimiser's lr tensors), checkpoints and results, as for a solo run."""

    def __init__(self, models: Sequence[PromptModel], optimizers: Sequence[torch.optim.Optimizer],
                 nan_policy: str = "stop", *, compile_mode: Optional[str] = None, compile_backend: str = "inductor",
                 autocast: Callable = nullcontext):
        check_packable(models)
        if len(optimizers) != len(models):
            raise ValueError(f"{len(models)} runs need {len(models)} optimisers, got {len(optimizers)}")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise FastpromptError("packed runs train in one process; run the pack without torchrun, or --pack off")
        self.models = list(models)
        self.optimizers = list(optimizers)
        self.device = models[0].bundle.device
        self.guards = [NonFiniteGuard(nan_policy, self.device) for _ in models]
        self.nan_policy = nan_policy
        self.compile_mode, self.compile_backend = compile_mode, compile_backend
        self.autocast = autocast
        self.active = list(range(len(models)))  # the runs still training, in batch order
        self._forward = self._compiled()
        self._sums = self._zeros()

    def _compiled(self) -> Callable:
        """The forward of the active runs (compiled when asked), and their columns of the sums."""
        self._index = torch.tensor(self.active, device=self.device)  # (N,)
        module = PackedForward([self.models[r] for r in self.active])
        return compile_fn(module, self.compile_mode, device=self.device, backend=self.compile_backend)

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(3, len(self.models), dtype=torch.float64, device=self.device)  # loss·b, correct, seen

    @property
    def execution(self) -> str:
        """How the pack runs, for the log: compiled or eager, and the kernels of its backend."""
        mode = f"torch.compile {self.compile_mode}" if self.compile_mode else "eager"
        return f"{len(self.active)} runs of {self.models[0].method} packed, {mode}, backend {self.models[0].backend}"

    def start_epoch(self) -> None:
        for guard in self.guards:
            guard.start_epoch()
        self._sums = self._zeros()

    def step(self, images: Optional[Sequence[torch.Tensor]], labels: Sequence[torch.Tensor], step: int,
             features: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """One step of every active run on its own batch (`images[i]`, `labels[i]` of run
        `active[i]`; `features` in place of images for a frozen tower's cache); `step` is the
        0-based step of the epoch. Returns the losses [n] (detached, on the device).

        Each may be a list of the runs' tensors (stacked here: one copy of the images a step) or
        one tensor [n, B, ...] already (loaders that fill one buffer per pack: no copy)."""
        n = len(self.active)
        if len(labels) != n or (images is not None and len(images) != n) or (features is not None and len(features) != n):
            raise ValueError(f"a step of this pack takes one batch per active run ({n}: runs {self.active})")
        sizes = {int(y.shape[0]) for y in labels}  # a tensor [N, B]: its rows
        if len(sizes) != 1:
            raise FastpromptError(f"the packed runs' batches have {sorted(sizes)} images; a pack steps equal batches "
                                  "(the same shots, classes and batch size)")
        for r in self.active:
            self.optimizers[r].zero_grad(set_to_none=True)
        y = _stacked(labels)  # (N, B)
        if self.compile_mode == "reduce-overhead" and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the last step's outputs may be overwritten
        with self.autocast():
            if features is not None:
                losses, logits = self._forward(None, y, _stacked(features))  # (N,), (N, B, K)
            else:
                losses, logits = self._forward(_stacked(images), y)  # (N,), (N, B, K)
        ok = [self.guards[r].step_ok(losses[i], step) for i, r in enumerate(self.active)]  # stop: no host read
        if all(ok):
            losses.sum().backward()  # run n's prompts get d loss_n alone (no op mixes runs)
            trained = list(range(n))
        else:  # --nan-policy skip: the bad runs neither backpropagate nor step (their sums skip the batch)
            trained = [i for i in range(n) if ok[i]]
            if trained:
                losses[trained].sum().backward()
        for i in trained:
            self.optimizers[self.active[i]].step()
        loss_value = losses.detach()  # (N,)
        batch = y.shape[1]
        stats = torch.stack([loss_value.double() * batch, (logits.argmax(-1) == y).sum(-1).double(),
                             torch.full_like(loss_value, batch, dtype=torch.float64)])  # (3, N)
        if len(trained) == n:
            self._sums.index_add_(1, self._index, stats)  # every active run's column
        elif trained:
            index = torch.tensor([self.active[i] for i in trained], device=self.device)
            self._sums.index_add_(1, index, stats[:, trained])
        return loss_value

    def end_epoch(self) -> list[RunEpoch]:
        """Each active run's epoch (one host read for all); the runs that failed leave the pack
        (the others go on: the next step takes batches of `active` only)."""
        sums = self._sums.tolist()  # CPU-GPU sync: once per epoch
        lines = []
        for r in self.active:
            guard = self.guards[r]
            bad = guard.end_epoch()
            loss, correct, seen = sums[0][r], sums[1][r], sums[2][r]
            lines.append(RunEpoch(run=r, loss=loss / max(seen, 1), train_accuracy=100.0 * correct / max(seen, 1),
                                  images=int(seen), skipped_steps=guard.skipped if self.nan_policy == "skip" else None,
                                  bad_step=bad, skipped_all=guard.skipped_all))
        failed = {line.run for line in lines if line.failed}
        if failed:
            self.active = [r for r in self.active if r not in failed]
            if self.active:
                self._forward = self._compiled()
        return lines


def _stacked(batches) -> torch.Tensor:
    """The runs' batches as one tensor [N, B, ...]: a tensor as it is, a list stacked."""
    return batches if torch.is_tensor(batches) else torch.stack(list(batches))


# ------------------------------------------------------------------ choosing N (`--pack auto`)
@dataclass(frozen=True)
class AutoPack:
    size: int  # runs per pack
    reason: str  # one line: what was measured and why this size

    def line(self) -> str:
        return f"--pack auto: {self.size} run{'s' if self.size > 1 else ''} per pack ({self.reason})"


def available_memory(device: torch.device) -> int:
    """Bytes a pack may still take: on CUDA the device's free memory plus what the caching
    allocator holds unused; on CPU the kernel's MemAvailable (Linux) or the free pages."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        raise FastpromptError("--pack auto cannot read this machine's available memory; pass --pack N") from None


def step_memory(probe: Callable[[int], None], runs: int, device: torch.device) -> int:
    """Bytes one probe step of `runs` runs takes beyond what was allocated before it: on CUDA the
    allocator's peak; on CPU the tensors autograd saves for the backward (the activations, what
    grows with the runs), each storage counted once."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        probe(runs)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    seen: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        probe(runs)
    return sum(seen.values())


def probe_step(models: Sequence[PromptModel], images: Optional[torch.Tensor], labels: torch.Tensor,
               features: Optional[torch.Tensor] = None, autocast: Callable = nullcontext) -> Callable[[int], None]:
    """`probe(n)` for `auto_pack_size`: the forward and backward of a packed step of n runs on one
    run's batch (images [B, 3, S, S] or features [B, D], labels [B]) repeated, the models taken in
    turn from `models` (two are enough: the probe measures, it trains nothing; gradients are
    dropped, no optimiser steps)."""

    def probe(n: int) -> None:
        runs = [models[i % len(models)] for i in range(n)]
        with autocast():
            losses, _ = packed_loss(runs, None if images is None else images.expand(n, *images.shape),
                                    labels.expand(n, -1),
                                    None if features is None else features.expand(n, *features.shape))
        losses.sum().backward()
        for model in models:
            model.zero_grad(set_to_none=True)

    return probe


def auto_pack_size(probe: Callable[[int], None], runs: int, device: torch.device, *,
                   available: Optional[int] = None, headroom: float = 0.8, min_gain: float = 1.0, repeats: int = 3,
                   clock: Optional[Callable[[], float]] = None) -> AutoPack:
    """How many of `runs` runs to pack, measured with `probe(n)`: one training step of n packed
    runs on their real batch shapes (the engine's).

    Memory: a step of 1 and of 2 runs; one more run costs the difference, the rest is the
    pack's base; N fits when base + N·per-run stays within `headroom` of `available`
    (`available_memory(device)` unless given). Gain: the median of `repeats` timed steps at 1
    run and at that N (each after one untimed step); when N runs' total throughput is less than
    `min_gain` times one run's, nothing is gained and the answer is 1. The default, 1.0, packs at
    step parity: a pack also shares its CLIP build, its data and its test encoding, so steps that
    are no slower packed still finish the runs sooner. The clock: wall time on CUDA (after a
    synchronize), this process's CPU time on CPU, so other processes' load on a shared machine
    does not decide the choice (measured: wall-clock probes on a loaded 2-core machine read
    1.08x-1.96x for one setting)."""
    if clock is None:
        clock = time.perf_counter if device.type == "cuda" else time.process_time
    if runs <= 1:
        return AutoPack(1, "one run")
    one = step_memory(probe, 1, device)
    two = step_memory(probe, 2, device)
    per_run = max(two - one, 1)
    base = max(one - per_run, 0)
    free = available_memory(device) if available is None else available
    fit = int((headroom * free - base) // per_run)
    mib = lambda b: f"{b / 2 ** 20:.1f} MiB"  # noqa: E731
    memory = f"{mib(per_run)} a run + {mib(base)} against {mib(free)} available"
    if fit <= 1:
        return AutoPack(1, f"memory: {memory} fits one run")
    size = min(fit, runs)

    def seconds(n: int) -> float:
        probe(n)  # untimed: allocation, compile
        times = []
        for _ in range(repeats):
            start = clock()
            probe(n)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(clock() - start)
        return statistics.median(times)

    solo, packed = seconds(1), seconds(size)
    gain = size * solo / max(packed, 1e-12)  # total throughput at N runs against 1
    timing = f"{size} runs step {gain:.2f}x the images/s of one"
    if gain < min_gain:
        return AutoPack(1, f"{timing}, below {min_gain:g}x: nothing gained; {memory}")
    return AutoPack(size, f"{timing}; {memory}" + ("" if size == runs else f", {fit} fit"))
