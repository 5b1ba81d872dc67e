"""Ctrl-C on a command: one line on stderr and exit status 130, not a traceback.

130 is 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C; scripts and CI
runners read it as "interrupted", not "failed". Cleanup still runs first: the
``KeyboardInterrupt`` travels up through every ``async with`` (nodes stop, logs close,
temporary directories go) before it is caught here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_INTERRUPTED = 130


def run_command(main: Callable[[], int | None], name: str) -> NoReturn:
    """Run ``main()`` and exit with its status (``None`` is 0); on Ctrl-C, print
    ``NAME: interrupted`` and exit 130."""
    try:
        status = main()
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(status or 0)
