"""Training progress, shown in one place: a rich bar on a terminal, one line per epoch otherwise.

On a terminal the bar shows `epoch k/N` (from 1), the epoch's running mean loss (`-` until
the run's first step; at an epoch's start, the last one read until the epoch's first step), the last
epoch's accuracy and images/s, elapsed time and an ETA. When stderr is not a terminal (a
Slurm log, a pipe) the bar is off and every epoch prints one line a log reader can grep:

    epoch 3/200 loss 1.2345 acc 45.6% lr.visual 0.0099 1234 img/s eta 0:12:34

Only the main rank shows anything (under torchrun the trainer passes `enabled=False`
elsewhere). The running loss is read from the trainer's running sums (device tensors: a
CPU-GPU sync) at most once every `refresh_every` steps, and only while a bar is drawn.
"""

from __future__ import annotations

import datetime
import time
from typing import Callable, Optional


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


def epoch_line(line: dict, epochs: int, eta_s: Optional[float]) -> str:
    """The one-line log of a finished epoch (a metrics.jsonl line: 1-based `epoch`)."""
    lrs = " ".join(f"lr.{group} {lr:.4g}" for group, lr in line["lr"].items())
    eta = f" eta {_clock(eta_s)}" if eta_s is not None else ""
    val = f" val {line['val_accuracy']:.1f}%" if "val_accuracy" in line else ""  # --eval-every's epochs
    return (f"epoch {line['epoch']}/{epochs} loss {line['loss']:.4f} acc {line['train_accuracy']:.1f}%{val} {lrs} "
            f"{line['images_per_s']:.0f} img/s{eta}")


def _loss(value: Optional[float]) -> dict:
    """The bar's loss fields: the value, and its text: `-` until a first running mean exists
    (a bar that showed `nan` there, most frames of a run with few steps per epoch, looked
    like a diverged run)."""
    return {"loss": value, "loss_text": "-" if value is None else f"{value:.4f}"}


class TrainProgress:
    """Progress of `epochs` epochs of `steps_per_epoch` steps, starting after `done` epochs."""

    def __init__(self, console, epochs: int, steps_per_epoch: int, done: int = 0, enabled: bool = True,
                 refresh_every: int = 10):
        self.console = console if enabled else None
        self.epochs, self.steps_per_epoch, self.done = epochs, steps_per_epoch, done
        self.refresh_every = refresh_every
        self.live = self.console is not None and self.console.is_terminal  # a bar; else a line per epoch
        self._bar = self._task = None
        self._step = 0
        self._start = time.perf_counter()
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            columns = [TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                       TextColumn("loss {task.fields[loss_text]}  acc {task.fields[acc]:.1f}%  {task.fields[ips]:.0f} img/s"),
                       TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
            self._bar = Progress(*columns, console=self.console, transient=False)

    def __enter__(self) -> "TrainProgress":
        if self._bar is not None:
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.steps_per_epoch * (self.epochs - self.done),
                                            epoch=self.done + 1, epochs=self.epochs, acc=0.0, ips=0.0, **_loss(None))
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def say(self, text: str) -> None:
        """A line above the bar (or in the log)."""
        if self.console is not None:
            self.console.print(text, highlight=False, soft_wrap=True)  # a log line is never wrapped

    def start_epoch(self, epoch: int) -> None:
        """`epoch` is 0-based (the trainer's count of finished epochs)."""
        self._step = 0
        if self._bar is not None:  # the loss shown stays the last one read until this epoch's first step
            self._bar.update(self._task, epoch=epoch + 1)

    def step(self, running_mean: Callable[[], float]) -> None:
        """After a step: `running_mean()` reads the epoch's mean loss so far from the trainer's
        device sums (a CPU-GPU sync), called on the first step and every `refresh_every`-th."""
        self._step += 1
        if self._bar is None:
            return
        fields = {}
        if self._step == 1 or self._step % self.refresh_every == 0:
            fields = _loss(running_mean())
        self._bar.update(self._task, advance=1, **fields)

    def end_epoch(self, line: dict) -> None:
        """After an epoch: its metrics.jsonl line (the exact mean loss over the epoch)."""
        finished = line["epoch"] - self.done
        elapsed = time.perf_counter() - self._start
        eta = elapsed / finished * (self.epochs - line["epoch"]) if finished > 0 else None
        if self._bar is not None:
            self._bar.update(self._task, acc=line["train_accuracy"], ips=line["images_per_s"], **_loss(line["loss"]))
        elif self.console is not None:
            self.say(epoch_line(line, self.epochs, eta))
