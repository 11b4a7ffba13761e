"""Running a sweep: the planned cells through a launcher, with a live view and a log.

Launchers:
- `local`: `--jobs N` worker processes (spawned, one per slot), each pinned to its device
  (`CUDA_VISIBLE_DEVICES`, slots round-robin over the visible GPUs) and to `cores // N`
  torch threads; a slot runs its cells one after another in the same process (imports once).
- `slurm`: every cell a submitit job (time limit, partition, GPUs); a cell that reaches the
  time limit is requeued and resumes from its checkpoint.
- `submitit-local`: submitit's LocalExecutor, the slurm path on this machine (tests).

`sweep-log.jsonl` in the sweep's folder gets one line per event (`start` with its action,
`done`, `failed` with the error, `skip`, `interrupted`); `sweep.json` gets the last run's
outcome. A failed cell does not stop the sweep. On a terminal the console shows a live view;
elsewhere (a log file, a pipe) it gets the same events as they happen, one line each (with
the counts and the ETA after each finished cell).

One sweep per folder: the sweep holds the folder's lock (`fastprompt.training.rundir.RunLock`,
`OUT/.lock`) while it runs; a second sweep on it stops at once, naming the holder's pid.
SIGINT (Ctrl-C, or `kill -INT` of the sweep alone) stops the running cells at once: the local
launcher's workers are told through a shared event and interrupt their cell (a worker that
has not stopped after `STOP_GRACE_S` exits); every cell stays resumable from its last
checkpoint, and the command exits 130.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fastprompt.errors import FastpromptError
from fastprompt.files import write_json
from fastprompt.sweep.grid import PlannedCell, SweepConfig, expand, plan, sweep_record
from fastprompt.sweep.worker import CellJob, init_worker, run_job

LOG_FILE = "sweep-log.jsonl"
SWEEP_FILE = "sweep.json"


@dataclass
class SweepOutcome:
    planned: list[PlannedCell]
    done: list[str] = field(default_factory=list)
    failed: dict = field(default_factory=dict)  # cell -> error
    skipped: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)  # running when the sweep was stopped (resumable)

    @property
    def ok(self) -> bool:
        return not self.failed and len(self.done) + len(self.skipped) == len(self.planned)

    def record(self) -> dict:
        """sweep.json's `outcome`."""
        done = {"done": self.done, "skipped": self.skipped, "failed": self.failed}
        return {**done, "interrupted": self.interrupted} if self.interrupted else done


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries."""
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in env.split(",") if d.strip()] if env else []
    return ids[: torch.cuda.device_count()] if ids else [str(i) for i in range(torch.cuda.device_count())]


def default_jobs(config: SweepConfig) -> int:
    if config.jobs is not None:
        return config.jobs
    if config.launcher == "slurm":
        return 1 << 30  # the cluster schedules
    return max(1, len(visible_gpus())) if config.train.get("device", "auto") != "cpu" else 1


def _write_error(path: Path, err: OSError) -> FastpromptError:
    import errno

    fix = "free space on that disk" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
    return FastpromptError(f"cannot write {path} ({err.strerror or err}); {fix}, or use another --out, "
                           "then run the same command again to resume")


def _finish_partial_line(path: Path) -> None:
    """Repair a log whose last line lacks its newline (a process killed in the middle of an
    append), so the next event starts a line of its own: a fragment that is a whole event gets
    its newline, any other fragment is cut off (it never was an event)."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return
            start = data.rfind(b"\n") + 1
            try:
                whole = isinstance(json.loads(data[start:]), dict)
            except ValueError:
                whole = False
            if whole:
                f.write(b"\n")
            else:
                f.truncate(start)
    except FileNotFoundError:
        return


def read_log(path) -> list[dict]:
    """The events of a sweep's `sweep-log.jsonl`, oldest first. A partial last line (a process
    killed while appending it, before a later sweep repaired the file) is skipped; a damaged
    line elsewhere is a FastpromptError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    partial = lines.pop()  # "" when the file ends in a newline
    events = []
    for k, line in enumerate(lines, 1):
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            raise FastpromptError(f"{path}:{k} is not a JSON event; delete that line (the cells' folders hold their state)")
        events.append(event)
    try:
        last = json.loads(partial) if partial else None
    except ValueError:
        last = None
    if isinstance(last, dict):  # a whole event that lost its newline
        events.append(last)
    return events


class _Log:
    """Appends one JSON line per event; a partial last line left by a killed sweep is repaired
    first (`_finish_partial_line`), so it never swallows the next event."""

    def __init__(self, path: Path):
        self.path = path
        try:
            _finish_partial_line(path)
        except OSError as err:
            raise _write_error(path, err) from None

    def __call__(self, **event) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **event}) + "\n")
        except OSError as err:
            raise _write_error(self.path, err) from None


# ------------------------------------------------------------------------------ launchers
class LocalLauncher:
    """`jobs` single-process pools (slots), each pinned at start to its GPU and thread share.
    `interrupt()` sets an event every worker watches: a worker running a cell interrupts it."""

    def __init__(self, jobs: int, tensorboard: bool, device: str):
        import multiprocessing

        gpus = visible_gpus() if device != "cpu" else []
        self.context = multiprocessing.get_context("spawn")
        self.threads = max(1, _cores() // jobs)
        self.slot_devices = [gpus[i % len(gpus)] if gpus else None for i in range(jobs)]
        self.tensorboard = tensorboard
        self.pools: list[Optional[ProcessPoolExecutor]] = [None] * jobs
        self.stop = self.context.Event()

    def _pool(self, slot: int) -> ProcessPoolExecutor:
        if self.pools[slot] is None:
            self.pools[slot] = ProcessPoolExecutor(
                1, mp_context=self.context, initializer=init_worker,
                initargs=(self.slot_devices[slot], self.threads, os.getpid(), self.stop))
        return self.pools[slot]

    def interrupt(self) -> None:
        self.stop.set()

    def submit(self, slot: int, payload: dict):
        for cell in payload.get("cells", [payload]):
            if cell["plan"]["config"].get("num_workers") is None:
                cell["plan"]["config"]["num_workers"] = self.threads  # loader threads: this slot's share of the cores
        return self._pool(slot).submit(run_job, payload, self.tensorboard)

    def wait(self, handles: list, timeout: float) -> list:
        done, _ = wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        return list(done)

    def result(self, slot: int, handle, name: str) -> dict:
        try:
            return handle.result()
        except Exception as err:  # the worker process died (killed, out of memory): a fresh one for the next cell
            self.pools[slot].shutdown(wait=False, cancel_futures=True)
            self.pools[slot] = None
            return {"cell": name, "status": "failed", "error": f"worker process died: {type(err).__name__}: {err}"}

    def close(self, wait: bool = True) -> None:
        for pool in self.pools:
            if pool is not None:
                pool.shutdown(wait=wait, cancel_futures=True)


class SubmititLauncher:
    """Each cell a submitit job (slurm, or the local executor for tests)."""

    def __init__(self, config: SweepConfig):
        import shutil

        try:
            import submitit
        except ImportError:
            raise FastpromptError(f"--launcher {config.launcher} needs submitit; pip install submitit") from None
        if config.launcher == "slurm" and shutil.which("srun") is None:
            raise FastpromptError("--launcher slurm needs a slurm cluster (no srun on PATH here); "
                                  "run the sweep on a login node, or use --launcher local")
        self.executor = submitit.AutoExecutor(folder=str(Path(config.out) / ".submitit" / "%j"),
                                              cluster="slurm" if config.launcher == "slurm" else "local")
        self.executor.update_parameters(
            name="fastprompt-sweep", timeout_min=config.slurm_time, gpus_per_node=config.slurm_gpus,
            tasks_per_node=1, nodes=1, slurm_partition=config.slurm_partition,
        )
        self.tensorboard = config.tensorboard

    def submit(self, slot: int, payload: dict):
        return self.executor.submit(CellJob(), payload, self.tensorboard)

    def wait(self, handles: list, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        while True:
            done = [h for h in handles if h.done()]
            if done or time.monotonic() >= deadline:
                return done
            time.sleep(min(0.5, timeout))

    def interrupt(self) -> None:
        pass  # submitted jobs belong to the cluster (submitit-local: they finish); a later sweep finds their results

    def result(self, slot: int, handle, name: str) -> dict:
        try:
            return handle.result()
        except Exception as err:  # the job failed outside run_cell (cancelled, node failure, time limit without requeue)
            return {"cell": name, "status": "failed", "error": f"job {handle.job_id}: {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"}

    def close(self, wait: bool = True) -> None:
        pass  # submitted jobs belong to the cluster; a later sweep finds their results


# ------------------------------------------------------------------------------ live view
class _View:
    """done / running / failed / left, the running cells, and an ETA from measured cell times."""

    def __init__(self, total: int, skipped: int, slots: int):
        self.total, self.skipped, self.slots = total, skipped, slots
        self.done = self.failed = 0
        self.running: dict[str, float] = {}  # cell -> start time
        self.seconds: list[float] = []
        self.left = total - skipped

    def eta(self) -> Optional[float]:
        if not self.seconds:
            return None
        mean = sum(self.seconds) / len(self.seconds)
        now = time.monotonic()
        work = self.left * mean + sum(max(mean - (now - t), 0.0) for t in self.running.values())
        return work / max(1, min(self.slots, self.left + len(self.running)))

    def summary(self) -> str:
        eta = self.eta()
        return (f"done {self.done + self.skipped}/{self.total} ({self.skipped} skipped)  running {len(self.running)}  "
                f"failed {self.failed}  left {self.left}  ETA {'after the first cell' if eta is None else _duration(eta)}")

    def __rich__(self):
        from rich.console import Group
        from rich.text import Text

        summary = Text.from_markup("[bold]sweep[/bold] ")
        summary.append(self.summary())
        summary.highlight_regex(r"failed \d+", "red")
        now = time.monotonic()
        return Group(summary, *(Text(f"  {name}  {_duration(now - start)}") for name, start in self.running.items()))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ------------------------------------------------------------------------------ the sweep
def prepare(config: SweepConfig) -> list[PlannedCell]:
    """The grid and what each cell's folder asks for; every check that can fail on bad input or a
    conflicting cell runs here, before anything is written."""
    return plan(expand(config))


def run_sweep(config: SweepConfig, console=None, planned: Optional[list[PlannedCell]] = None) -> SweepOutcome:
    """Run every cell that is not finished; returns what happened (never raises for a failed cell).
    Holds the sweep folder's lock throughout; KeyboardInterrupt (SIGINT) stops the running cells,
    records them as interrupted and is raised again."""
    from fastprompt.training.rundir import RunLock

    planned = prepare(config) if planned is None else planned
    todo = deque(sweep_jobs(config, planned))
    jobs = min(default_jobs(config), max(1, len(todo)))
    launcher = (LocalLauncher(jobs, config.tensorboard, config.train.get("device", "auto")) if config.launcher == "local"
                else SubmititLauncher(config))  # may refuse (no slurm here): before anything is written
    out = Path(config.out)
    lock = RunLock(out).acquire()  # one sweep per folder: a second one stops here, naming this one's pid
    try:
        return _run_locked(config, console, planned, todo, jobs, launcher, out)
    finally:
        lock.release()


def sweep_jobs(config: SweepConfig, planned: list[PlannedCell]) -> list[list[PlannedCell]]:
    """The jobs `run_sweep` hands its launcher (and `--dry-run` shows): `jobs_of` with the sweep's
    --pack; auto on several local slots (GPUs): a setting's cells spread over them, each slot
    packing its share."""
    return jobs_of(planned, config.pack, default_jobs(config) if config.launcher == "local" else 1)


def jobs_of(planned: list[PlannedCell], pack, slots: int = 1) -> list[list[PlannedCell]]:
    """The cells to run as the launcher's jobs, in sweep order: the cells to train or resume in
    packs (`fastprompt.training.plan.pack_groups`: one dataset, backbone, method, options, batch
    size and epochs; at most `pack` cells a job; auto: a setting's cells in `slots` near-equal jobs,
    so every slot works, and the worker measures how many of its job's train at once), each other
    cell (a cell only to evaluate, a method that trains alone) a job of its own."""
    from fastprompt.training.plan import pack_groups

    todo = [p for p in planned if p.action != "skip"]
    training = [p for p in todo if p.action != "evaluate"]
    cell_of = {id(p.cell.plan): p for p in training}
    jobs = []
    for group in pack_groups([p.cell.plan for p in training], pack):
        parts = min(slots, len(group)) if pack == "auto" else 1
        jobs += [[cell_of[id(plan)] for plan in group[k::parts]] for k in range(parts)]
    jobs += [[p] for p in todo if p.action == "evaluate"]
    order = {id(p): k for k, p in enumerate(todo)}
    return sorted(jobs, key=lambda job: order[id(job[0])])


def _payload(job: list[PlannedCell], pack) -> dict:
    """What a worker runs: one cell's payload, or a pack's ({"name", "cells", "pack"})."""
    if len(job) == 1:
        return job[0].cell.payload()
    return {"name": _job_name(job), "cells": [p.cell.payload() for p in job], "pack": pack}


def _job_name(job: list[PlannedCell]) -> str:
    return job[0].cell.name if len(job) == 1 else f"a pack of {len(job)} cells from {job[0].cell.name}"


def _cell_results(result: dict, job: list[PlannedCell]) -> list[dict]:
    """Each cell's record of a job's result: a pack's own records, or the one record (a single
    cell's, or a failure of the whole job: the worker died) for every cell of the job."""
    if "cells" in result:
        return result["cells"]
    return [{**result, "cell": p.cell.name} for p in job]


def _write_record(path: Path, record: dict) -> None:
    try:
        write_json(path, record)
    except OSError as err:
        raise _write_error(path, err) from None


def _run_locked(config: SweepConfig, console, planned: list[PlannedCell], todo: deque, jobs: int, launcher,
                out: Path) -> SweepOutcome:
    record = sweep_record(config, [p.cell for p in planned])
    _write_record(out / SWEEP_FILE, record)
    log = _Log(out / LOG_FILE)
    outcome = SweepOutcome(planned)
    skipped = [p for p in planned if p.action == "skip"]
    for p in skipped:
        outcome.skipped.append(p.cell.name)
        log(cell=p.cell.name, event="skip")
    view = _View(len(planned), len(outcome.skipped), jobs)
    running: dict = {}  # handle -> (slot, planned cell, start)
    free = list(range(jobs))
    say = _no_lines

    def finished(result: dict, p: PlannedCell, start: float) -> None:
        seconds = round(time.monotonic() - start, 3)
        view.running.pop(p.cell.name, None)
        if result.get("status") == "done":
            outcome.done.append(p.cell.name)
            if p.action != "evaluate":
                view.seconds.append(seconds)
            log(cell=p.cell.name, event="done", seconds=seconds)
        else:
            outcome.failed[p.cell.name] = result.get("error", "unknown error")
            log(cell=p.cell.name, event="failed", seconds=seconds, error=outcome.failed[p.cell.name])
        view.done, view.failed = len(outcome.done), len(outcome.failed)
        said = "done" if result.get("status") == "done" else f"failed ({outcome.failed[p.cell.name]})"
        say(f"{said} {p.cell.name} in {_duration(seconds)}; {view.summary()}")

    try:
        with _live(view, console) as say, _interrupt_at_safe_points() as interrupted:
            for p in skipped:
                say(f"skip {p.cell.name} ({p.why})")
            while todo or running:
                interrupted()
                while todo and free:
                    job, slot = todo.popleft(), free.pop(0)
                    if len(job) > 1:
                        say(f"{_job_name(job)}, packed (--pack {config.pack})")
                    for p in job:
                        log(cell=p.cell.name, event="start", action=p.action)
                        say(f"{p.action} {p.cell.name}" + ("" if p.action == "evaluate" else f" at epoch {p.from_epoch()}")
                            + f" ({p.why})")
                    running[launcher.submit(slot, _payload(job, config.pack))] = (slot, job, time.monotonic())
                    for p in job:
                        view.running[p.cell.name] = time.monotonic()
                    view.left -= len(job)
                ended = launcher.wait(list(running), timeout=0.5)
                interrupted()  # before reading them: a cell the same Ctrl-C stopped is interrupted, not failed
                for handle in ended:
                    slot, job, start = running.pop(handle)
                    free.append(slot)
                    result = launcher.result(slot, handle, _job_name(job))
                    for line in result.get("notes", []):  # a pack's: its size (--pack auto: measured) and runs
                        say(line)
                    for p, cell in zip(job, _cell_results(result, job)):
                        finished(cell, p, start)
    except BaseException:  # Ctrl-C / SIGINT, or the sweep's own files cannot be written: stop the running cells
        launcher.interrupt()
        launcher.close(wait=True)  # prompt: each worker interrupts its cell (or exits after STOP_GRACE_S)
        try:
            for handle, (slot, job, start) in running.items():
                result = launcher.result(slot, handle, _job_name(job)) if handle.done() else {}
                for p, cell in zip(job, _cell_results(result, job)):
                    if cell.get("status") == "done":
                        finished(cell, p, start)  # it finished before the interrupt reached it
                    else:
                        outcome.interrupted.append(p.cell.name)
                        log(cell=p.cell.name, event="interrupted", seconds=round(time.monotonic() - start, 3))
                        say(f"interrupted {p.cell.name} after {_duration(time.monotonic() - start)} (resumable)")
            _write_record(out / SWEEP_FILE, {**record, "outcome": outcome.record()})
        except FastpromptError:
            pass  # the sweep's own files cannot be written: the cells' folders still hold every state
        raise
    launcher.close(wait=True)
    record["outcome"] = outcome.record()
    _write_record(out / SWEEP_FILE, record)
    return outcome


def _no_lines(line: str) -> None:
    pass


@contextmanager
def _interrupt_at_safe_points():
    """SIGINT (Ctrl-C, `kill -INT`) while the sweep runs: noted by a handler and raised as
    KeyboardInterrupt by `interrupted()` at the top of the sweep's loop (at most the loop's 0.5 s
    wait later), never in the middle of the executor's or a future's locked sections, where an
    asynchronous KeyboardInterrupt can leave a lock held that the pool's shutdown then waits on.
    Outside the main thread (signals cannot be set there), or where SIGINT is ignored (a job a
    shell started in the background), nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield lambda: None
        return
    noted = threading.Event()

    def interrupted() -> None:
        if noted.is_set():
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, lambda signum, frame: noted.set())
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _live(view: _View, console):
    """What `console` shows while the sweep runs; yields `say(line)` for its events. On a
    terminal: the live view (`say` prints nothing, the view shows it). Elsewhere (a log file, a
    pipe): `say` prints each event's line at once, each ending in a newline (rich's live display
    there printed only its last frame, when the sweep ended, without a newline). Nothing when None."""
    if console is None:
        yield _no_lines
        return
    if not console.is_terminal:
        yield lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)
        return
    from rich.live import Live

    with Live(view, console=console, refresh_per_second=2, transient=False, redirect_stdout=False,
              redirect_stderr=False):
        yield _no_lines


def plan_table(planned: list[PlannedCell], jobs: Optional[list[list[PlannedCell]]] = None, pack=1):
    """`--dry-run`: every cell with what would happen to it (where its training goes on, from its
    checkpoint's record), and the counts; with the sweep's `jobs` (`sweep_jobs`), the job each cell
    runs in and the packs (`pack`: the sweep's --pack; under auto a job is the most that may pack,
    its size measured when it runs)."""
    from rich.table import Table

    counts = {a: sum(p.action == a for p in planned) for a in ("skip", "evaluate", "resume", "start")}
    title = f"{len(planned)} cells: " + ", ".join(f"{n} {a}" for a, n in counts.items())
    job_of = {}
    if jobs is not None:
        packs = [job for job in jobs if len(job) > 1]
        title += f"; {len(jobs)} job{'s' if len(jobs) != 1 else ''}"
        if packs:
            title += f", {len(packs)} of them packed (--pack {pack}" + (": sizes measured when they run" if pack == "auto" else "") + ")"
        for k, job in enumerate(jobs, start=1):
            size = len(job)
            where = f"{k}" if size == 1 else f"{k}: a pack of {'up to ' if pack == 'auto' else ''}{size}"
            job_of.update({id(p): where for p in job})
    table = Table(title=title, title_justify="left")
    for column in ("cell", "action", "from epoch", "folder holds") + (("job",) if jobs is not None else ()):
        table.add_column(column)
    for p in planned:
        table.add_row(p.cell.name, p.action, p.from_epoch(), p.why, *((job_of.get(id(p), "-"),) if jobs is not None else ()))
    return table
