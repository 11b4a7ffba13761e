"""Concurrency, faults and hostile files (issue 17 §2 and §4): the run directory's lock against a
second real process, kills at deterministic points (training/hooks.py) that resume to an
uninterrupted run's results, disk full and unwritable output, --nan-policy, pickles that never
run, dataset names and split paths that never write outside, outputs that respect the umask."""

import contextlib
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.errors import FastpromptError
from fastprompt.training import checkpoint
from fastprompt.training.hooks import EXIT_AFTER_STEP, EXIT_CODE, KILL_AT

runner = CliRunner()
FASTPROMPT = str(Path(sys.executable).parent / "fastprompt")
TINY = ["--clip", "fastprompt-tiny", "--pretrained", "none", "--workers", "1", "--shots", "2", "--batch-size", "10",
        "--warmup-epochs", "0", "--coop.n-ctx", "4", "--lr", "0.05"]
DETERMINISTIC = ("epoch", "loss", "train_accuracy", "lr", "images")


def _args(data, out, *extra, epochs=3, method="coop"):
    return ["train", "--method", method, "--data", str(data), "--out", str(out), *TINY, "--epochs", str(epochs), *extra]


def _invoke(data, out, *extra, epochs=3):
    return runner.invoke(app, _args(data, out, *extra, epochs=epochs))


def _error(result):
    """The one-line error a failed command ends with (after any progress output), exit code 2."""
    assert result.exit_code == 2, result.output
    last = result.output.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in result.output, result.output
    return last


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _metrics(out):
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: line[k] for k in DETERMINISTIC} for line in lines]


class _Killed(Exception):
    """What `_kill_after_step` raises in place of the hook's `os._exit`."""


@contextlib.contextmanager
def _kill_after_step(monkeypatch, n):
    """In this process, the trainer stops after optimiser step `n` (counted over the run, as the
    FASTPROMPT_TEST_EXIT_AFTER_STEP hook counts) by raising `_Killed`: its checkpoints on disk are
    what the hook's kill leaves, for a test about what a resumed run reads rather than about the
    process (a subprocess costs an import of torch and open_clip)."""
    def kill(step):
        if step >= n:
            raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr("fastprompt.training.trainer.exit_after_step", kill)
        yield


@contextlib.contextmanager
def _one_thread():
    """torch on one thread in this process: the float reductions of a `fastprompt` process that
    `_env` starts (OMP_NUM_THREADS=1), so an in-process run is bit-equal to one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Plant:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------ one process per run directory
@pytest.mark.slow
def test_a_second_process_on_the_run_directory_stops_at_once(demo_beton, tmp_path):
    out = tmp_path / "run"
    hold = ("import sys; from fastprompt.training.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = _invoke(demo_beton, out)  # this process, against the holder's lock
        assert f"another process is running in {out}" in " ".join(_error(second).split())
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the second wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it
        holder.wait()
    from fastprompt.training.rundir import RunLock

    lock = RunLock(out)
    lock.acquire()  # the holder died holding it: free again (raises FastpromptError if not)
    lock.release()


# ------------------------------------------------------------------ killed at deterministic points
# One run directory killed at every kill point in turn, each process resuming the one before
# (E2MIM: its mixup draws and critic make the RNG state matter), then compared with an
# uninterrupted run. 2 steps an epoch; a kill point's count is per process. The run reports its
# best-on-val model (--final-model best-val, issue 25 §1): the best-on-val prompts and their epoch
# are part of every checkpoint, so the killed run also reports the model and epoch of a run that
# never stopped (one chain for both: 7 runs instead of 11). The runs killed at a kill point are
# processes (os._exit halfway through a write); the uninterrupted run, the one stopped after a step
# (nothing half-written: a raised stop leaves the files a kill does) and the last resume run in the
# test's process, on one thread as the processes.
KILLS = [  # (hook, value, the checkpoint's epoch after the kill, what the kill leaves)
    (EXIT_AFTER_STEP, "3", 1, "mid-epoch 2"),
    (KILL_AT, "checkpoint-tensors", 1, "epoch 2's tensors (its best-on-val prompts among them) written, its checkpoint.json not"),
    (KILL_AT, "checkpoint-rename:2", 2, "epoch 3's checkpoint.json complete as a temporary file"),
    (KILL_AT, "metrics-append:2", 3, "half of epoch 4's metrics line"),
    (KILL_AT, "before-results", 5, "trained and checkpointed, no results"),
]


@pytest.mark.slow
def test_a_run_killed_at_every_kill_point_resumes_to_an_uninterrupted_runs_results(demo_beton, tmp_path, monkeypatch):
    args = lambda out: [FASTPROMPT, *_args(demo_beton, out, "--eval-every", "1", "--final-model", "best-val",
                                           epochs=5, method="e2mim")]
    full, part = tmp_path / "full", tmp_path / "part"
    with _one_thread():  # the uninterrupted run in this process (no kill), with the killed processes' reductions
        assert runner.invoke(app, args(full)[1:]).exit_code == 0
    for hook, value, checkpointed, leaves in KILLS:
        if hook == EXIT_AFTER_STEP:
            with _one_thread(), _kill_after_step(monkeypatch, int(value)):
                assert isinstance(runner.invoke(app, args(part)[1:]).exception, _Killed), leaves
        else:
            killed = subprocess.run(args(part), env=_env(**{hook: value}), capture_output=True, text=True)
            assert killed.returncode == EXIT_CODE, (leaves, killed.stderr[-3000:])
        assert checkpoint.load(part)[0]["epoch"] == checkpointed, leaves
        assert not (part / "results.json").exists(), leaves
        if checkpointed == 1 and hook == KILL_AT:  # the process before resumed after epoch 1
            assert "resuming" in killed.stderr and "after epoch 1/5" in " ".join(killed.stderr.split())

    with _one_thread():  # the last resume, after the last kill, in this process too
        resumed = runner.invoke(app, args(part)[1:])
    assert resumed.exit_code == 0, resumed.output[-3000:]
    val = lambda out: [json.loads(l)["val_accuracy"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert _metrics(part) == _metrics(full) and val(part) == val(full)  # each epoch exactly once, the same numbers
    # the reported (best-on-val) prompts, and the last checkpoint's every tensor (the last epoch's state)
    for a, b in ((load_file(str(full / "prompts.safetensors")), load_file(str(part / "prompts.safetensors"))),
                 (checkpoint.load(full)[1], checkpoint.load(part)[1])):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = ("wall_seconds", "train_seconds")  # results.json's clock readings
    results = [{k: v for k, v in json.loads((run / "results.json").read_text()).items() if k not in timing}
               for run in (full, part)]
    assert results[0] == results[1]
    assert results[0]["final_model"] == "best-val"
    assert results[0]["reported_epoch"] == 1 + val(full).index(max(val(full)))  # the first of the best
    assert not list(part.glob(".*.tmp")) and len(list(part.glob("checkpoint-*.safetensors"))) == 1
    assert not (part / ".lock").exists()


@pytest.mark.slow
def test_a_killed_promptsrc_run_resumes_to_the_same_gpa_prompts(demo_beton, tmp_path, monkeypatch):
    """PromptSRC's GPA (issue 23): the running Gaussian-weighted sum of the epochs' prompts is part of
    every checkpoint, so a run killed in epoch 3 of 3 ends on an uninterrupted run's final prompts
    (bit-equal). N(2, 1) over 3 epochs gives each epoch weight; the final prompts are the sum the last
    checkpoint holds, not the last epoch's. In this process (the kill test of a process is the chain
    above): what is tested is what the checkpoint holds and the resumed run reads."""
    extra = ["--promptsrc.gpa-mean", "2", "--promptsrc.gpa-std", "1"]
    args = lambda out: _args(demo_beton, out, *extra, method="promptsrc")
    full, part = tmp_path / "full", tmp_path / "part"
    assert runner.invoke(app, args(full)).exit_code == 0
    with _kill_after_step(monkeypatch, 5):  # 2 steps an epoch: in epoch 3
        assert isinstance(runner.invoke(app, args(part)).exception, _Killed)
    record, tensors = checkpoint.load(part)
    assert record["epoch"] == 2 and sorted(k for k in tensors if k.startswith("method.")) == [
        "method.gpa.text.context", "method.gpa.text.deep_context", "method.gpa.visual.prompts"]
    resumed = runner.invoke(app, args(part))
    assert resumed.exit_code == 0, resumed.output[-3000:]
    assert "after epoch 2/3" in " ".join(resumed.output.split())
    assert _metrics(part) == _metrics(full)
    a, b = load_file(str(full / "prompts.safetensors")), load_file(str(part / "prompts.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = checkpoint.load(full)[1]  # after the last epoch: the prompts are the GPA sum it also holds
    assert all(torch.equal(final[f"method.gpa.{k}"], a[k]) for k in a)
    assert not all(torch.equal(tensors[f"prompts.{k}"], tensors[f"method.gpa.{k}"]) for k in a)  # mid-run: apart


@pytest.mark.slow
def test_a_promptsrc_checkpoint_without_its_gpa_sum_is_refused(demo_beton, tmp_path, monkeypatch):
    """A checkpoint whose tensors lack the method's training state (PromptSRC's GPA sum) cannot end on
    the run's prompts: one line naming it and --restart."""
    out = tmp_path / "run"
    args = _args(demo_beton, out, epochs=2, method="promptsrc")

    with _kill_after_step(monkeypatch, 3):  # in epoch 2 (2 steps an epoch): the checkpoint after epoch 1 stays
        assert isinstance(runner.invoke(app, args).exception, _Killed)
    record, tensors = checkpoint.load(out)
    assert record["epoch"] == 1 and sorted(k for k in tensors if k.startswith("method.gpa."))
    record = {k: v for k, v in record.items() if k not in ("format", "tensors", "checkpoint_id")}
    checkpoint.save(out, record, {k: v for k, v in tensors.items() if not k.startswith("method.")})
    error = _error(runner.invoke(app, args))
    assert "does not fit this run (ValueError: the checkpoint's PromptSRC GPA sum holds nothing" in error
    assert "pass --restart" in error


@pytest.mark.slow
def test_prepare_killed_between_its_renames_leaves_no_finished_beton(tmp_path):
    from fastprompt.data import open_dataset

    out = tmp_path / "d.beton"
    args = [FASTPROMPT, "prepare", "demo", "--out", str(out), "--images-per-class", "4", "--size", "32", "--workers", "1"]
    killed = subprocess.run(args, env=_env(**{KILL_AT: "beton-write"}), capture_output=True, text=True)
    assert killed.returncode == EXIT_CODE, killed.stderr[-3000:]
    with pytest.raises(FastpromptError):
        open_dataset(out)


# ------------------------------------------------------------------ disk full, unwritable output
@pytest.mark.slow
def test_disk_full_keeps_the_last_checkpoint_and_names_the_path(demo_beton, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = checkpoint.save_file, []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    assert _error(_invoke(demo_beton, out)).startswith(f"error: cannot write {out / 'checkpoint.json'} (No space left on device); "
                                    f"the checkpoint after epoch 1 in {out} is kept")
    assert checkpoint.load(out)[0]["epoch"] == 1  # still valid
    assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert _invoke(demo_beton, out).exit_code == 0  # and resumed from it


def test_unwritable_output_is_one_line(demo_beton, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _invoke(demo_beton, blocker / "run")
    assert result.exit_code == 2 and result.output == f"error: cannot write to --out {blocker / 'run'} (Not a directory); " \
                                                      "pick a writable directory\n"
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        result = _invoke(demo_beton, ro / "run")
        assert result.exit_code == 2 and "Permission denied" in result.output


# ------------------------------------------------------------------ non-finite loss
@pytest.fixture
def nan_at(monkeypatch):
    """nan_at(k): the k-th training loss (1-based) is NaN; nan_at(k, onwards=True): every loss from the k-th."""
    from fastprompt.methods import method_class

    cls = method_class("coop")
    real = cls.loss_and_logits

    def arm(k, onwards=False):
        count = [0]

        def loss_and_logits(self, *args, **kwargs):
            loss, logits = real(self, *args, **kwargs)
            count[0] += 1
            bad = count[0] >= k if onwards else count[0] == k
            return (loss * float("nan") if bad else loss), logits

        monkeypatch.setattr(cls, "loss_and_logits", loss_and_logits)

    return arm


@pytest.mark.slow
def test_nan_policy_stop_names_epoch_and_step_and_the_kept_checkpoint(demo_beton, tmp_path, nan_at):
    nan_at(4)  # epoch 2, step 2
    out = tmp_path / "run"
    assert "non-finite (NaN or inf) at epoch 2 step 2; the checkpoint after epoch 1" in _error(_invoke(demo_beton, out))
    assert checkpoint.load(out)[0]["epoch"] == 1 and len(_metrics(out)) == 1

    nan_at(2)  # no checkpoint yet: the message must not promise one
    result = _invoke(demo_beton, tmp_path / "early", "--checkpoint-every", "0")
    assert "at epoch 1 step 2; no checkpoint was written yet" in _error(result)
    assert checkpoint.read_record(tmp_path / "early") is None


@pytest.mark.slow
def test_nan_policy_skip_skips_the_step_and_counts_it(demo_beton, tmp_path, nan_at):
    nan_at(3)  # epoch 2, step 1
    out = tmp_path / "run"
    result = _invoke(demo_beton, out, "--nan-policy", "skip")
    assert result.exit_code == 0, result.output
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["skipped_steps"] for l in lines] == [0, 1, 0] and [l["images"] for l in lines] == [20, 10, 20]
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "prompts.safetensors")).values())


@pytest.mark.slow
def test_nan_policy_skip_stops_when_a_whole_epoch_is_skipped(demo_beton, tmp_path, nan_at):
    """An lr that explodes makes every later loss non-finite: skipping them all would end at chance, exit 0."""
    nan_at(3, onwards=True)  # every step from epoch 2 on
    out = tmp_path / "run"
    said = _error(_invoke(demo_beton, out, "--nan-policy", "skip"))
    assert said == (f"error: every step of epoch 2 had a non-finite loss (NaN or inf) and was skipped (2 of 2, --nan-policy "
                    f"skip): the run no longer trains; the checkpoint after epoch 1 in {out} is kept and the next start "
                    "resumes from it; lower --lr or use --precision fp32")
    assert checkpoint.load(out)[0]["epoch"] == 1 and len(_metrics(out)) == 1 and not (out / "results.json").exists()


# ------------------------------------------------------------------ data changed under a run
@pytest.mark.slow
def test_data_prepared_again_under_a_killed_run_is_not_resumed(tmp_path, monkeypatch):
    """Issue 21, as reported: a run killed after epoch 2 of 5, its .beton prepared again at the same
    path with other content: the next start stops naming data_id and the fix; the original data resumes it."""
    from fastprompt.data import write_demo

    data, out = tmp_path / "d.beton", tmp_path / "run"
    write_demo(str(data), images_per_class=4, image_size=32, seed=0, workers=1)  # 20 training images: 2 steps an epoch
    original = data.read_bytes(), data.with_suffix(".json").read_bytes()
    with _kill_after_step(monkeypatch, 5):  # in epoch 3: the checkpoint after epoch 2 stays
        assert isinstance(_invoke(data, out, epochs=5).exception, _Killed)
    assert checkpoint.load(out)[0]["epoch"] == 2
    write_demo(str(data), images_per_class=4, image_size=32, seed=1, workers=1, overwrite=True)
    said = _error(_invoke(data, out, epochs=5))
    assert "holds a run with data_id='sha256:" in said and f"the content of {data} changed since that run" in said
    assert "point --data at the data it trained on, or pass --restart" in said
    assert checkpoint.load(out)[0]["epoch"] == 2 and len(_metrics(out)) == 2  # nothing trained, nothing removed
    data.write_bytes(original[0])
    data.with_suffix(".json").write_bytes(original[1])
    resumed = _invoke(data, out, epochs=5)
    assert resumed.exit_code == 0 and "after epoch 2/5" in " ".join(resumed.output.split()), resumed.output
    assert [m["epoch"] for m in _metrics(out)] == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------ the largest batch
@pytest.mark.slow
def test_a_batch_larger_than_the_subset_is_the_subset(demo_beton, tmp_path):
    """The largest batch the config takes trains one batch of the 20 training images an epoch; the
    loader never allocates a buffer of 2**21 images."""
    from fastprompt.training.config import MAX_BATCH

    out = tmp_path / "run"
    result = _invoke(demo_beton, out, "--batch-size", str(MAX_BATCH), epochs=2)
    assert result.exit_code == 0, result.output
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["images"] for l in lines] == [20, 20]


# ------------------------------------------------------------------ nothing unpickles
@pytest.mark.slow
def test_planted_pickles_never_run(demo_beton, tmp_path):
    marker = tmp_path / "ran"
    run = tmp_path / "run"  # resume: a run of an older fastprompt, its config.json beside a pickled checkpoint.pt
    assert _invoke(demo_beton, run, epochs=1).exit_code == 0
    for path in [run / "results.json", run / "checkpoint.json", *run.glob("checkpoint-*.safetensors")]:
        path.unlink()
    torch.save({"prompts": _Plant(marker)}, run / "checkpoint.pt")
    result = _invoke(demo_beton, run, epochs=1)
    assert result.exit_code == 2 and "never unpickled" in result.output and not marker.exists()
    alone = tmp_path / "alone"  # a checkpoint.pt without a config.json of fastprompt: no run's, not read
    alone.mkdir()
    torch.save({"prompts": _Plant(marker)}, alone / "checkpoint.pt")
    result = _invoke(demo_beton, alone)
    assert result.exit_code == 2 and "holds no fastprompt run" in result.output and not marker.exists()

    done = tmp_path / "done"  # eval of a run whose prompts file is a pickle
    assert _invoke(demo_beton, done, epochs=1).exit_code == 0
    (done / "prompts.safetensors").write_bytes(pickle.dumps(_Plant(marker)))
    result = runner.invoke(app, ["eval", str(done), "--data", str(demo_beton)])
    assert result.exit_code == 2 and "unreadable run" in result.output and not marker.exists()

    weights = tmp_path / "weights.pt"  # --pretrained FILE
    torch.save({"state_dict": _Plant(marker)}, weights)
    zeroshot = ["zeroshot", "--data", str(demo_beton), "--clip", "fastprompt-tiny", "--pretrained", str(weights)]
    result = runner.invoke(app, zeroshot)
    assert result.exit_code == 2 and "--trust-pickle" in result.output and not marker.exists()
    result = _invoke(demo_beton, tmp_path / "w", "--pretrained", str(weights))
    assert result.exit_code == 2 and "--trust-pickle" in result.output and not marker.exists()
    runner.invoke(app, [*zeroshot, "--trust-pickle"])  # the plant works: trusted, it runs
    assert marker.exists()


# ------------------------------------------------------------------ nothing writes outside
@pytest.mark.slow
def test_eval_files_stay_inside_and_never_overwrite_each_other(demo_beton, tmp_path):
    run = tmp_path / "runs" / "run"
    assert _invoke(demo_beton, run, epochs=1).exit_code == 0
    other = tmp_path / "copy" / "demo.beton"  # another data file with the same dataset name
    other.parent.mkdir()
    shutil.copy(demo_beton, other)
    shutil.copy(demo_beton.with_suffix(".json"), other.with_suffix(".json"))
    for data in (demo_beton, other, demo_beton):
        assert runner.invoke(app, ["eval", str(run), "--data", str(data)]).exit_code == 0
    evals = sorted(run.glob("eval-*.json"))
    assert len(evals) == 2 and {json.loads(p.read_text())["data"] for p in evals} == {str(demo_beton.resolve()),
                                                                                     str(other.resolve())}

    hostile = tmp_path / "hostile" / "h.beton"  # a sidecar naming its dataset x/../../../escaped
    hostile.parent.mkdir()
    shutil.copy(demo_beton, hostile)
    sidecar = json.loads(demo_beton.with_suffix(".json").read_text())
    hostile.with_suffix(".json").write_text(json.dumps({**sidecar, "name": "x/../../../escaped"}))
    before = set(tmp_path.rglob("*"))
    result = runner.invoke(app, ["eval", str(run), "--data", str(hostile)])
    # refused (fastprompt.files.path_component), never mapped and never outside: nothing written anywhere
    assert _error(result) == (f'error: sidecar {hostile.with_suffix(".json")}: "name" \'x/../../../escaped\' cannot name a '
                              'file or folder (a path, not a name); set "name" to a plain name such as "eurosat", or '
                              're-create the dataset with `fastprompt prepare`')
    assert set(tmp_path.rglob("*")) == before


def test_split_paths_cannot_leave_the_image_folder(tmp_path):
    from fastprompt.data.splits import read_coop_split

    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "outside.jpg").write_bytes(b"")
    for bad in ("../outside.jpg", str(tmp_path / "outside.jpg"), "a/../../outside.jpg"):
        split = tmp_path / "split.json"
        split.write_text(json.dumps({"train": [[bad, 0, "a"]], "val": [], "test": []}))
        with pytest.raises(FastpromptError, match="leaves the image folder"):
            read_coop_split(split, root)


@pytest.mark.slow
def test_outputs_respect_the_umask(demo_beton, tmp_path):
    old = os.umask(0o027)
    try:
        assert _invoke(demo_beton, tmp_path / "run", epochs=1).exit_code == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert set(modes.values()) == {0o640}, modes
