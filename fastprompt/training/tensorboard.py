"""`--tensorboard`: every numeric field of each epoch's metrics line (loss, accuracies, every
learning-rate field, images/s) as a TensorBoard scalar `train/<field>` at step = epoch, but the
val accuracy of `--eval-every`'s epochs, `val/accuracy` (Dassl's tag); and the run's final test
accuracy (`results.json`: `test/accuracy`, or `test/base_accuracy`, `test/new_accuracy` and
`test/harmonic_mean`) at step = its last epoch, through `torch.utils.tensorboard`. The trainer
calls the logger with each metrics line; the command that trained hands it the results (`final`)."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from fastprompt.errors import FastpromptError

SKIP = ("epoch",)  # the step, not a scalar
FINAL = {"test_accuracy": "test/accuracy", "base_accuracy": "test/base_accuracy", "new_accuracy": "test/new_accuracy",
         "harmonic_mean": "test/harmonic_mean"}  # results.json key -> scalar tag
TAGS = {"val_accuracy": "val/accuracy"}  # fields that are not training scalars: their own tag


class TensorBoardLogger:
    """Writes event files under `log_dir` (open it with `tensorboard --logdir RUN_OR_SWEEP_DIR`).
    The folder is created at the first epoch, so a run that fails its checks leaves nothing."""

    def __init__(self, log_dir: Union[str, Path]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FastpromptError("--tensorboard needs the tensorboard package; pip install tensorboard") from None
        self._make = lambda: SummaryWriter(log_dir=str(log_dir))
        self.writer = None

    def __call__(self, line: dict) -> None:
        if self.writer is None:
            self.writer = self._make()
        step = int(line["epoch"])
        for key, value in _scalars(line):
            if key not in SKIP:
                self.writer.add_scalar(TAGS.get(key, f"train/{key}"), value, step)
        self.writer.flush()

    def final(self, results: dict) -> None:
        """The final test accuracies of `results` (results.json) at step = the run's epochs."""
        if self.writer is None:
            self.writer = self._make()
        for key, tag in FINAL.items():
            if isinstance(results.get(key), (int, float)):
                self.writer.add_scalar(tag, float(results[key]), int(results.get("epochs") or 0))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _scalars(line: dict, prefix: str = ""):
    """(name, number) of every numeric field; nested dicts (e.g. one lr per parameter group)
    become `outer/inner`."""
    for key, value in line.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value
