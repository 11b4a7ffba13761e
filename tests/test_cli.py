"""The installed `fastprompt` command: version, help, methods."""

import os
import subprocess
import sys
import textwrap
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
    """One line per method: its name first, then what it learns and its paper (from its declaration)."""
    from fastprompt.methods import METHODS

    result = CliRunner().invoke(app, ["methods"])
    lines = result.stdout.splitlines()
    assert result.exit_code == 0 and [line.split()[0] for line in lines] == fastprompt.list_methods()
    for line, spec in zip(lines, METHODS.values()):
        assert spec.summary and spec.paper and line.endswith(f"{spec.summary}. {spec.paper}")


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
    assert "--install-completion" in _help(()) and "<bool>" not in _help(()) + _help(("plot",))  # the groups too

    train = _help(("train",))
    for shown in ("--method <coop|vpt-shallow|vpt-deep|vlp|cavpt|e2mim|cocoop|kgcoop|prograd|promptsrc|ivlp|maple>", "--classes <all|base>",
                  "--precision <auto|fp32|bf16>", "--optimizer <sgd|adamw>", "--device <auto|cpu|cuda|cuda:N>",
                  "--compile <auto|off|default|reduce-overhead|max-autotune>", "--cavpt.variant <paper|released>",
                  "--e2mim.infer <ensemble|soft>", "--vpt.placement <after-ln-pre|before-ln-pre>"):
        assert shown in train, shown
    assert "--classes <all|base|new>" in _help(("eval",)) and "--precision <auto|fp32|bf16>" in _help(("zeroshot",))
    assert "CoOp split file split_zhou_<Name>.json ([relative_path, label, classname] lists)." in _help(
        ("prepare", "imagefolder"))
    report = _help(("report",))  # choices once only in prose (issue 25 §12)
    assert all(shown in report for shown in ("--format <md|csv|json|latex>", "--rows <method|dataset|shots>[,...]",
                                             "--cols <method|dataset|shots>")), report
    for figure in (("plot", "attention"), ("plot", "tsne"), ("plot", "curves")):
        assert "--format <png|pdf>" in _help(figure), figure
    assert "--device <auto|cpu|cuda|cuda:N>" in _help(("plot", "attention"))
    sweep = _help(("sweep",))
    protocols = "--protocol <coop|cocoop-b2n|kgcoop-b2n|prograd-b2n|promptsrc-b2n|promptsrc-fewshot|cavpt|cavpt-paper|ivlp-b2n|maple-b2n|maple-xd>"
    for shown in ("--launcher <local|slurm|submitit-local>", "--device <auto|cpu|cuda|cuda:N>", protocols):
        assert shown in sweep, shown
    assert protocols in train and "--nan-policy <stop|skip>" in train
    assert "…" not in train  # no help text cut (the --out default once was)


def test_each_warning_is_printed_once():
    """A library's bare `logging.info` (open_clip's `create_model` calls one) used to
    `basicConfig` a plain stderr handler beside ours: every warning printed twice (issue 25 §10)."""
    script = textwrap.dedent("""
        import logging
        from fastprompt.cli import _setup_logging
        _setup_logging(verbose=False)
        logging.info("a library's message at the root")  # basicConfig()s when the root has no handler
        logging.getLogger("fastprompt.methods.maple").warning("prompt depth capped")
        logging.getLogger("fastprompt.methods.maple").info("hidden without -v")
        logging.getLogger("somelib").warning("a library warning")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "200"})
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("prompt depth capped") == 1 and run.stderr.count("a library warning") == 1, run.stderr
    assert "hidden without -v" not in run.stderr and "a library's message" not in run.stderr
    assert "WARNING:fastprompt" not in run.stderr


@pytest.mark.parametrize("rank, level", [("0", "INFO"), ("1", "WARNING")])
def test_verbose_logs_on_rank_0_only(rank, level, monkeypatch):
    """Under torchrun the other ranks log warnings only, even with -v."""
    import logging

    from fastprompt.cli import _setup_logging

    monkeypatch.setenv("RANK", rank)
    _setup_logging(verbose=True)
    assert logging.getLevelName(logging.getLogger("fastprompt").level) == level
    _setup_logging(verbose=False)
