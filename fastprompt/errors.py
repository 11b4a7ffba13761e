"""The one project exception type for bad input.

Library code raises `FastpromptError` when the *caller* got something wrong (an unknown
method, a bad option, a missing file). Its message is one line that names the problem and
the fix. The CLI turns it into exit code 2 (and nothing else does); every other exception
is a bug or an environment failure and exits 1.
"""


class FastpromptError(ValueError):
    """Bad input: the message names the problem and how to fix it."""

    exit_code = 2
