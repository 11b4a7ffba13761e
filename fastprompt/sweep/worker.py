"""What runs in a sweep's worker process (local pool slot, or a submitit job): one cell.

Kept free of top-level torch imports: a local worker pins its device (`CUDA_VISIBLE_DEVICES`)
and thread count in `init_worker` before torch is first imported.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

ERROR_FILE = "error.json"  # a failed cell's error and traceback, in its folder (removed when it later succeeds)
STOP_GRACE_S = 30.0  # after the sweep's stop event, seconds a cell has to end before its worker exits
INTERRUPTED = "interrupted by SIGINT; run the sweep again to resume it from its last checkpoint"

_cell = {"running": False, "interrupted": False}  # this worker process's cell, for the SIGINT handler
_cell_ended = threading.Event()  # set when a cell's run_cell has released its folder


def _on_sigint(signum, frame) -> None:
    """SIGINT in a worker (the terminal's Ctrl-C reaches the whole process group; the sweep's
    stop event sends one too): the running cell stops with KeyboardInterrupt, once, so its
    clean-up (the trainer's close, the run lock) is not interrupted again; an idle worker
    ignores it (the sweep shuts its pool down)."""
    if _cell["running"] and not _cell["interrupted"]:
        _cell["interrupted"] = True
        raise KeyboardInterrupt


def init_worker(cuda_device: Optional[str], threads: int, parent_pid: int, stop=None) -> None:
    """Pin this worker to its device and thread share, and end it if the sweep process dies
    (a killed sweep must not leave cells training behind it: a rerun would race them). When
    the sweep sets `stop` (a multiprocessing Event: it was interrupted), a running cell is
    interrupted at once (SIGINT to this process) and the worker exits if the cell has not
    ended STOP_GRACE_S later."""
    if cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_device
    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, _on_sigint)

    def watch() -> None:
        while not (stop is not None and stop.wait(0.5)):
            if os.getppid() != parent_pid:
                os._exit(1)
        if _cell["running"]:
            os.kill(os.getpid(), signal.SIGINT)
            _cell_ended.wait(STOP_GRACE_S)
        # The sweep is stopping: exit without the interpreter's teardown (seconds with torch loaded), which the
        # sweep would wait for. The cell's result may not reach it (it logs the cell as interrupted); a cell still
        # running after the grace period loses its current epoch, the kernel drops its run lock, and it resumes
        # from its last checkpoint.
        os._exit(1)

    threading.Thread(target=watch, name="fastprompt-sweep-watchdog", daemon=True).start()


def run_cell(payload: dict, tensorboard: bool = False) -> dict:
    """Train the cell (or resume it: the trainer resumes from its checkpoint by itself) unless its
    results.json exists, then evaluate it on every extra test set it lacks. Never raises for a
    failure of the cell: returns {"status": "failed", "error": ...} and writes error.json."""
    from fastprompt.errors import FastpromptError
    from fastprompt.training.rundir import RunLock

    name, out = payload["name"], Path(payload["plan"]["config"]["out"])
    start = time.perf_counter()
    lock = RunLock(out)  # the run directory's lock (training/rundir.py), held around training and evaluations
    try:
        lock.acquire()
    except FastpromptError as err:
        return {"cell": name, "status": "failed", "seconds": 0.0, "error": str(err)}
    _cell.update(running=True, interrupted=False)
    _cell_ended.clear()
    try:
        return _run_locked(payload, name, out, tensorboard, start)
    except KeyboardInterrupt:  # SIGINT: the cell stops here, resumable from its last checkpoint (no error.json)
        return {"cell": name, "status": "interrupted", "error": INTERRUPTED,
                "seconds": round(time.perf_counter() - start, 3)}
    finally:
        lock.release()
        _cell["running"] = False
        _cell_ended.set()


def _run_locked(payload: dict, name: str, out: Path, tensorboard: bool, start: float) -> dict:
    from fastprompt.files import write_json

    try:
        from fastprompt.training import RunPlan, evaluate_run, execute
        from fastprompt.training.runfiles import eval_file

        plan = RunPlan.from_dict(payload["plan"])  # resolved by the sweep: nothing is resolved again
        config = plan.config
        if not (out / "results.json").is_file():
            logger = None
            if tensorboard:
                from fastprompt.training.tensorboard import TensorBoardLogger

                logger = TensorBoardLogger(out / "tensorboard")
            try:
                results = execute([plan], on_epoch=lambda _: logger)[0]
                if logger is not None:
                    logger.final(results)
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
