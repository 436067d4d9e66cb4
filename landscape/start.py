"""The ``landscape`` command's entry point (and ``python -m landscape``'s): the command line is imported under
a guard, so Ctrl-C while torch and transformers load prints one line and exits 130 instead of a traceback
from deep inside an import (nothing has run or been written yet)."""

import sys

try:
    from landscape.cli import main as _command_line
except KeyboardInterrupt:
    _command_line = None

INTERRUPTED_AT_START = "interrupted while landscape was starting: nothing was run or written"


def main() -> int:
    if _command_line is None:
        print(INTERRUPTED_AT_START, file=sys.stderr)
        return 130
    return _command_line()
