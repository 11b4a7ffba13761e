"""The `fastprompt` command line: parses arguments and delegates to library functions.

Every command turns `FastpromptError` into a one-line message and exit code 2; nothing
else is caught here.
"""

from __future__ import annotations

import functools
from typing import Annotated, Optional

import typer

import fastprompt
from fastprompt.errors import FastpromptError

app = typer.Typer(
    name="fastprompt",
    help="Fast, exact prompt tuning for CLIP: zero-shot, CoOp, VPT, VLP, CAVPT, E2MIM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def user_errors(fn):
    """Turn a FastpromptError raised by `fn` into `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FastpromptError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=err.exit_code) from None

    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fastprompt {fastprompt.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Fast, exact prompt tuning for CLIP-like vision-language models."""


@app.command("methods")
def methods_cmd() -> None:
    """List the prompt-tuning methods this engine implements."""
    for name in fastprompt.list_methods():
        typer.echo(name)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
