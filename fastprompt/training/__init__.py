"""Training and evaluation: the `Trainer`, run configs, checkpoints and evaluation.

The names below are imported on first use (PEP 562), so that a torch-free module of this
package (`identity`, `protocols`, `rundir`, `hooks`) imports without torch: `fastprompt
report` reads run identities, and its bad-input errors answer without loading torch."""

import importlib

_WHERE = {"TrainConfig": "config", "evaluate_run": "evaluate", "load_run": "evaluate", "zeroshot_eval": "evaluate",
          "Trainer": "trainer", "train": "trainer", "execute": "engine", "RunPlan": "plan", "plan_run": "plan"}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"fastprompt.training.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'fastprompt.training' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_WHERE])
