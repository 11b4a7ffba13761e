"""Training progress (fastprompt/training/progress.py): one line per epoch in a log, a bar with
the running mean loss and an ETA on a terminal, the loss read rarely, nothing when disabled."""

import io

from rich.console import Console

from fastprompt.training.progress import TrainProgress, epoch_line

LINE = {"epoch": 3, "loss": 1.23456, "train_accuracy": 45.63, "lr": {"visual": 0.0099, "cavpt": 0.0099},
        "images": 160, "seconds": 0.13, "images_per_s": 1234.4}


class Running:
    """The trainer's running sums; counts how often the mean is read (each read is a CPU-GPU sync)."""

    def __init__(self):
        self.loss, self.seen, self.reads = 0.0, 0, 0

    def mean(self):
        self.reads += 1
        return self.loss / max(self.seen, 1)


def _console(terminal: bool):
    return Console(file=io.StringIO(), force_terminal=terminal, width=120)


def test_epoch_line():
    assert epoch_line(LINE, 200, 754.4) == \
        "epoch 3/200 loss 1.2346 acc 45.6% lr.visual 0.0099 lr.cavpt 0.0099 1234 img/s eta 0:12:34"


def test_log_has_one_line_per_epoch_and_never_reads_the_loss():
    console = _console(terminal=False)
    loss = Running()
    with TrainProgress(console, epochs=4, steps_per_epoch=5, done=2) as progress:
        for epoch in (2, 3):
            progress.start_epoch(epoch)
            for step in range(5):
                progress.step(loss.mean)
            progress.end_epoch({**LINE, "epoch": epoch + 1})
    lines = console.file.getvalue().splitlines()
    assert [line.split(" loss ")[0] for line in lines] == ["epoch 3/4", "epoch 4/4"]  # from 1, resumed at 3
    assert " eta 0:00:00" in lines[-1] and " eta " in lines[0]
    assert loss.reads == 0


def test_bar_reads_the_running_mean_every_few_steps():
    console = _console(terminal=True)
    loss = Running()
    with TrainProgress(console, epochs=1, steps_per_epoch=25, refresh_every=10) as progress:
        progress.start_epoch(0)
        for step in range(25):
            loss.loss += (1.0 + step) * 8  # step s has loss 1 + s on 8 images
            loss.seen += 8
            progress.step(loss.mean)
        assert progress._bar.tasks[0].fields["loss"] == 10.5  # read at step 20: mean of 1..20, not 20 (the last step)
        progress.end_epoch({**LINE, "epoch": 1})
    assert loss.reads == 3  # steps 1, 10 and 20
    out = console.file.getvalue()
    assert "epoch 1/1" in out and "eta" in out


def test_bar_never_shows_nan_while_no_mean_exists():
    """The bar showed `loss nan` from each epoch's start to its first step (~40 % of frames with
    CAVPT's few steps per epoch; issue 25 §7): `-` before the first step, then the last mean read."""
    console = _console(terminal=True)
    loss = Running()
    with TrainProgress(console, epochs=2, steps_per_epoch=1) as progress:
        progress._bar.refresh()
        assert progress._bar.tasks[0].fields["loss_text"] == "-"
        for epoch in (0, 1):
            progress.start_epoch(epoch)
            progress._bar.refresh()
            assert progress._bar.tasks[0].fields["loss_text"] == ("-" if epoch == 0 else "0.5000")
            loss.loss, loss.seen = 4.0, 8
            progress.step(loss.mean)
            progress._bar.refresh()
            progress.end_epoch({**LINE, "epoch": epoch + 1, "loss": 0.5})
    out = console.file.getvalue()
    assert "nan" not in out and "loss -" in out and "loss 0.5000" in out


def test_disabled_shows_nothing():
    console = _console(terminal=True)
    with TrainProgress(console, epochs=1, steps_per_epoch=2, enabled=False) as progress:
        progress.say("compiling")
        progress.start_epoch(0)
        progress.step(Running().mean)
        progress.end_epoch({**LINE, "epoch": 1})
    assert console.file.getvalue() == ""


def test_compile_notice_knows_a_cold_cache(tmp_path, monkeypatch):
    """"first time on this machine" is said when the compile cache holds no compiled graph yet."""
    from fastprompt.training.compiled import compile_cache_is_warm

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert not compile_cache_is_warm()
    (tmp_path / "fxgraph").mkdir()
    assert not compile_cache_is_warm()
    (tmp_path / "fxgraph" / "ab").mkdir()
    assert compile_cache_is_warm()
