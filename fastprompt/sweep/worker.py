"""What runs in a sweep's worker process (local pool slot, or a submitit job): one cell.

Kept free of top-level torch imports: a local worker pins its device (`CUDA_VISIBLE_DEVICES`)
and thread count in `init_worker` before torch is first imported.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

ERROR_FILE = "error.json"  # a failed cell's error and traceback, in its folder (removed when it later succeeds)


def init_worker(cuda_device: Optional[str], threads: int, parent_pid: int) -> None:
    """Pin this worker to its device and thread share, and end it if the sweep process dies
    (a killed sweep must not leave cells training behind it: a rerun would race them)."""
    if cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_device
    import torch

    torch.set_num_threads(threads)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="fastprompt-sweep-watchdog", daemon=True).start()


def run_cell(payload: dict, tensorboard: bool = False) -> dict:
    """Train the cell (or resume it: the trainer resumes from its checkpoint by itself) unless its
    results.json exists, then evaluate it on every extra test set it lacks. Never raises for a
    failure of the cell: returns {"status": "failed", "error": ...} and writes error.json."""
    from fastprompt.errors import FastpromptError
    from fastprompt.training.rundir import RunLock

    name, out = payload["name"], Path(payload["config"]["out"])
    start = time.perf_counter()
    lock = RunLock(out)  # the run directory's lock (training/rundir.py), held around training and evaluations
    try:
        lock.acquire()
    except FastpromptError as err:
        return {"cell": name, "status": "failed", "seconds": 0.0, "error": str(err)}
    try:
        return _run_locked(payload, name, out, tensorboard, start)
    finally:
        lock.release()


def _run_locked(payload: dict, name: str, out: Path, tensorboard: bool, start: float) -> dict:
    from fastprompt.files import write_json

    try:
        from fastprompt.training import TrainConfig, evaluate_run, train
        from fastprompt.training.rundir import eval_file

        config = TrainConfig.from_dict(payload["config"])
        if not (out / "results.json").is_file():
            logger = None
            if tensorboard:
                from fastprompt.training.tensorboard import TensorBoardLogger

                logger = TensorBoardLogger(out / "tensorboard")
            try:
                train(config, on_epoch=logger)
            finally:
                if logger is not None:
                    logger.close()
        for dataset, path in payload["eval_on"]:
            if not eval_file(out, dataset, path, "all").is_file():  # the file evaluate_run writes for this data file
                evaluate_run(str(out), path, "all", device=config.device, precision=config.precision,
                             batch_size=config.eval_batch_size, num_workers=config.num_workers)
        (out / ERROR_FILE).unlink(missing_ok=True)
        return {"cell": name, "status": "done", "seconds": round(time.perf_counter() - start, 3)}
    except Exception as err:
        message = f"{type(err).__name__}: {err}".splitlines()[0]
        try:
            write_json(out / ERROR_FILE, {"cell": name, "error": message, "traceback": traceback.format_exc()})
        except OSError:
            pass  # the error still reaches the sweep through the returned record
        return {"cell": name, "status": "failed", "error": message, "seconds": round(time.perf_counter() - start, 3)}


class CellJob:
    """A cell as a submitit job. Under slurm, a job that reaches its time limit is requeued
    (submitit's checkpoint protocol) and the requeued call resumes from the cell's checkpoint."""

    def __call__(self, payload: dict, tensorboard: bool = False) -> dict:
        return run_cell(payload, tensorboard)

    def checkpoint(self, payload: dict, tensorboard: bool = False):
        import submitit

        return submitit.helpers.DelayedSubmission(CellJob(), payload, tensorboard)
