"""The installed `fastprompt` command: version, help, methods."""

import subprocess
import sys
from pathlib import Path

import fastprompt

FASTPROMPT = str(Path(sys.executable).parent / "fastprompt")


def test_version_and_help():
    out = subprocess.run([FASTPROMPT, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"fastprompt {fastprompt.__version__}"
    helptext = subprocess.run([FASTPROMPT, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("prepare", "train", "eval", "zeroshot"):
        assert command in helptext


def test_methods_command():
    out = subprocess.run([FASTPROMPT, "methods"], capture_output=True, text=True, check=True).stdout
    assert out.split() == fastprompt.list_methods()
