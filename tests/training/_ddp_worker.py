"""torchrun worker of test_ddp.py: `fastprompt train` once for each argument list of the JSON list in
argv[1], in turn, in this one process (the trainer makes the process group and ends it with each
run), so that one launch of 2 processes covers every method the test checks."""

import json
import sys

from fastprompt.cli import app

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        code = app(argv, standalone_mode=False, prog_name="fastprompt")
        if code:
            sys.exit(code)
