"""The installed `fastprompt` command: version, help, methods."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fastprompt
from fastprompt.cli import app

FASTPROMPT = str(Path(sys.executable).parent / "fastprompt")


def test_version_and_help():
    out = subprocess.run([FASTPROMPT, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"fastprompt {fastprompt.__version__}"
    helptext = subprocess.run([FASTPROMPT, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("prepare", "train", "eval", "zeroshot"):
        assert command in helptext


def test_methods_command():
    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0 and result.stdout.split() == fastprompt.list_methods()


def _commands(group, path=()):
    """(command path, click command) of every fastprompt command, groups walked."""
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def _help(args):
    import re

    from typer.testing import CliRunner

    from fastprompt.cli import app

    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return re.sub(r"[\s│]+", " ", result.output)  # one line: no wrapping or box drawing between words


def test_help_of_every_command():
    """--help: every option has a help text, no `<bool>` after a flag, the choices shown, rich
    markup shown as text (the split file's `[relative_path, ...]` is not a style tag)."""
    import typer
    from typer import _click

    from fastprompt.cli import app

    root = typer.main.get_command(app)
    commands = dict(_commands(root))
    assert {("train",), ("eval",), ("bench",), ("prepare", "imagefolder"), ("sweep",), ("plot", "shots")} <= commands.keys()
    for path, cmd in commands.items():
        params = cmd.get_params(_click.core.Context(cmd, info_name=path[-1]))
        undocumented = [p.name for p in params if not p.help]
        assert not undocumented, (path, undocumented)
        assert "<bool>" not in _help(path), path
    assert "--install-completion" in _help(())  # shell completion on

    train = _help(("train",))
    for shown in ("--method <coop|vpt-shallow|vpt-deep|vlp|cavpt|e2mim|cocoop|ivlp|maple>", "--classes <all|base>",
                  "--precision <auto|fp32|bf16>", "--optimizer <sgd|adamw>", "--device <auto|cpu|cuda|cuda:N>",
                  "--compile <auto|off|default|reduce-overhead|max-autotune>", "--cavpt.variant <paper|released>",
                  "--e2mim.infer <ensemble|soft>", "--vpt.placement <after-ln-pre|before-ln-pre>"):
        assert shown in train, shown
    assert "--classes <all|base|new>" in _help(("eval",)) and "--precision <auto|fp32|bf16>" in _help(("zeroshot",))
    assert "CoOp split file split_zhou_<Name>.json ([relative_path, label, classname] lists)." in _help(
        ("prepare", "imagefolder"))


@pytest.mark.parametrize("rank, level", [("0", "INFO"), ("1", "WARNING")])
def test_verbose_logs_on_rank_0_only(rank, level, monkeypatch):
    """Under torchrun the other ranks log warnings only, even with -v."""
    import logging

    from fastprompt.cli import _setup_logging

    monkeypatch.setenv("RANK", rank)
    _setup_logging(verbose=True)
    assert logging.getLevelName(logging.getLogger("fastprompt").level) == level
    _setup_logging(verbose=False)
