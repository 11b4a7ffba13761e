"""The engine: executes planned runs (`fastprompt.training.plan`), alone or packed.

`execute(plans, pack=...)` runs every plan to the end. Plans that may share every step (the
same dataset file, backbone and weights, method, options, template, classes, shots, batch size,
epochs and execution settings: `pack_key`) train together, up to `pack` runs at once
(`fastprompt.training.pack.Pack`: one pass of the frozen towers, each run's loss moving only its
own prompts); every other plan trains alone (`trainer.train`). Packing is execution only, like
`--device`: each run of a pack is built, resumed, checkpointed and evaluated by its own
`Trainer`, exactly as alone, so its folder is an ordinary run directory with the solo run's
config.json and identity, and a later solo command continues it.

What packs: a method that declares it (`MethodSpec.packs`), with pretrained weights (random
weights are drawn from each run's seed: no CLIP to share), without a feature cache, in one
process (not under torchrun). Each run's model is built as alone (its seed, then CLIP, then its
prompts: the same prompt init as the solo run) on the pack's one CLIP object, built once: a later
run replays the first build's random draws instead of building (`shared_clip.SharedClip`).

Resuming: each run resumes from its own checkpoint; runs of a pack killed between two runs'
checkpoint writes stand at different epochs, so an epoch packs the runs at the earliest epoch
(the others wait for them), and a resumed pack ends where an uninterrupted one does.

A pack whose image tower is frozen encodes each test image once for the whole pack (each run's
logits from its own class features; `_TestFeatures`).

A failing run (a non-finite loss, a damaged checkpoint, a write error) fails alone: with
`keep_going` it is reported (`on_result(plan, None, error)`) and the other runs go on; without,
the first failure is raised.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from fastprompt.errors import FastpromptError, one_line
from fastprompt.training.hooks import exit_after_step
from fastprompt.training.pack import Pack, auto_pack_size, probe_step
from fastprompt.training.plan import Packing, RunPlan, pack_groups
from fastprompt.training.shared_clip import SharedClip
from fastprompt.training.trainer import Trainer, finished_run, train

log = logging.getLogger(__name__)

Report = Callable[[RunPlan, Optional[dict], Optional[str]], None]


def execute(plans: Sequence[RunPlan], console=None, *, pack: Packing = 1,
            on_epoch: Optional[Callable[[RunPlan], Optional[Callable[[dict], None]]]] = None,
            on_result: Optional[Report] = None, force_eval: bool = False, keep_going: bool = False) -> list[Optional[dict]]:
    """Execute planned runs, each to the end; returns their results.json contents, in `plans`'
    order (None for a run that failed under `keep_going`). `pack`: 1 (each alone), N or "auto"
    (`pack_groups`); `on_epoch(plan)`: that run's metrics callback, or None; `on_result(plan,
    results, error)`: called as each run ends (error: one line, results None)."""
    results: dict[int, Optional[dict]] = {}
    index = {id(p): k for k, p in enumerate(plans)}
    on_epoch = on_epoch or (lambda plan: None)  # each run's metrics callback, or None

    def report(plan: RunPlan, done: Optional[dict], error: Optional[BaseException]) -> None:
        if error is not None and not keep_going:
            raise error
        results[index[id(plan)]] = done
        if on_result is not None:
            on_result(plan, done, None if error is None else one_line(error, plain_ours=True))

    for group in pack_groups(plans, pack):
        if len(group) == 1:
            plan = group[0]
            try:
                done = train(plan, console, on_epoch(plan), force_eval=force_eval)
            except Exception as err:  # noqa: BLE001  (keep_going: one run's failure is its own)
                report(plan, None, err)
                continue
            report(plan, done, None)
        else:
            _run_packed(group, console, pack, on_epoch, force_eval, report)
    return [results.get(k) for k in range(len(plans))]


def _run_packed(plans: list[RunPlan], console, pack: Packing, on_epoch, force_eval: bool, report) -> None:
    """The runs of one pack key: finished ones reported, the rest trained in packs (auto: of the
    measured size)."""
    todo = []
    for plan in plans:
        try:
            done = None if plan.mode == "restart" else finished_run(plan)
        except Exception as err:  # noqa: BLE001
            report(plan, None, err)
            continue
        if done is not None and not force_eval:
            _say(console, f"done, results in {plan.out / 'results.json'}")
            report(plan, done, None)
        elif done is not None:
            report(plan, train(plan, console, on_epoch(plan), force_eval=True), None)
        else:
            todo.append(plan)
    size = None if pack == "auto" else int(pack)  # auto: measured on the first run built
    clip = SharedClip()  # one CLIP for every run of this key, built once
    while todo:
        trainers: list[Trainer] = []
        try:
            while todo and (size is None or len(trainers) < size):
                plan = todo.pop(0)
                trainer = _build(plan, on_epoch, trainers, report, clip)
                if trainer is None:
                    continue
                trainers.append(trainer)
                if size is None:
                    choice = auto_pack_size(_probe(trainer), len(todo) + 1, trainer.device)
                    _say(console, choice.line())
                    size = choice.size
            if trainers:
                _train_pack(trainers, console, report)
        finally:
            for trainer in trainers:
                trainer.close()


def _build(plan: RunPlan, on_epoch, trainers: list[Trainer], report, clip: SharedClip) -> Optional[Trainer]:
    """The trainer of one run of a pack (built, resumed, as alone) on the pack's CLIP (`clip`: built
    once; where its replay is not exact, each run's own, dropped for the pack's) and the first run's
    opened dataset; None when it failed (reported)."""
    try:
        trainer = Trainer(plan, console=None, on_epoch=on_epoch(plan), clip=clip,
                          data=trainers[0].data if trainers else None)  # one opened dataset (pack_key: one file)
    except Exception as err:  # noqa: BLE001
        report(plan, None, err)
        return None
    if trainers:
        first = trainers[0].model
        model = trainer.model
        if model.bundle.weights_id != first.bundle.weights_id:  # pack_key compares the names; the ids decide
            trainer.close()
            report(plan, None, FastpromptError(f"{plan.out}: its CLIP weights ({model.bundle.weights_id}) differ from "
                                               f"the pack's ({first.bundle.weights_id}); train it with --pack off"))
            return None
        model.clip, model.bundle = first.clip, first.bundle  # one frozen CLIP for the pack (its own copy is freed)
    return trainer


def _probe(trainer: Trainer) -> Callable[[int], None]:
    """`pack.probe_step` on `trainer`'s model and batch shape: a fixed-seed random batch from a
    generator of its own (the runs' RNG streams are not touched), no optimiser step."""
    size = trainer.model.bundle.image_size
    batch = min(trainer.config.batch_size, len(trainer.train_subset))
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=generator).to(trainer.device)  # (B, 3, S, S)
    labels = torch.randint(0, len(trainer.classnames), (batch,), generator=generator).to(trainer.device)  # (B,)
    return probe_step([trainer.model], images, labels, autocast=trainer.autocast)


def _train_pack(trainers: list[Trainer], console, report) -> None:
    """Train `trainers` to their last epoch as packs (each epoch: the runs at the earliest epoch),
    then finish each (final evaluation, results.json)."""
    for trainer in trainers:
        trainer.prepare_training()
    live = list(trainers)
    pack: Optional[Pack] = None
    members: list[Trainer] = []
    while True:
        waiting = [t for t in live if t.epoch < t.config.epochs]
        if not waiting:
            break
        epoch = min(t.epoch for t in waiting)
        group = [t for t in waiting if t.epoch == epoch]
        if [id(t) for t in group] != [id(members[r]) for r in (pack.active if pack else [])]:
            first = group[0]
            pack = Pack([t.model for t in group], [t.optimizer for t in group], first.config.nan_policy,
                        compile_mode=first.config.compile_mode(first.device.type),
                        compile_backend=first.config.compile_backend, autocast=first.autocast)
            members = group
            _say(console, f"{pack.execution}: " + ", ".join(str(t.out) for t in group) + f" from epoch {epoch + 1}")
        lrs = [t.start_epoch() for t in group]
        steps = {len(t.loader) for t in group}
        if len(steps) != 1:
            raise FastpromptError(f"the packed runs have {sorted(steps)} steps an epoch; pack runs of one data, shots, "
                                  "classes and batch size")
        per_epoch = steps.pop()
        pack.start_epoch()
        start = time.perf_counter()
        for step, batches in enumerate(zip(*(t.loader for t in group))):
            pack.step([b[0] for b in batches], [b[1] for b in batches], step)
            exit_after_step(epoch * per_epoch + step + 1)  # test hook, as a solo run's: see training/hooks.py
        seconds = time.perf_counter() - start
        for line in pack.end_epoch():
            trainer = members[line.run]
            failure = line.failure(trainer.epoch + 1)
            if failure is not None:
                live.remove(trainer)
                report(trainer.plan, None, FastpromptError(
                    f"{failure}; {trainer._last_checkpoint()}; lower --lr, use --precision fp32, or pass --nan-policy skip"))
                continue
            metrics = {"epoch": trainer.epoch + 1, "loss": line.loss, "train_accuracy": line.train_accuracy,
                       "lr": lrs[group.index(trainer)], "images": line.images, "seconds": round(seconds, 3),
                       "images_per_s": round(line.images / max(seconds, 1e-9), 1)}
            if line.skipped_steps is not None:
                metrics["skipped_steps"] = line.skipped_steps
            try:
                trainer.end_epoch(metrics)
            except Exception as err:  # noqa: BLE001  (a write error: this run fails, the others go on)
                live.remove(trainer)
                report(trainer.plan, None, err)
        _say(console, f"epoch {epoch + 1}: " + ", ".join(
            f"{t.out.name} loss {t.metrics[-1]['loss']:.4f}" for t in group if t in live and t.metrics))
    shared = _TestFeatures(live[0]) if live and live[0].model.frozen_image_tower else None
    for trainer in live:
        try:
            done = trainer.finish(shared)
        except Exception as err:  # noqa: BLE001
            report(trainer.plan, None, err)
            continue
        report(trainer.plan, done, None)


class _TestFeatures:
    """The confusion matrix of each run of a pack whose image tower is frozen, its test images
    encoded once for the whole pack: the features of each test batch (the frozen tower, no
    prompts: every run's model gives the same) kept on the device, each run's logits from its own
    class features, per batch, as `evaluate.confusion` computes them."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.batches: dict[str, list] = {}  # classes -> [(features (B, D), labels (B,))]

    @torch.no_grad()
    def __call__(self, model, classes: str) -> torch.Tensor:
        t = self.trainer
        model.eval()
        if classes not in self.batches:  # the loader `evaluate_confusion` makes, once
            loader = t.data.loader("test", shots=None, seed=1, classes=classes, train=False,
                                   image_size=model.bundle.image_size, batch_size=t.config.eval_batch_size,
                                   device=t.device, num_workers=t.config.num_workers, drop_last=False)
            with t.autocast():
                self.batches[classes] = [(model.image_features(images), labels.to(t.device)) for images, labels in loader]
        k = len(model.classnames)
        counts = torch.zeros(k * k, dtype=torch.long, device=t.device)  # (K*K,)
        with t.autocast():
            w = model.text_features()  # (K, D): eval, no grad: computed once
            for x, labels in self.batches[classes]:
                predicted = (model.logit_scale() * x @ w.t()).argmax(-1)  # (B,): the model's forward on x
                counts += torch.bincount(labels * k + predicted, minlength=k * k)
        return counts.view(k, k).cpu()  # (K, K)


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text, soft_wrap=True)
