"""docs/methods.md: in the repository, in step with the code, and the only reference the code,
README and help texts point to (nothing points to a file outside the repository)."""

import re
from pathlib import Path

from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.methods import METHODS
from fastprompt.methods.registry import group_names, option_flags
from fastprompt.training.protocols import protocol_markdown

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "methods.md"


def test_methods_md_holds_the_protocol_tables_as_the_code_has_them():
    """The protocols section is `protocol_markdown()` verbatim: a protocol edited in
    fastprompt/training/protocols.py without the doc fails here (regenerate the section)."""
    assert protocol_markdown() in DOC.read_text()


def test_methods_md_names_every_method_option_flag_and_group():
    text = DOC.read_text()
    for name in METHODS:
        assert f"### `{name}`" in text or f"`{name}`" in text.split("## Parameter groups")[0], name
    for fl in option_flags():
        assert fl.flag in text, fl.flag
    for group in group_names():
        assert f"| `{group}` |" in text, group


OUTSIDE = re.compile(r"SPEC\.md|\.\./shared|shared/seeds|seeds/0|/work/")


def test_nothing_in_the_repository_points_outside_it():
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "fastprompt").rglob("*.py"),
             *(ROOT / "fastprompt").rglob("*.toml"),  # the reproduce tables' sources
             *(ROOT / "scripts").rglob("*")]
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in files if path.is_file()
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert hits == []


def test_help_texts_point_to_methods_md():
    runner = CliRunner()
    assert "docs/methods.md" in runner.invoke(app, ["--help"]).output
    train = runner.invoke(app, ["train", "--help"])
    assert train.exit_code == 0 and "docs/methods.md" in " ".join(train.output.split())
    assert "--protocol" in train.output
    assert "docs/methods.md" in (ROOT / "README.md").read_text()
