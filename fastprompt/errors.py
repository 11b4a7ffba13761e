"""The one project exception type for bad input.

Library code raises `FastpromptError` when the *caller* got something wrong (an unknown
method, a bad option, a missing file). Its message is one line that names the problem and
the fix. The CLI turns it into exit code 2 (and nothing else does); every other exception
is a bug or an environment failure and exits 1.
"""


class FastpromptError(ValueError):
    """Bad input: the message names the problem and how to fix it."""

    exit_code = 2


def one_line(err: BaseException, *, plain_ours: bool = False) -> str:
    """`err` as one line for a record or a message: `Type: message`'s first line; with
    `plain_ours`, a FastpromptError's own message (already a user-facing line), or its type's
    name when it has none."""
    text = str(err) if plain_ours and isinstance(err, FastpromptError) else f"{type(err).__name__}: {err}"
    return text.splitlines()[0] if text else type(err).__name__
