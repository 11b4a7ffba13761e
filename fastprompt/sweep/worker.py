"""What runs in a sweep's worker process (local pool slot, or a submitit job): one cell, or
the cells of one pack (`--pack`: trained together by `fastprompt.training.engine`).

Kept free of top-level torch imports: a local worker pins its device (`CUDA_VISIBLE_DEVICES`)
and thread count in `init_worker` before torch is first imported.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from fastprompt.errors import one_line

ERROR_FILE = "error.json"  # a failed cell's error and traceback, in its folder (removed when it later succeeds)
STOP_GRACE_S = 30.0  # after the sweep's stop event, seconds a cell has to end before its worker exits
INTERRUPTED = "interrupted by SIGINT; run the sweep again to resume it from its last checkpoint"

_cell = {"running": False, "interrupted": False}  # this worker process's cell, for the SIGINT handler
_cell_ended = threading.Event()  # set when a job (a cell, or a pack) has released its folders


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


def run_job(payload: dict, tensorboard: bool = False) -> dict:
    """A job of the sweep: the cells of one pack (`run_pack`: payload["cells"]), or one cell, run
    as a pack of one (`run_cell`)."""
    return run_pack(payload, tensorboard) if "cells" in payload else run_cell(payload, tensorboard)


def run_cell(payload: dict, tensorboard: bool = False) -> dict:
    """Train the cell (or resume it: the trainer resumes from its checkpoint by itself) unless its
    results.json exists, then evaluate it on every extra test set it lacks: `run_pack` of this one
    cell, its record returned. Never raises for a failure of the cell: returns {"status": "failed",
    "error": ...} and writes error.json."""
    return run_pack({"name": payload["name"], "cells": [payload], "pack": 1}, tensorboard)["cells"][0]


@contextmanager
def _running_cell():
    """This worker runs a cell (or a pack) meanwhile: what its SIGINT handler and watchdog read
    (the watchdog's exit waits for the end of this block: release the run locks inside it)."""
    _cell.update(running=True, interrupted=False)
    _cell_ended.clear()
    try:
        yield
    finally:
        _cell["running"] = False
        _cell_ended.set()


def _evaluated(name: str, plan, eval_on: list, start: float) -> dict:
    """A trained cell's record: evaluated on every extra test set it lacks, its old error.json
    removed; failed (error.json written) when an evaluation fails."""
    try:
        _evaluate(plan, eval_on)
        (plan.out / ERROR_FILE).unlink(missing_ok=True)
    except Exception as err:
        return _failed(name, plan.out, one_line(err), start)
    return {"cell": name, "status": "done", "seconds": round(time.perf_counter() - start, 3)}


def _interrupted(name: str, start: float) -> dict:
    return {"cell": name, "status": "interrupted", "error": INTERRUPTED, "seconds": round(time.perf_counter() - start, 3)}


def _evaluate(plan, eval_on: list) -> None:
    """The cell's evaluation on every extra test set it lacks (`evaluate_run`'s file for that data file)."""
    from fastprompt.training import evaluate_run
    from fastprompt.training.runfiles import eval_file

    config = plan.config
    for dataset, path in eval_on:
        if not eval_file(plan.out, dataset, path, "all").is_file():
            evaluate_run(str(plan.out), path, "all", device=config.device, precision=config.precision,
                         batch_size=config.eval_batch_size, num_workers=config.num_workers)


def _failed(name: str, out: Path, message: str, start: float) -> dict:
    """A failed cell's record, its error.json written (with the traceback when one is being handled)."""
    from fastprompt.files import write_json

    try:
        write_json(out / ERROR_FILE, {"cell": name, "error": message, "traceback": traceback.format_exc()})
    except OSError:
        pass  # the error still reaches the sweep through the returned record
    return {"cell": name, "status": "failed", "error": message, "seconds": round(time.perf_counter() - start, 3)}


class _loggers:
    """--tensorboard: a TensorBoard logger per run (`open(plan)`, the engine's on_epoch), its final
    scalars when the run ends (`final`, the engine's on_result); none without the flag."""

    def __init__(self, enabled: bool):
        self.enabled, self.by_out = enabled, {}

    def open(self, plan):
        if not self.enabled:
            return None
        from fastprompt.training.tensorboard import TensorBoardLogger

        self.by_out[plan.out] = TensorBoardLogger(plan.out / "tensorboard")
        return self.by_out[plan.out]

    def final(self, plan, results, error) -> None:
        if results is not None and plan.out in self.by_out:
            self.by_out[plan.out].final(results)

    def close(self) -> None:
        for logger in self.by_out.values():
            logger.close()


def run_pack(payload: dict, tensorboard: bool = False) -> dict:
    """Train a packed job's cells together (`payload`: {"name", "cells": [cell payloads], "pack"}),
    then evaluate each on its extra test sets; never raises for a cell: returns {"cell": NAME,
    "status", "cells": [each cell's record]}. A cell that fails (its
    folder locked by another process, a non-finite loss, a write error) fails alone."""
    from fastprompt.errors import FastpromptError
    from fastprompt.training import RunPlan, execute
    from fastprompt.training.rundir import RunLock

    start = time.perf_counter()
    records: dict[str, dict] = {}
    cells, locks = [], []
    for cell in payload["cells"]:
        plan = RunPlan.from_dict(cell["plan"])
        lock = RunLock(plan.out)
        try:
            lock.acquire()
        except FastpromptError as err:
            records[cell["name"]] = {"cell": cell["name"], "status": "failed", "seconds": 0.0, "error": str(err)}
            continue
        locks.append(lock)
        cells.append((cell, plan))
    by_out = {plan.out: cell for cell, plan in cells}

    def ended(plan, results, error) -> None:
        cell = by_out[plan.out]
        loggers.final(plan, results, error)
        records[cell["name"]] = (_failed(cell["name"], plan.out, error, start) if error is not None
                                 else _evaluated(cell["name"], plan, cell["eval_on"], start))

    loggers = _loggers(tensorboard)
    import io

    from rich.console import Console

    notes = io.StringIO()  # the engine's lines (the packs, --pack auto's measured size): the sweep says them
    with _running_cell():
        try:
            todo = [plan for cell, plan in cells if not (plan.out / "results.json").is_file()]
            for cell, plan in cells:
                if plan not in todo:
                    ended(plan, {}, None)  # trained: only its evaluations
            execute(todo, Console(file=notes, force_terminal=False, width=1000), pack=payload["pack"],
                    on_epoch=loggers.open, on_result=ended, keep_going=True)
        except KeyboardInterrupt:  # SIGINT: the cells still training stop, each resumable from its last checkpoint
            for cell, _ in cells:
                records.setdefault(cell["name"], _interrupted(cell["name"], start))
        except Exception as err:  # outside any one run (the pack's own step): every cell without a record failed
            message = one_line(err)
            for cell, plan in cells:
                if cell["name"] not in records:
                    records[cell["name"]] = _failed(cell["name"], plan.out, message, start)
        finally:
            loggers.close()
            for lock in locks:
                lock.release()
    ordered = [records[cell["name"]] for cell in payload["cells"]]
    status = "done" if all(r["status"] == "done" for r in ordered) else "failed"
    lines = [line for line in notes.getvalue().splitlines() if not line.startswith("epoch ")]  # the losses: metrics.jsonl
    return {"cell": payload["name"], "status": status, "cells": ordered, "notes": lines}


class CellJob:
    """A cell as a submitit job. Under slurm, a job that reaches its time limit is requeued
    (submitit's checkpoint protocol) and the requeued call resumes from the cell's checkpoint."""

    def __call__(self, payload: dict, tensorboard: bool = False) -> dict:
        return run_job(payload, tensorboard)

    def checkpoint(self, payload: dict, tensorboard: bool = False):
        import submitit

        return submitit.helpers.DelayedSubmission(CellJob(), payload, tensorboard)
