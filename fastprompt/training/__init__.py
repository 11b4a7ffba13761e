"""Training and evaluation: the `Trainer`, run configs, checkpoints and evaluation."""

from fastprompt.training.config import TrainConfig
from fastprompt.training.evaluate import evaluate_run, load_run, zeroshot_eval
from fastprompt.training.trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "evaluate_run", "load_run", "train", "zeroshot_eval"]
