"""Real sweeps on the demo set with the tiny config: killed in the middle and run again (no cell
runs twice, the report equals mean ± std computed from the runs), failures, cross-dataset
evaluations, TensorBoard scalars, submitit's local executor, and the shots figure."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.errors import FastpromptError

from fastprompt.sweep import SweepConfig, prepare, run_sweep
from fastprompt.sweep.plot import plot_shots, shots_curves
from fastprompt.sweep.report import report
from fastprompt.sweep.runner import read_log

# no warm-up: the groups' defaults (text 1, visual 10 epochs) leave no cosine epochs in 2 (refused)
TINY = ["--clip", "fastprompt-tiny", "--pretrained", "none", "--epochs", "2", "--batch-size", "8", "--lr", "0.05",
        "--warmup-epochs", "0", "--device", "cpu", "--set", "n_ctx=4"]
TRAIN = {"clip": "fastprompt-tiny", "pretrained": "none", "epochs": 2, "batch_size": 8, "lr": 0.05, "warmup_epochs": 0,
         "device": "cpu"}


def _events(out: Path) -> list[dict]:
    return read_log(out / "sweep-log.jsonl")


def _sweep_cmd(demo_beton, out, *extra):
    """One method, two seeds: two cells, each a process of its own."""
    return [sys.executable, "-m", "fastprompt.cli", "sweep", "--methods", "coop", "--data", str(demo_beton),
            "--seeds", "1,2", "--shots", "2", "--out", str(out), *TINY, *extra]


@pytest.mark.slow
def test_killed_sweep_resumes_without_running_a_cell_twice(demo_beton, tmp_path):
    out = tmp_path / "table"
    cells = [f"demo/coop/shots2/seed{s}" for s in (1, 2)]
    proc = subprocess.Popen(_sweep_cmd(demo_beton, out, "--jobs", "1"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / cells[0] / "results.json").is_file():
            assert proc.poll() is None, "the sweep ended before its first cell finished"
            assert time.monotonic() < deadline, "no cell finished in 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its workers, as Ctrl-C or a scheduler would
        proc.wait()
    first = _events(out)
    finished = {c for c in cells if (out / c / "results.json").is_file()}
    assert cells[0] in finished and len(finished) < len(cells), "the kill came after the whole sweep"

    # run again in this process (the kill is the process's; the sweep run again is what it reads)
    result = CliRunner().invoke(app, _sweep_cmd(demo_beton, out, "--jobs", "1")[3:])
    assert result.exit_code == 0, result.output[-2000:]
    second = _events(out)[len(first):]
    # cells finished before the kill are skipped, never started again; every other cell is started
    # once (resumed if it had a checkpoint) and done once
    assert {e["cell"] for e in second if e["event"] == "skip"} == finished
    for cell in cells:
        mine = [e["event"] for e in second if e["cell"] == cell]
        assert mine == (["skip"] if cell in finished else ["start", "done"]), (cell, mine)
        epochs = [json.loads(line)["epoch"] for line in (out / cell / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1, 2], (cell, epochs)  # no epoch ran twice into the record

    # the report equals mean ± std computed here from the runs' results.json
    tables = json.loads(report(out, "json"))
    assert len(tables) == 1
    for entry in tables[0]["cells"]:
        accs = [json.loads((out / f"demo/{entry['method']}/shots2/seed{s}/results.json").read_text())["test_accuracy"]
                for s in (1, 2)]
        assert entry["n"] == 2 and entry["missing_seeds"] == []
        assert entry["mean"] == pytest.approx(float(np.mean(accs))) and entry["std"] == pytest.approx(float(np.std(accs)))

    # a third run finds nothing to do
    result = CliRunner().invoke(app, _sweep_cmd(demo_beton, out, "--dry-run")[3:])
    assert result.exit_code == 0 and "2 cells: 2 skip, 0 evaluate, 0 resume, 0 start" in result.output, result.output


@pytest.mark.slow
def test_failed_cell_is_recorded_and_the_sweep_goes_on(demo_beton, tmp_path):
    out = tmp_path / "fail"
    # the 1-shot cell's folder holds a folder where a run file goes, and no run (it is not taken for one:
    # issue 21): that cell fails, the 2-shot one runs
    config = SweepConfig(methods=["coop"], data=[str(demo_beton)], seeds=[1], shots=[1, 2], out=str(out),
                         train={**TRAIN, "batch_size": 16}, options={"n_ctx": 4}, jobs=2, tensorboard=True,
                         eval_on=[])
    (out / "demo/coop/shots1/seed1/fewshot.json").mkdir(parents=True)
    outcome = run_sweep(config)
    assert not outcome.ok
    assert list(outcome.failed) == ["demo/coop/shots1/seed1"]
    assert "is not empty (fewshot.json) and holds no fastprompt run" in outcome.failed["demo/coop/shots1/seed1"]
    assert outcome.done == ["demo/coop/shots2/seed1"]
    error = json.loads((out / "demo/coop/shots1/seed1/error.json").read_text())
    assert "is not empty (fewshot.json)" in error["error"] and "Traceback" in error["traceback"]
    record = json.loads((out / "sweep.json").read_text())
    assert record["outcome"]["failed"] == outcome.failed and record["grid"]["shots"] == [1, 2]

    # TensorBoard: every numeric field of each metrics line, at step = epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = out / "demo/coop/shots2/seed1"
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "train_accuracy", "lr/text", "images_per_s"):  # lr: one per parameter group
        events = acc.Scalars(f"train/{key}")
        value = lambda m: m["lr"]["text"] if key == "lr/text" else m[key]
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([value(m) for m in metrics], rel=1e-6)


@pytest.mark.slow
def test_cross_dataset_evaluations_and_submitit_local_executor(demo_beton, tmp_path):
    from fastprompt.data import write_demo

    other = tmp_path / "other.beton"
    write_demo(str(other), images_per_class=10, image_size=64, seed=5)
    meta = json.loads(other.with_suffix(".json").read_text())
    meta["name"] = "other"
    other.with_suffix(".json").write_text(json.dumps(meta))
    out = tmp_path / "xd"
    config = SweepConfig(methods=["coop"], data=[str(demo_beton)], seeds=[1], shots=[2], out=str(out), train=TRAIN,
                         options={"n_ctx": 4}, eval_on=[str(other)], launcher="submitit-local", slurm_time=10)
    outcome = run_sweep(config)
    assert outcome.ok, outcome.failed
    run = out / "demo/coop/shots2/seed1"
    assert json.loads((run / "eval-other-all.json").read_text())["dataset"] == "other"
    assert list((out / ".submitit").iterdir())  # submitit's job folders
    text = report(out, "md")
    assert "| method | demo (source) | other | Average (targets) |" in text


def test_shots_figure(tmp_path, make_run):
    root = tmp_path / "fig"
    for shots, accs in ((1, (40, 44)), (4, (60, 62))):
        for seed, acc in zip((1, 2), accs):
            make_run(root, "eurosat", "coop", seed, acc, shots=shots)
    assert shots_curves(root) == {"eurosat": {"coop": [(1, 42.0, 2.0, 2), (4, 61.0, 1.0, 2)]}}
    (path,) = plot_shots(root)
    assert path == root / "figures" / "shots-eurosat.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = CliRunner().invoke(app, ["plot", "shots", str(root), "--out", str(tmp_path / "figs")])
    assert result.exit_code == 0 and result.stdout.strip() == str(tmp_path / "figs" / "shots-eurosat.png")  # (stderr: no zero-shot point)
    empty = tmp_path / "b2n"
    make_run(empty, "eurosat", "coop", 1, classes="base", base=1.0, new=2.0)
    result = CliRunner().invoke(app, ["plot", "shots", str(empty)])
    assert result.exit_code == 2 and "no few-shot accuracy" in result.output


def test_shots_figure_has_zero_shot_clip_at_0_shots(tmp_path, make_run, caplog):
    """CoOp Fig. 3: zero-shot CLIP (the runs' CLIP, from a saved `fastprompt zeroshot` JSON) as a
    star at 0 shots; a figure without one says so in one log line; --format pdf (issue 25 §4)."""
    from fastprompt.sweep.plot import draw_shots, zero_shot_points

    root = tmp_path / "fig"
    for shots, accs in ((1, (40, 44)), (4, (60, 62))):
        for seed, acc in zip((1, 2), accs):
            make_run(root, "eurosat", "coop", seed, acc, shots=shots, clip="ViT-B-32", pretrained="openai", weights_id="openai")
            make_run(root, "dtd", "coop", seed, acc, shots=shots, clip="ViT-B-32", pretrained="openai", weights_id="openai")
    zs = lambda dataset, acc, clip="ViT-B-32", classes="all": json.dumps(
        {"method": "zeroshot", "dataset": dataset, "classes": classes, "clip": clip, "pretrained": "openai",
         "test_accuracy": acc})
    (root / "zeroshot-eurosat.json").write_text(zs("eurosat", 35.5))
    (root / "zeroshot-dtd-b16.json").write_text(zs("dtd", 50.0, clip="ViT-B-16"))  # another CLIP than the runs'
    (root / "zeroshot-dtd-base.json").write_text(zs("dtd", 51.0, classes="base"))  # not all classes
    assert zero_shot_points(root) == {"eurosat": 35.5}

    fig = draw_shots("eurosat", {"coop": [(1, 42.0, 2.0, 2), (4, 61.0, 1.0, 2)]}, 35.5)
    (ax,) = fig.axes
    star = next(line for line in ax.lines if line.get_label() == "Zero-shot CLIP")
    assert list(star.get_xdata()) == [0] and list(star.get_ydata()) == [35.5] and star.get_marker() == "*"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "4"] and ax.get_xscale() == "symlog"
    to_px = lambda x: ax.transData.transform((x, 0))[0]
    assert to_px(1) - to_px(0) == pytest.approx(to_px(2) - to_px(1))  # 0 to 1 as wide as 1 to 2 (log2 above 1)

    with caplog.at_level(logging.WARNING, logger="fastprompt.sweep.plot"):
        paths = plot_shots(root, str(tmp_path / "pdf"), "pdf")
    assert [p.name for p in paths] == ["shots-dtd.pdf", "shots-eurosat.pdf"]
    assert all(p.read_bytes()[:5] == b"%PDF-" for p in paths)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"{tmp_path / 'pdf' / 'shots-dtd.pdf'} has no zero-shot point: no zeroshot*.json under {root} "
                           "for dtd with the runs' CLIP; add one with `fastprompt zeroshot")

    (root / "zeroshot-eurosat-again.json").write_text(zs("eurosat", 36.0))
    result = CliRunner().invoke(app, ["plot", "shots", str(root)])
    assert result.exit_code == 2 and "are two zero-shot results for eurosat with ViT-B-32 (openai) that differ " \
                                      "(36.00 vs 35.50); keep one" in result.output
    (root / "zeroshot-eurosat-again.json").write_text(json.dumps({"dataset": "eurosat"}))
    result = CliRunner().invoke(app, ["plot", "shots", str(root)])
    assert result.exit_code == 2 and "zeroshot-eurosat-again.json lacks method; replace it with what " \
                                      "`fastprompt zeroshot" in result.output


def test_shots_figure_never_writes_outside_its_folder(tmp_path, make_run):
    """A results.json whose "dataset" is a path: refused (fastprompt.files.path_component), no figure anywhere."""
    root = tmp_path / "fig"
    for seed in (1, 2):
        run = make_run(root, "eurosat", "coop", seed, 40.0 + seed, shots=1)
        results = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps({**results, "dataset": "../../escaped"}))
    result = CliRunner().invoke(app, ["plot", "shots", str(root)])
    assert result.exit_code == 2 and result.output.startswith(
        f'error: dataset (the "dataset" of a results.json under {root}) \'../../escaped\' cannot name a file or folder '
        "(a path, not a name); correct that run's results.json"), result.output
    assert not list(tmp_path.rglob("*.png")) and not (root / "figures").exists()


def test_a_cell_another_process_is_running_is_not_run_again(demo_beton, tmp_path):
    import fcntl

    from fastprompt.sweep import expand
    from fastprompt.sweep.worker import run_cell
    from fastprompt.training.rundir import LOCK_FILE

    config = SweepConfig(methods=["coop"], data=[str(demo_beton)], seeds=[1], shots=[2], out=str(tmp_path / "s"),
                         train=TRAIN, options={"n_ctx": 4})
    (cell,) = expand(config)
    cell.dir.mkdir(parents=True)
    with open(cell.dir / LOCK_FILE, "a") as held:  # as a worker of another sweep on the same folder holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        record = run_cell(cell.payload())
    assert record["status"] == "failed" and "another process is running in" in record["error"]
    assert sorted(p.name for p in cell.dir.iterdir()) == [LOCK_FILE]  # nothing trained, nothing written


@pytest.mark.slow
def test_train_tensorboard_flag(demo_beton, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["train", "--method", "coop", "--data", str(demo_beton), "--clip", "fastprompt-tiny", "--pretrained", "none",
            "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8", "--shots", "2", "--coop.n-ctx", "4", "--workers",
            "1", "--tensorboard"]
    bad = tmp_path / "bad"
    result = CliRunner().invoke(app, [*args, "--out", str(bad), "--lr", "-1"])
    assert result.exit_code == 2 and not bad.exists()  # refused before anything is written, event folder included
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (event,) = acc.Scalars("train/loss")
    assert event.step == 1 and event.value == pytest.approx(line["loss"], rel=1e-6)
    (final,) = acc.Scalars("test/accuracy")  # the final test accuracy at the last epoch (issue 25 §4)
    results = json.loads((out / "results.json").read_text())
    assert final.step == 1 and final.value == pytest.approx(results["test_accuracy"], rel=1e-6)


@pytest.mark.slow
def test_sigint_stops_the_running_cell_at_once_and_leaves_it_resumable(demo_beton, tmp_path):
    """`kill -INT` of the sweep process alone (not its group, as a terminal's Ctrl-C would): the
    running cell stops at once instead of training to its end, exit 130 with one line, the
    cell's folder unlocked and resumable."""
    from fastprompt.training.rundir import RunLock

    out = tmp_path / "int"
    cell = out / "demo/coop/shots2/seed1"
    cmd = _sweep_cmd(demo_beton, out, "--seeds", "1", "--epochs", "100000", "--jobs", "1")  # hours, unless stopped
    err = tmp_path / "stderr.txt"
    # The sweep starts as from a terminal, SIGINT at its default: pytest run as a background job of a
    # non-interactive shell (`pytest ... &`) ignores SIGINT, its children inherit that, and the sweep
    # rightly keeps an ignored SIGINT ignored (as `nohup` asks): it then trained on, and the test timed out.
    # -X faulthandler (inherited by the spawned worker): should the sweep not end, SIGABRT makes every
    # process of it print each thread's stack into stderr.txt, and the failure shows where it waits.
    default_sigint = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT]); os.execv(sys.argv[1], sys.argv[1:])")
    argv = [sys.executable, "-c", default_sigint, cmd[0], "-X", "faulthandler", *cmd[1:]]
    with open(err, "w") as stderr_file:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr_file, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (cell / "checkpoint.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint in 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)  # before the fix: the sweep waited for the cell to end
        except subprocess.TimeoutExpired:
            masks = [line for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                     if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"))]  # SIGINT: bit 1 (0x2)
            os.killpg(proc.pid, signal.SIGABRT)
            time.sleep(5)
            pytest.fail(f"the sweep did not end within 120 s of SIGINT; its signal masks {masks}; its threads:\n"
                        + err.read_text()[-12000:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its workers
            proc.wait()
    stderr = err.read_text()
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr.rstrip("\n").splitlines()[-1] == "interrupted; run the same command again to resume"
    assert "Traceback" not in stderr
    assert [e["event"] for e in _events(out)] == ["start", "interrupted"]
    assert json.loads((out / "sweep.json").read_text())["outcome"]["interrupted"] == ["demo/coop/shots2/seed1"]
    assert not (cell / "results.json").exists() and not (cell / "error.json").exists()
    assert len((cell / "metrics.jsonl").read_text().splitlines()) < 100000
    RunLock(cell).acquire().release()  # no worker holds the cell any more
    RunLock(out).acquire().release()  # nor the sweep's folder
    result = CliRunner().invoke(app, [*cmd[3:], "--dry-run"])
    assert result.exit_code == 0 and "1 cells: 0 skip, 0 evaluate, 1 resume, 0 start" in result.output, result.output


def test_a_second_sweep_on_the_folder_stops_naming_the_first(demo_beton, tmp_path):
    """Two sweeps on one --out both ran (the second's cells found the first's running cells
    locked and were recorded as failed): the sweep holds the folder's lock, the second stops
    before writing anything, naming the first's pid."""
    import fcntl

    out = tmp_path / "s"
    out.mkdir()
    with open(out / ".lock", "a") as held:  # what the running sweep (pid 4242) holds
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        result = CliRunner().invoke(app, _sweep_cmd(demo_beton, out)[3:])
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: another process is running in {out} (pid 4242 holds {out / '.lock'}); wait for it "
                             "to end, or use another --out\n")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_unwritable_sweep_folder_is_one_line(demo_beton, tmp_path, failing_writes, monkeypatch):
    import errno

    import fastprompt.sweep.runner as runner

    ro = tmp_path / "ro"
    ro.mkdir()
    failing_writes(ro, errno.EROFS)
    result = CliRunner().invoke(app, _sweep_cmd(demo_beton, ro / "s")[3:])
    assert result.exit_code == 2 and result.stderr == (f"error: cannot write to --out {ro / 's'} (Read-only file system); "
                                                       "pick a writable directory\n"), result.output
    assert list(ro.iterdir()) == []

    def full(path, obj, kill_point=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(runner, "write_json", full)
    out = tmp_path / "full"
    result = CliRunner().invoke(app, _sweep_cmd(demo_beton, out)[3:])
    assert result.exit_code == 2 and result.stderr == (f"error: cannot write {out / 'sweep.json'} (No space left on device); "
                                                       "free space on that disk, or use another --out, then run the same "
                                                       "command again to resume\n"), result.output
    assert not out.exists()  # the folder the sweep's lock made is removed again


def test_partial_last_log_line_is_repaired_before_the_next_event(tmp_path):
    """A sweep killed while appending to sweep-log.jsonl leaves half a line: the next sweep's first
    event used to be appended to it (one unreadable line). Readers skip a partial last line; the
    next sweep cuts it off (or, when it is a whole event, only adds its newline) before appending."""
    from fastprompt.sweep.runner import _Log

    path = tmp_path / "sweep-log.jsonl"
    whole = '{"time": 1.0, "cell": "a", "event": "start", "action": "start"}\n'
    path.write_text(whole + '{"time": 2.0, "cell": "a", "ev')  # killed mid-append
    assert [e["time"] for e in read_log(path)] == [1.0]  # the partial line is skipped
    _Log(path)(cell="b", event="skip")
    lines = path.read_text().splitlines(keepends=True)
    assert lines[0] == whole and len(lines) == 2 and lines[1].endswith("\n")
    assert [(e["cell"], e["event"]) for e in read_log(path)] == [("a", "start"), ("b", "skip")]

    path.write_text(whole.rstrip("\n"))  # a whole event that lost only its newline: kept
    _Log(path)(cell="b", event="skip")
    assert [(e["cell"], e["event"]) for e in read_log(path)] == [("a", "start"), ("b", "skip")]
    path.write_text(whole + "garbage\n" + whole)
    with pytest.raises(FastpromptError, match=f"{path}:2 is not a JSON event; delete that line"):
        read_log(path)


def test_live_view_eta_from_measured_cell_times():
    from rich.console import Console

    from fastprompt.sweep.runner import _View

    view = _View(total=6, skipped=2, slots=2)
    assert view.eta() is None  # nothing measured yet
    view.done, view.left, view.seconds = 1, 2, [8.0, 12.0]  # mean 10 s
    view.running = {"demo/coop/shots2/seed1": time.monotonic() - 4.0}
    assert view.eta() == pytest.approx((2 * 10 + 6) / 2, abs=0.1)  # left cells + the running cell's rest, over 2 slots
    console = Console(width=120, record=True)
    console.print(view)
    assert "done 3/6 (2 skipped)  running 1  failed 0  left 2  ETA 0m13s" in console.export_text()


class _OneAtATime:
    """A launcher whose cells end one per `wait`, in order, as `outcomes` says ("done" or an
    error); it records what the sweep's console held when each cell was submitted."""

    def __init__(self, outcomes: dict, console_text):
        self.outcomes, self.console_text = outcomes, console_text
        self.pending, self.seen_at_submit = [], {}

    def submit(self, slot, payload):
        self.seen_at_submit[payload["name"]] = self.console_text()
        self.pending.append(payload["name"])
        return payload["name"]

    def wait(self, handles, timeout):
        return [self.pending.pop(0)] if self.pending else []

    def result(self, slot, handle, name):
        outcome = self.outcomes[name]
        return {"cell": name, "status": "done"} if outcome == "done" else {"cell": name, "status": "failed", "error": outcome}

    def interrupt(self):
        pass

    def close(self, wait=True):
        pass


def test_a_log_file_gets_a_line_per_event_as_it_happens(demo_beton, tmp_path, monkeypatch):
    """stderr sent to a file (not a terminal): each event is a line of its own when it happens,
    not one frame of the live view at the end (issue 25 §11); each line ends in a newline, the
    last included, and a start says from which epoch the cell trains."""
    import io

    from rich.console import Console

    import fastprompt.sweep.runner as runner

    stream = io.StringIO()
    console = Console(file=stream, force_terminal=False, width=60)
    first, second = "demo/coop/shots2/seed1", "demo/coop/shots2/seed2"
    launcher = _OneAtATime({first: "done", second: "boom"}, stream.getvalue)
    monkeypatch.setattr(runner, "LocalLauncher", lambda *args: launcher)
    config = SweepConfig(methods=["coop"], data=[str(demo_beton)], seeds=[1, 2], shots=[2], out=str(tmp_path / "s"),
                         train=dict(TRAIN), options={"n_ctx": 4})
    outcome = run_sweep(config, console=console)
    assert outcome.done == [first] and outcome.failed == {second: "boom"}
    assert launcher.seen_at_submit[first] == f"start {first} at epoch 1/2 (new)\n"  # written before the cell runs
    assert launcher.seen_at_submit[second].startswith(  # the first cell's lines were written before the second began
        f"start {first} at epoch 1/2 (new)\ndone {first} in 0m00s; done 1/2 (0 skipped)  running 0  failed 0  left 1  ETA ")
    text = stream.getvalue()
    assert text.endswith("\n") and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 4 and lines[2] == f"start {second} at epoch 1/2 (new)"  # long lines are not wrapped at 60
    assert lines[3].startswith(f"failed (boom) {second} in 0m00s; done 1/2 (0 skipped)  running 0  failed 1  left 0")



@pytest.mark.slow
def test_a_packed_sweep_writes_ordinary_cells_and_a_failing_cell_fails_alone(demo_beton, tiny_weights, tmp_path):
    """--pack 3: three seeds of one setting train as one job; the cell whose folder holds another
    program's file fails (its error.json), the other two finish as ordinary runs (config.json with
    the plan's identity, TensorBoard scalars); run again once the folder is cleared, the finished
    cells are skipped and the third trains."""
    out = tmp_path / "packed"
    config = SweepConfig(methods=["coop"], data=[str(demo_beton)], seeds=[1, 2, 3], shots=[2], out=str(out),
                         train={**TRAIN, "pretrained": str(tiny_weights), "epochs": 1}, options={"n_ctx": 4}, pack="3",
                         tensorboard=True)
    cells = [f"demo/coop/shots2/seed{s}" for s in (1, 2, 3)]
    (out / cells[1]).mkdir(parents=True)
    (out / cells[1] / "notes.txt").write_text("mine\n")
    planned = prepare(config)
    outcome = run_sweep(config, planned=planned)
    assert outcome.done == [cells[0], cells[2]] and list(outcome.failed) == [cells[1]]
    assert "is not empty (notes.txt)" in outcome.failed[cells[1]]
    assert "is not empty (notes.txt)" in json.loads((out / cells[1] / "error.json").read_text())["error"]
    assert [(e["cell"], e["event"]) for e in _events(out)] == [
        *((c, "start") for c in cells), (cells[0], "done"), (cells[1], "failed"), (cells[2], "done")]
    for p in (planned[0], planned[2]):
        saved = json.loads((p.cell.dir / "config.json").read_text())
        assert saved["identity_hash"] == p.cell.plan.identity_hash and (p.cell.dir / "tensorboard").is_dir()
    (out / cells[1] / "notes.txt").unlink()
    (out / cells[1] / "error.json").unlink()
    again = run_sweep(config)
    assert again.skipped == [cells[0], cells[2]] and again.done == [cells[1]]


def test_sigint_is_raised_at_the_sweeps_safe_points_only():
    """The sweep's SIGINT handler notes the signal and `interrupted()` raises it (never inside the
    executor's locked sections); the previous handler comes back; a SIGINT the process ignores (a
    background job's) stays ignored."""
    from fastprompt.sweep.runner import _interrupt_at_safe_points

    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with _interrupt_at_safe_points() as interrupted:
                interrupted()  # nothing noted yet
                os.kill(os.getpid(), signal.SIGINT)  # handled at once: noted, not raised here
                time.sleep(0.05)
                reached.append("after the signal")
                interrupted()
        assert reached == ["after the signal"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with _interrupt_at_safe_points() as interrupted:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            interrupted()  # ignored, as before the sweep
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
