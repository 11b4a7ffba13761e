"""`--tensorboard`: the epoch lines as `train/*` scalars and the final test accuracy as `test/*` (issue 25 §4)."""

import pytest

from fastprompt.training.tensorboard import TensorBoardLogger


def _scalars(folder) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_final_test_accuracy_is_a_scalar_at_the_last_epoch(tmp_path):
    logger = TensorBoardLogger(tmp_path / "all")
    for epoch in (1, 2):
        logger({"epoch": epoch, "loss": 1.0 / epoch, "lr": {"text": 0.002}})
    logger.final({"method": "coop", "epochs": 2, "classes": "all", "test_accuracy": 71.25})
    logger.close()
    scalars = _scalars(tmp_path / "all")
    assert scalars["test/accuracy"] == [(2, pytest.approx(71.25))]
    assert [step for step, _ in scalars["train/loss"]] == [1, 2] and "train/lr/text" in scalars

    logger = TensorBoardLogger(tmp_path / "b2n")
    logger.final({"epochs": 5, "classes": "base", "base_accuracy": 80.0, "new_accuracy": 60.0, "harmonic_mean": 68.5})
    logger.close()
    assert _scalars(tmp_path / "b2n") == {"test/base_accuracy": [(5, 80.0)], "test/new_accuracy": [(5, 60.0)],
                                          "test/harmonic_mean": [(5, 68.5)]}
